"""Model files: tensors in safetensors, everything else as JSON in the safetensors header.

Loading reads raw tensor bytes and JSON, never a pickle, so opening a model file cannot run code.
Saving writes a temporary file next to the target and renames it: a crash leaves the old file whole.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Dict, Tuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import ModelFileError

FORMAT_NAME = "padim"
FORMAT_VERSION = 1
_METADATA_KEY = "padim"


def save(path, tensors: Dict[str, torch.Tensor], metadata: dict) -> None:
    """Atomically writes ``tensors`` and ``metadata`` (JSON-serialisable) to ``path``."""
    path = Path(path)
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    header = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    contiguous = {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(contiguous, tmp, metadata={_METADATA_KEY: json.dumps(header)})
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path, expected_tensors: Dict[str, int]) -> Tuple[Dict[str, torch.Tensor], dict]:
    """Reads a padim model file. ``expected_tensors`` maps each required tensor name to its rank.

    Raises ModelFileError naming the problem: missing, truncated or corrupted file, not a padim model,
    a newer format, or tensors missing or of the wrong rank.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelFileError(f"model file {path} does not exist")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            raw = (handle.metadata() or {}).get(_METADATA_KEY)
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as exc:
        raise ModelFileError(
            f"model file {path} is truncated, corrupted or not a safetensors file ({exc})"
        ) from None
    if raw is None:
        raise ModelFileError(f"{path} is a safetensors file but not a padim model (no padim metadata)")
    try:
        metadata = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ModelFileError(f"model file {path} has corrupted metadata ({exc})") from None
    if metadata.get("format") != FORMAT_NAME:
        raise ModelFileError(f"{path} is not a padim model file")
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ModelFileError(
            f"model file {path} has format version {version}; this padim reads up to {FORMAT_VERSION}: upgrade padim"
        )
    for name, rank in expected_tensors.items():
        if name not in tensors:
            raise ModelFileError(f"model file {path} lacks the tensor {name!r}")
        if tensors[name].dim() != rank:
            raise ModelFileError(f"model file {path}: tensor {name!r} has rank {tensors[name].dim()}, expected {rank}")
    return tensors, metadata
