"""A real Ray cluster on this machine for the ``--ray`` tests: loopback only, stopped after the session.

``ray start --head --node-ip-address 127.0.0.1 --port FREE --num-cpus 2 --include-dashboard false
--disable-usage-stats`` with ``RAY_USAGE_STATS_ENABLED=0`` (and ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``,
without which Ray on Linux swaps 127.0.0.1 for the machine's network address), in its own temporary
folder. Stopping kills only this cluster's processes (found by that folder in their command lines),
never another cluster of the same machine, as ``ray stop`` would.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import padim
from padim.cluster.connect import LOOPBACK_ENVIRONMENT

PACKAGE_ROOT = str(Path(padim.__file__).resolve().parents[1])  # the tree under test, not an installed copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def loopback_env() -> dict:
    """This environment + loopback-only Ray settings; its workers import the padim under test."""
    env = dict(os.environ)
    env.update(LOOPBACK_ENVIRONMENT)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [PACKAGE_ROOT, env.get("PYTHONPATH")]))
    return env


class LocalCluster:
    """One head node with ``num_cpus`` CPUs; ``address`` is "127.0.0.1:PORT"."""

    def __init__(self, num_cpus: int = 2):
        # short: Ray's unix socket paths live below it and must stay under 108 characters
        self.folder = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        command = ["ray", "start", "--head", "--node-ip-address", "127.0.0.1", "--port", str(self.port),
                   "--num-cpus", str(num_cpus), "--include-dashboard", "false", "--disable-usage-stats",
                   "--object-store-memory", str(500 << 20), "--temp-dir", str(self.folder)]
        done = subprocess.run(command, env=loopback_env(), capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            self.stop()
            raise RuntimeError(f"ray start failed: {done.stderr[-2000:]}")

    def processes(self):
        """PIDs of this cluster's processes: those whose command lines name its folder, and their
        descendants (workers rename themselves "ray::...")."""
        found, parents = set(), {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
            if str(self.folder) in cmdline:
                found.add(int(entry.name))
        grew = True
        while grew:
            children = {pid for pid, parent in parents.items() if parent in found} - found
            found |= children
            grew = bool(children)
        return sorted(found)

    def stop(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            pids = self.processes()
            for pid in pids:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + (2 if sig == signal.SIGTERM else 10)  # gcs_server and raylet ignore SIGTERM
            while pids and time.time() < deadline and self.processes():
                time.sleep(0.2)
        shutil.rmtree(self.folder, ignore_errors=True)
