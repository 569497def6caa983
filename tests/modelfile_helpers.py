"""Reading and rewriting model files byte by byte, independently of padim.files.safetensors_io (the tests' reference)."""

import hashlib
import json
import re


def split(data: bytes):
    """file bytes -> (safetensors header dict, tensor bytes)."""
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def padim_header(data: bytes) -> dict:
    return json.loads(split(data)[0]["__metadata__"]["padim"])


def sha256_with_digest_zeroed(data: bytes) -> str:
    """The documented checksum: SHA-256 of the file with its stored 64 hex digits read as '0'."""
    stored = padim_header(data)["checksum"]
    n = int.from_bytes(data[:8], "little")
    head = data[: 8 + n]
    where = head.rfind(stored.encode())
    zeroed = head[:where] + b"sha256:" + b"0" * 64 + head[where + len(stored) :] + data[8 + n :]
    return "sha256:" + hashlib.sha256(zeroed).hexdigest()


def assemble(header: dict, body: bytes) -> bytes:
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw + body


def rewrite(data: bytes, edit, checksum: str = "recompute") -> bytes:
    """Applies ``edit(padim_header_dict)`` (in place) and reassembles the file; the checksum is then
    recomputed ("recompute"), left as it was ("keep") or removed ("drop", like a file from before)."""
    header, body = split(data)
    meta = json.loads(header["__metadata__"]["padim"])
    old = meta.pop("checksum", None)
    edit(meta)
    if checksum == "keep" and old is not None:
        meta["checksum"] = old
    elif checksum == "recompute":
        meta["checksum"] = "sha256:" + "0" * 64
    elif checksum == "drop":
        meta["format_version"] = 1  # a file from before the checksum
    header["__metadata__"]["padim"] = json.dumps(meta)
    out = assemble(header, body)
    if checksum == "recompute":
        digest = sha256_with_digest_zeroed(out)
        out = re.sub(rb"sha256:0{64}", digest.encode(), out, count=1)
    return out
