"""Stopping a local Ray cluster with its driver: when ``padim ... --ray local`` is killed (kill -9, a
lost terminal), the Ray processes it started must not live on.

Ray ties its direct children to the driver, but the processes those start (agents, workers) can
outlive it, and some ignore SIGTERM. ``watch_local_cluster`` starts a small watchdog process in a
session of its own: while the driver lives, it notes every process descended from it (pid and start
time, from /proc, every second); when the driver is gone, it sends SIGTERM, then SIGKILL, to those
still running with the same start time (never to a process that merely reused a pid), and exits.
Linux only (elsewhere it does nothing). The command calls it, never the library.
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Optional

_WATCHDOG = r'''
import os, signal, sys, time

driver, me = int(sys.argv[1]), os.getpid()

def table():
    found = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    fields = handle.read().rsplit(")", 1)[1].split()
                found[int(name)] = (int(fields[1]), fields[19])  # ppid, start time
            except (OSError, IndexError, ValueError):
                pass
    return found

def descendants(root, found):
    children = {}
    for pid, (ppid, _) in found.items():
        children.setdefault(ppid, []).append(pid)
    out, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out

first = table()
start = first.get(driver, (None, None))[1]
known = {}
while True:
    found = table()
    if found.get(driver, (None, None))[1] != start or start is None:
        break
    for pid in descendants(driver, found) - {me}:
        known[pid] = found[pid][1]
    time.sleep(1.0)
for sig in (signal.SIGTERM, signal.SIGKILL):
    found = table()
    alive = [pid for pid, began in known.items() if found.get(pid, (None, None))[1] == began]
    if not alive:
        break
    for pid in alive:
        try:
            os.kill(pid, sig)
        except OSError:
            pass
    time.sleep(2.0)
'''


def watch_local_cluster(driver_pid: Optional[int] = None) -> Optional[subprocess.Popen]:
    """Starts the watchdog of this process's local Ray cluster (see the module docstring); None where
    /proc is not there. The watchdog exits by itself once the driver is gone and its processes too."""
    if not sys.platform.startswith("linux") or not os.path.isdir("/proc"):
        return None
    return subprocess.Popen([sys.executable, "-c", _WATCHDOG, str(driver_pid or os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
