"""What the commands share: messages on stderr, input paths, process-wide choices the command (never
the library) makes, connecting to Ray."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import List

def stderr(message: str) -> None:
    print(message, file=sys.stderr)


def expand_paths(paths: List[Path]) -> List[Path]:
    """Files as given; folders -> their image files, subfolders included (``pipeline.sources``)."""
    from padim.pipeline.sources import expand_paths as expand

    return expand(paths, note=stderr)


def tune_malloc() -> None:
    """The command's processes score batch after batch: fixed malloc thresholds make that 20-30 %
    faster on Linux (see padim.files.memory.tune_malloc_for_scoring; PADIM_KEEP_MALLOC=1 turns it off)."""
    from padim.files.memory import tune_malloc_for_scoring

    tune_malloc_for_scoring()


def ray_cluster(address: str):
    """``--ray ADDRESS``: connected now (one line if it cannot be), so a wrong address fails before work.
    'local' starts a cluster of this machine that listens on 127.0.0.1 only and reports nothing; a
    loopback address needs the same environment (set here, before Ray is imported)."""
    from padim.cluster.connect import connect, is_loopback, loopback_environment

    if is_loopback(address):
        loopback_environment()
    ray = connect(address)
    if address == "local":
        from padim.cluster.watchdog import watch_local_cluster

        watch_local_cluster()  # the cluster this command started dies with it, kill -9 included
    return ray


def require_ray(address: str) -> None:
    """Refuses --ray without the extra, in one line; for a loopback cluster, sets its environment
    first (Ray reads it when imported)."""
    from padim.cluster.connect import is_loopback, loopback_environment, require_ray

    if is_loopback(address):
        loopback_environment()
    require_ray()
