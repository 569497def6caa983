"""Model files: tensors in safetensors, everything else as JSON in the safetensors header.

Loading reads raw tensor bytes and JSON, never a pickle, so opening a model file cannot run code.

A model file is checked, not trusted:
- before any tensor is read, the safetensors header is parsed here and every tensor's dtype, shape
  and byte range are checked against each other and against the file's size, so a damaged or
  hostile header can never make padim allocate more than the file holds;
- the header carries ``checksum``: "sha256:<hex>", the SHA-256 of the whole file with those 64 hex
  digits read as "0": one flipped bit anywhere in the file is a refusal, not a different model
  (files written before the checksum existed have none and are loaded without that check);
- ``verify`` then checks the contents against each other: the config (``validate_config_dict``),
  the feature grid and tensor shapes the backbone, layers, d and image size imply, the channel
  indices, finiteness, thresholds.

Saving writes the file through ``padim.files.atomic``: a temporary next to the target, created with the
user's umask, flushed and renamed, so a crash or a full disk leaves the old file whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import safe_open

from padim.files.atomic import atomic_write
from padim.errors import ModelFileError
from padim.files.headers import LAYOUT_KEY, check_fields, check_header
from padim.files.headers import layout_record as _layout_record

FORMAT_NAME = "padim"
FORMAT_VERSION = 2  # 2: the checksum is required (1: files from before it, loaded unchecked)
_METADATA_KEY = "padim"

CHECKSUM_KEY = "checksum"
# LAYOUT_KEY (padim.headers): what the tensors' shapes mean, written a second time beside the config: a
# header whose backbone, layers or input size was edited (even with a recomputed checksum) contradicts it.
_CHECKSUM_PREFIX = "sha256:"
_CHECKSUM_PLACEHOLDER = _CHECKSUM_PREFIX + "0" * 64
_CHECKSUM_RE = re.compile(r"sha256:[0-9a-f]{64}")
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
_BLOCK = 16 << 20

# safetensors dtype names <-> torch dtypes (those padim writes, and a few it may meet)
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}
_NAMES = {dtype: name for name, dtype in _DTYPES.items()}


# ----------------------------------------------------------------------------------------- saving
def save(path, tensors: Dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically writes ``tensors`` and ``metadata`` (JSON-serialisable) to ``path``, with a checksum.

    The file is plain safetensors (any safetensors reader opens it): written here rather than by
    ``safetensors.torch.save_file`` so that I/O errors arrive as OSError (one line, see
    ``padim.files.atomic``) and the checksum is computed while the bytes stream out, in one pass.
    """
    path = Path(path)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    if isinstance(metadata.get("config"), dict):
        header[LAYOUT_KEY] = _layout_record(metadata["config"])
    header.pop(CHECKSUM_KEY, None)
    header[CHECKSUM_KEY] = _CHECKSUM_PLACEHOLDER  # the last key: replaced by the digest once known
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in sorted(tensors.items())}
    entries, offset = {}, 0
    for name, tensor in contiguous.items():
        if tensor.dtype not in _NAMES:
            raise ValueError(f"cannot store tensor {name!r} of dtype {tensor.dtype}")
        size = tensor.numel() * tensor.element_size()
        entries[name] = {"dtype": _NAMES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps({"__metadata__": {_METADATA_KEY: json.dumps(header)}, **entries}, separators=(",", ":"))
    raw = text.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    prefix = len(raw).to_bytes(8, "little") + raw
    where = 8 + raw.rindex(_CHECKSUM_PLACEHOLDER.encode())

    def write(handle) -> None:
        digest = hashlib.sha256(prefix)
        handle.write(prefix)
        for tensor in contiguous.values():
            if tensor.numel() == 0:
                continue
            data = memoryview(tensor.reshape(-1).view(torch.uint8).numpy())
            for start in range(0, len(data), _BLOCK):
                block = data[start : start + _BLOCK]
                digest.update(block)
                handle.write(block)
        handle.seek(where + len(_CHECKSUM_PREFIX))
        handle.write(digest.hexdigest().encode())

    atomic_write(path, write, ModelFileError, "model file")


# ----------------------------------------------------------------------------------------- loading
def read_header(path) -> Tuple[dict, int]:
    """The safetensors header of ``path`` and its length in bytes, after checking that every tensor's
    dtype, shape and byte range agree and exactly tile the rest of the file. Reads only the header."""
    path = Path(path)
    corrupted = f"model file {path} is truncated, corrupted or not a safetensors file"
    try:
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else -1
            if n < 2 or n > min(MAX_HEADER_BYTES, size - 8):
                raise ModelFileError(f"{corrupted} (header length {n} does not fit a {size}-byte file)")
            header = json.loads(handle.read(n).decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise ModelFileError(f"{corrupted} (its header is not JSON: {exc})") from None
    except OSError as exc:
        raise ModelFileError(f"cannot read model file {path}: {exc.strerror or exc}") from None
    if not isinstance(header, dict):
        raise ModelFileError(f"{corrupted} (its header is not a JSON object)")
    ranges = []
    for name, entry in header.items():
        if name == "__metadata__":
            if not isinstance(entry, dict) or not all(isinstance(v, str) for v in entry.values()):
                raise ModelFileError(f"{corrupted} (its metadata is not a map of strings)")
            continue
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise ModelFileError(f"{corrupted} (tensor {name!r} has a malformed entry)")
        shape, offsets = entry["shape"], entry["data_offsets"]
        if (entry["dtype"] not in _DTYPES or not isinstance(shape, list) or not isinstance(offsets, list)
                or len(offsets) != 2 or not all(_is_count(v) for v in shape + offsets)):
            raise ModelFileError(f"{corrupted} (tensor {name!r} has a bad dtype, shape or offsets)")
        nbytes = math.prod(shape) * _DTYPES[entry["dtype"]].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise ModelFileError(f"{corrupted} (tensor {name!r}: shape {shape} does not match its {offsets[1] - offsets[0]} bytes)")
        ranges.append(tuple(offsets))
    position = 0
    for start, stop in sorted(ranges):
        if start != position:
            raise ModelFileError(f"{corrupted} (tensor byte ranges overlap or leave gaps)")
        position = stop
    if 8 + n + position != size:
        raise ModelFileError(f"{corrupted} (its tensors need {8 + n + position} bytes, the file has {size})")
    return header, n


def read_metadata(path) -> dict:
    """A model file's padim metadata (its JSON header) as written, without reading any tensor or
    verifying the file: for tools that copy it (``padim.deploy.export``); ``load`` is the checked reader."""
    header, _ = read_header(path)
    raw = header.get("__metadata__", {}).get(_METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a padim model (no padim metadata)")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"model file {path} has corrupted metadata ({exc})") from None


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < (1 << 50)


def file_checksum(path, header_bytes: int, stored: str) -> str:
    """SHA-256 of the file with the stored digest (inside the header) read as zeros."""
    with open(path, "rb") as handle:
        head = bytearray(handle.read(8 + header_bytes))
        where = bytes(head).rfind(stored.encode())
        if where >= 0:
            start = where + len(_CHECKSUM_PREFIX)
            head[start : start + 64] = b"0" * 64
        digest = hashlib.sha256(head)
        for block in iter(lambda: handle.read(_BLOCK), b""):
            digest.update(block)
    return _CHECKSUM_PREFIX + digest.hexdigest()


def load(path, expected_tensors: Dict[str, int]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reads a padim model file. ``expected_tensors`` maps each required tensor name to its rank.

    Raises ModelFileError naming the problem: missing, truncated or corrupted file (checksum), not a
    padim model, a newer format, or tensors missing or of the wrong rank. The header is checked
    against the file's size before any tensor is read (see ``read_header``).
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    header, header_bytes = read_header(path)
    raw = header.get("__metadata__", {}).get(_METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a padim model (no padim metadata)")
    try:
        metadata = json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"model file {path} has corrupted metadata ({exc})") from None
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a padim model file")
    stored = metadata.get(CHECKSUM_KEY)
    if stored is not None:
        if not isinstance(stored, str) or not _CHECKSUM_RE.fullmatch(stored):
            raise ModelFileError(f"model file {path} is corrupted (its checksum field is damaged)")
        if file_checksum(path, header_bytes, stored) != stored:
            raise ModelFileError(f"model file {path} is corrupted: its SHA-256 checksum does not match "
                                 "(changed or damaged after it was written)")
    version = metadata.get("format_version")
    if not isinstance(version, int) or isinstance(version, bool) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"model file {path} has format version {version}; this padim reads up to {FORMAT_VERSION}: upgrade padim"
        )
    if version >= 2 and stored is None:
        raise ModelFileError(f"model file {path} is corrupted: it lacks its checksum")
    for name, rank in expected_tensors.items():
        if name not in header or name == "__metadata__":
            raise ModelFileError(f"model file {path} lacks the tensor {name!r}")
        if len(header[name]["shape"]) != rank:
            raise ModelFileError(f"model file {path}: tensor {name!r} has rank {len(header[name]['shape'])}, expected {rank}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        raise ModelFileError(
            f"model file {path} is truncated, corrupted or not a safetensors file ({exc})"
        ) from None
    return tensors, metadata


def _no_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


# ----------------------------------------------------------------------------------------- contents
PROJECTION_TOLERANCE = 1e-4  # largest |W^T W - I| entry a stored projection may have


def check_projection(projection, config, k: int):
    """A stored projection against its config: None for reduction "random"; with "semi-orthogonal",
    (k, d) float32, finite, with orthonormal columns (to ``PROJECTION_TOLERANCE``). Returns it, or
    raises ModelFileError giving the reason (the caller names the file)."""
    if config.reduction != "semi-orthogonal":
        if projection is not None:
            raise ModelFileError(f"it holds a projection but its reduction is {config.reduction!r}")
        return None
    d = config.n_features
    if projection is None:
        raise ModelFileError("its reduction is semi-orthogonal but it lacks the tensor 'projection'")
    if tuple(projection.shape) != (k, d) or projection.dtype != torch.float32:
        raise ModelFileError(f"tensor 'projection' is {projection.dtype} {tuple(projection.shape)}, expected "
                             f"float32 {(k, d)}")
    if not _all_finite(projection):
        raise ModelFileError("tensor 'projection' holds NaN or infinite values")
    gram = projection.double().T @ projection.double()  # (d, d)
    if float((gram - torch.eye(d, dtype=torch.float64)).abs().max()) > PROJECTION_TOLERANCE:
        raise ModelFileError("tensor 'projection' does not have orthonormal columns (damaged?)")
    return projection


def _all_finite(tensor: torch.Tensor) -> bool:
    """Checked in blocks of rows: no bool copy of a multi-GB factor."""
    rows = max(1, (_BLOCK // 4) // max(1, tensor[0].numel())) if tensor.dim() and len(tensor) else 1
    return all(bool(torch.isfinite(tensor[start : start + rows]).all()) for start in range(0, len(tensor), rows))


def verify(path, tensors: Dict[str, torch.Tensor], metadata: dict):
    """Checks a loaded model's contents against each other; returns (PadimConfig, feature_hw).

    The config must be valid (``padim.settings.config.validate_config_dict``); ``feature_hw`` must be the grid of
    the first feature layer at the config's input size; mean (P, d) float32 and the packed factor
    (P, d (d + 1) / 2) in the config's factor dtype, both finite; channel_idx (k,) integer, strictly
    increasing, within the layers' channels (k = d, or all C channels with a projection); the
    projection, with reduction "semi-orthogonal" only, (C, d) float32 with orthonormal columns;
    thresholds numbers or null.
    """

    def refuse(reason: str):
        raise ModelFileError(f"model file {path}: {reason}")

    config, layout, feature_hw = check_header(metadata, f"model file {path}", refuse)
    n_pos, d = layout.grid[0] * layout.grid[1], config.n_features
    expected = {
        "mean": ((n_pos, d), (torch.float32,)),
        "precision_factor_packed": ((n_pos, d * (d + 1) // 2), (getattr(torch, config.factor_dtype),)),
        "channel_idx": ((layout.channels if config.reduction == "semi-orthogonal" else d,), (torch.int64, torch.int32)),
    }
    for name, (shape, dtypes) in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            refuse(f"it lacks the tensor {name!r}")
        if tuple(tensor.shape) != shape:
            refuse(f"tensor {name!r} has shape {tuple(tensor.shape)}, expected {shape} for {config.backbone} "
                   f"d={d} at {config.input_size[0]}x{config.input_size[1]}")
        if tensor.dtype not in dtypes:
            said = config.factor_dtype if name == "precision_factor_packed" else dtypes[0]
            refuse(f"tensor {name!r} is {tensor.dtype}, the metadata says {said}")
    idx = tensors["channel_idx"].long()
    if d and (bool((idx[1:] <= idx[:-1]).any()) or int(idx[0]) < 0 or int(idx[-1]) >= layout.channels):
        refuse(f"channel_idx must be increasing, distinct and within 0..{layout.channels - 1}")
    for name in ("mean", "precision_factor_packed"):
        if not _all_finite(tensors[name]):
            refuse(f"tensor {name!r} holds NaN or infinite values")
    try:
        check_projection(tensors.get("projection"), config, len(idx))
    except ModelFileError as exc:
        refuse(str(exc))
    check_fields(metadata, refuse)
    return config, tuple(feature_hw)
