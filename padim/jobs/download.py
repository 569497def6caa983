"""``padim download mvtec``: fetch MVTec AD from its official location, resumably, check its
SHA-256, and unpack only the categories asked for.

The archive (about 4.9 GB) is kept in the target folder, so other categories can be unpacked later
without downloading again. An interrupted download continues where it stopped (HTTP Range).
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

from tqdm import tqdm

from padim.files.digests import file_sha256
from padim.errors import PadimError


class DownloadError(PadimError):
    """The download failed, is offline, or its checksum does not match."""


@dataclass(frozen=True)
class Archive:
    url: str
    sha256: str
    filename: str


# The official MVTec AD archive (as published by MVTec, and used by anomalib's MVTecAD datamodule).
MVTEC_AD = Archive(
    url="https://www.mydrive.ch/shares/150996/b52ecdcbf521176e9db9c731f2304b27/"
        "download/420938113-1629960298/mvtec_anomaly_detection.tar.xz",
    sha256="cf4313b13603bec67abb49ca959488f7eedce2a9f7795ec54446c649ac98cd3d",
    filename="mvtec_anomaly_detection.tar.xz",
)
CHUNK = 1 << 20


def fetch(archive: Archive, folder: Path, timeout: float = 30.0) -> Path:
    """Downloads ``archive`` into ``folder`` (resuming a ``.part`` file) and checks its SHA-256."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / archive.filename
    if target.is_file():
        if file_sha256(target) == archive.sha256:
            return target
        target.unlink()  # damaged: fetch again
    partial = folder / (archive.filename + ".part")
    have = partial.stat().st_size if partial.exists() else 0
    request = urllib.request.Request(archive.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        if exc.code != 416:  # 416: nothing left to fetch, the .part file is complete
            raise DownloadError(f"download of {archive.url} failed: HTTP {exc.code} {exc.reason}") from None
        response = None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise DownloadError(f"cannot reach {archive.url} (offline? {reason}); nothing was downloaded") from None
    if response is not None:
        with response:
            resumed = have > 0 and response.status == 206
            length = int(response.headers.get("Content-Length") or 0)
            with open(partial, "ab" if resumed else "wb") as out, tqdm(
                total=(have if resumed else 0) + length or None, initial=have if resumed else 0,
                unit="B", unit_scale=True, desc=archive.filename, disable=None,
            ) as bar:
                try:
                    for block in iter(lambda: response.read(CHUNK), b""):
                        out.write(block)
                        bar.update(len(block))
                except (urllib.error.URLError, OSError) as exc:
                    raise DownloadError(f"download interrupted ({exc}); run the same command again to resume") from None
    digest = file_sha256(partial)
    if digest != archive.sha256:
        partial.unlink()
        raise DownloadError(f"checksum mismatch for {archive.filename}: got sha256 {digest}, expected "
                            f"{archive.sha256}; the damaged file was removed, run the command again")
    os.replace(partial, target)
    return target


def extract(archive_path: Path, folder: Path, categories: Optional[Sequence[str]]) -> List[str]:
    """Unpacks the top-level category folders named in ``categories`` (all when None) into ``folder``.
    Returns the categories unpacked. Members outside the target folder are refused."""
    with tarfile.open(archive_path) as tar:
        members = tar.getmembers()
        available = sorted({m.name.split("/")[0] for m in members if "/" in m.name})
        wanted = list(available) if categories is None else list(categories)
        unknown = [c for c in wanted if c not in available]
        if unknown:
            raise DownloadError(f"not in the archive: {', '.join(unknown)}; it has {', '.join(available)}")
        chosen = [m for m in members if m.name.split("/")[0] in wanted]
        kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        for member in tqdm(chosen, desc="unpack", unit="file", disable=None):
            if not (folder / member.name).resolve().is_relative_to(folder.resolve()):
                raise DownloadError(f"refusing archive member outside the target folder: {member.name}")
            tar.extract(member, folder, **kwargs)
    return wanted
