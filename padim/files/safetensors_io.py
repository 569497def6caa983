"""Model files: tensors in safetensors, everything else as JSON in the safetensors header.

Loading reads raw tensor bytes and JSON, never a pickle, so opening a model file cannot run code.

A model file is read into memory once (``padim.files.safetensors_read``: never kept open or mapped,
so a file written or truncated later changes nothing loaded from it), and checked, not trusted:
- before the file is read, its safetensors header is parsed and every tensor's dtype, shape and
  byte range are checked against each other and against the file's size, so a damaged or hostile
  header can never make padim allocate more than the file holds;
- the header carries ``checksum``: "sha256:<hex>", the SHA-256 of the whole file (the bytes in
  memory, the ones the tensors are made from) with those 64 hex digits read as "0": one flipped bit
  anywhere in the file is a refusal, not a different model (files written before the checksum
  existed have none and are loaded without that check);
- ``verify`` then checks the contents against each other: the config (``validate_config_dict``),
  the feature grid and tensor shapes the backbone, layers, d and image size imply, the channel
  indices, finiteness, thresholds.

Saving writes the file through ``padim.files.atomic``: a temporary next to the target, created with the
user's umask, flushed and renamed, so a crash or a full disk leaves the old file whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, Tuple

import torch

from padim.files.digests import CHECKSUM_PLACEHOLDER, CHECKSUM_PREFIX, CHECKSUM_RE, checksum_of
from padim.errors import ModelFileError
from padim.files.atomic import atomic_write
from padim.files.safetensors_read import (DTYPES, MAX_HEADER_BYTES, ModelBytes, read_file, read_header,  # noqa: F401
                                          tensors_of)
from padim.files.headers import LAYOUT_KEY, check_fields, check_header
from padim.files.headers import layout_record as _layout_record

FORMAT_NAME = "padim"
FORMAT_VERSION = 2  # 2: the checksum is required (1: files from before it, loaded unchecked)
_METADATA_KEY = "padim"

CHECKSUM_KEY = "checksum"
# LAYOUT_KEY (padim.headers): what the tensors' shapes mean, written a second time beside the config: a
# header whose backbone, layers or input size was edited (even with a recomputed checksum) contradicts it.
_BLOCK = 16 << 20

_NAMES = {dtype: name for name, dtype in DTYPES.items()}


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
    header[CHECKSUM_KEY] = CHECKSUM_PLACEHOLDER  # the last key: replaced by the digest once known
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
    where = 8 + raw.rindex(CHECKSUM_PLACEHOLDER.encode())

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
        handle.seek(where + len(CHECKSUM_PREFIX))
        handle.write(digest.hexdigest().encode())

    atomic_write(path, write, ModelFileError, "model file")


# ----------------------------------------------------------------------------------------- loading
def read_metadata(path) -> dict:
    """A model file's padim metadata (its JSON header) as written, without reading any tensor or
    verifying the file: for tools that copy it (``padim.deploy.export``); ``load`` is the checked reader.
    ``path``: a path or ``ModelBytes``."""
    header, _ = read_header(path)
    raw = header.get("__metadata__", {}).get(_METADATA_KEY)
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a padim model (no padim metadata)")
    try:
        return json.loads(raw, parse_constant=_no_constant)
    except (json.JSONDecodeError, ValueError, RecursionError) as exc:
        raise ModelFileError(f"model file {path} has corrupted metadata ({exc})") from None


def load(path, expected_tensors: Dict[str, int]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reads a padim model file (a path, or its ``ModelBytes``). ``expected_tensors`` maps each
    required tensor name to its rank.

    The file is read into memory once (``read_file``); the checksum is of those bytes and the
    tensors are built from them, so what was checked is what is used, and changing or truncating
    the file afterwards changes nothing loaded from it.

    Raises ModelFileError naming the problem: missing, not a regular file, truncated or corrupted
    file (checksum), not a padim model, a newer format, or tensors missing or of the wrong rank. The
    header is checked against the file's size before the file is read (see ``read_header``).
    """
    source = read_file(path)
    path, data = source.path, source.data
    header, header_bytes = read_header(source)
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
        if not isinstance(stored, str) or not CHECKSUM_RE.fullmatch(stored):
            raise ModelFileError(f"model file {path} is corrupted (its checksum field is damaged)")
        if checksum_of(data, stored, 8 + header_bytes) != stored:
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
    return tensors_of(data, header, header_bytes), metadata


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
