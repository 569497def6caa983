"""Uploaded images: a multipart body read into memory within limits, then decoded by padim's reader.

Why not FastAPI's ``UploadFile``: Starlette spools every file part over 1 MB to a temporary file on
disk, and reads the whole body before a handler can refuse it. Here the body is streamed through
python-multipart's parser into memory, counted as it arrives, and refused (413) as soon as it
passes ``max_bytes`` or holds more than ``max_files`` files: uploads never touch the disk, and a huge
body costs at most ``max_bytes`` of memory.

Decoding goes through ``padim.files.images.load_pixels``, the function ``padim predict`` uses on files, so
the service sees exactly what the command line sees (EXIF orientation, 16-bit, JPEG draft decoding
of big pictures, the decompression-bomb limit). That function reads files by name; on Linux the
bytes are handed to it through an anonymous in-memory file (``memfd_create``, read through
``/proc/self/fd``: nothing is written to disk, and the name is built from a file descriptor, never
from client input). Elsewhere the bytes are opened by Pillow from memory and passed as a PIL image
(the same rules, except that big JPEGs are decoded at full size before the reduction).

Other bodies (the JSON of ``POST /models/NAME/feedback``) are read by ``read_body`` within their
route's small limit, after the API key was checked, like uploads.

A refused body is not left unread: a client still sending it (Python's urllib, requests) only reads
the answer once it has sent everything, and a connection closed under it is a reset, not a 413.
``discard_rest`` reads and drops the rest within bounds (as nginx's lingering close does), and a body
beyond them is answered at once with ``Connection: close``.
"""

from __future__ import annotations

import asyncio
import io
import os
import re
from dataclasses import dataclass, field
from typing import AsyncIterator, List, Optional, Tuple

import numpy as np
from PIL import Image

from padim.settings.config import PadimConfig
from padim.files.decode import read_image
from padim.errors import DataError
from padim.files.images import load_pixels

try:  # python-multipart >= 0.0.13 (the serve extra's minimum)
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # pragma: no cover - the serve extra is missing; padim serve says how to install it
    MultipartParser = parse_options_header = None

# A refused body is read and dropped up to this many bytes (or 4 x the upload limit, if more) and seconds.
DISCARD_BYTES = 256 * 10**6
DISCARD_SECONDS = 30.0

_HAS_MEMFD = hasattr(os, "memfd_create") and os.path.isdir("/proc/self/fd")


class UploadError(Exception):
    """A request body the service refuses as a whole: ``status`` (413, 415, 422) and one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status, self.reason = status, reason


def clip(text: str, limit: int = 80) -> str:
    """Client-given text as echoed in a message: at most ``limit`` characters, then "..."."""
    return text if len(text) <= limit else text[:limit] + "..."


@dataclass
class Upload:
    """One file part: its client-given name (only ever echoed back, never used as a path) and bytes."""

    filename: str
    data: bytearray = field(default_factory=bytearray)


async def read_multipart(content_type: Optional[str], content_length: Optional[str], chunks: AsyncIterator[bytes],
                         max_bytes: int, max_files: int) -> List[Upload]:
    """Streams a multipart/form-data body into memory -> its file parts, in order.

    Raises UploadError: 415 when the body is not multipart/form-data, 413 when it is (or says it is)
    larger than ``max_bytes`` or holds more than ``max_files`` files, 422 when it is malformed or
    holds no file. Parts without a filename (plain form fields) are skipped.
    """
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data" or b"boundary" not in options:
        raise UploadError(415, f"expected a multipart/form-data body with image files, got "
                               f"{clip((content_type or 'no content type').split(';')[0])!r}")
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise UploadError(413, f"the upload is {int(content_length) / 1e6:.1f} MB, more than the "
                               f"{max_bytes / 1e6:.1f} MB this server accepts per request")
    files: List[Upload] = []
    state = {"headers": b"", "field": b"", "current": None, "parts": 0, "ended": False}

    def on_part_begin():
        state["headers"], state["current"] = b"", None
        state["parts"] += 1
        if state["parts"] > max_files + 16:  # form fields are allowed, not without end
            raise UploadError(413, f"the upload has more than {max_files + 16} parts")

    def on_header_field(data, start, end):
        state["field"] += data[start:end]

    def on_header_value(data, start, end):
        if state["field"].lower() == b"content-disposition":
            state["headers"] += data[start:end]

    def on_header_end():
        state["field"] = b""

    def on_headers_finished():
        _, params = parse_options_header(state["headers"])  # form-data; name="files"; filename="a.png"
        if b"filename" in params:
            if len(files) >= max_files:
                raise UploadError(413, f"more than {max_files} files in one request (this server's `max_files`)")
            name = params[b"filename"].decode("utf-8", "replace")
            state["current"] = Upload(os.path.basename(name.replace("\\", "/"))[:200] or f"file {len(files) + 1}")
            files.append(state["current"])

    def on_part_data(data, start, end):
        if state["current"] is not None:
            state["current"].data += data[start:end]

    def on_end():
        state["ended"] = True

    parser = MultipartParser(options[b"boundary"], {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_headers_finished": on_headers_finished, "on_part_data": on_part_data,
        "on_end": on_end})
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if received > max_bytes:
            raise UploadError(413, f"the upload is more than the {max_bytes / 1e6:.1f} MB this server accepts "
                                   "per request")
        try:
            parser.write(chunk)
        except UploadError:
            raise
        except Exception as exc:  # python-multipart's MultipartParseError and friends
            raise UploadError(422, f"malformed multipart body: {' '.join(str(exc).split())}") from None
    if not state["ended"]:
        raise UploadError(422, "malformed multipart body: it ends before its closing boundary")
    if not files:
        raise UploadError(422, "no image in the request: send one or more files as multipart form parts "
                               "(e.g. curl -F files=@image.png)")
    return files


async def read_body(chunks: AsyncIterator[bytes], content_length: Optional[str], max_bytes: int) -> bytes:
    """A small body (a JSON request) read into memory -> its bytes. Raises UploadError 413 as soon as
    it says (Content-Length) or proves to be larger than ``max_bytes``: no more than that is kept."""
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes:
        raise UploadError(413, f"the body is {int(content_length)} bytes, more than the {max_bytes} bytes this route "
                               "accepts")
    data = bytearray()
    async for chunk in chunks:
        if len(data) + len(chunk) > max_bytes:
            raise UploadError(413, f"the body is more than the {max_bytes} bytes this route accepts")
        data += chunk
    return bytes(data)


async def discard_rest(chunks: AsyncIterator[bytes], content_length: Optional[str], max_bytes: int) -> bool:
    """Reads and drops what is left of a refused body (``chunks``, already partly read), at most
    ``max(DISCARD_BYTES, 4 * max_bytes)`` bytes within ``DISCARD_SECONDS`` -> True when the body ended
    within those bounds (the connection can be kept), False when it did not or says it will not.
    A client's disconnect propagates (starlette's ClientDisconnect)."""
    limit = max(DISCARD_BYTES, 4 * max_bytes)
    if content_length is not None and content_length.isdigit() and int(content_length) > max_bytes + limit:
        return False

    async def drop() -> bool:
        dropped = 0
        async for chunk in chunks:
            dropped += len(chunk)
            if dropped > limit:
                return False
        return True

    try:
        return await asyncio.wait_for(drop(), DISCARD_SECONDS)
    except asyncio.TimeoutError:
        return False


def decode_upload(upload: Upload, config: PadimConfig,
                  display_size: Optional[int] = None) -> Tuple[np.ndarray, Tuple[int, int], Optional[Image.Image]]:
    """-> the model's input pixels (H, W, 3) uint8, the picture's upright (height, width), and with
    ``display_size`` the picture drawn with its long side at most that many pixels (for heatmaps).
    Raises DataError, naming the upload, when the bytes are not an image padim reads."""
    if not upload.data:
        raise DataError(f"{upload.filename}: the file is empty")
    if not _HAS_MEMFD:
        return _decode_in_memory(upload, config, display_size)
    fd = os.memfd_create("padim-upload", os.MFD_CLOEXEC)
    source = f"/proc/self/fd/{fd}"
    try:
        view = memoryview(upload.data)
        while view:
            view = view[os.write(fd, view):]
        pixels, original = load_pixels(source, config)
        display = _display(source, original, display_size)
        return pixels, original, display
    except DataError as exc:  # the message names the upload, not the descriptor it was read through
        message = re.sub(r"\s*<_io\.\w+ name='[^']*'>", "", str(exc))
        raise DataError(message.replace(f"image {source}", upload.filename).replace(source, upload.filename)) from None
    finally:
        os.close(fd)


def _display(source, original: Tuple[int, int], display_size: Optional[int]) -> Optional[Image.Image]:
    if display_size is None:
        return None
    from padim.render.visualize import overlay_size

    return read_image(source, overlay_size(original, display_size), 1, 1)[0]


def _decode_in_memory(upload: Upload, config: PadimConfig, display_size: Optional[int]):
    def opened() -> Image.Image:
        try:
            return Image.open(io.BytesIO(bytes(upload.data)))
        except Image.DecompressionBombError:
            raise DataError(f"{upload.filename} is larger than Pillow's decompression-bomb limit") from None
        except Exception as exc:
            raise DataError(f"{upload.filename}: {' '.join(str(exc).split()) or type(exc).__name__}") from None

    pixels, original = load_pixels(opened(), config)
    return pixels, original, _display(opened(), original, display_size)
