"""A local Ray cluster started by the command dies with its driver (issue 20): the watchdog, tested
on a process tree like Ray's (a child that starts a grandchild which ignores SIGTERM), with the
driver killed by SIGKILL. The reference is the kernel's: /proc says whether each process still runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the watchdog reads /proc (Linux)")

DRIVER = textwrap.dedent("""
    import subprocess, sys, time
    from padim.cluster.watchdog import watch_local_cluster
    stubborn = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); time.sleep(600)"
    middle = subprocess.Popen([sys.executable, "-c",
                               "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', %r]); "
                               "time.sleep(600)" % stubborn])
    watch_local_cluster()
    print(middle.pid, flush=True)
    time.sleep(600)
""")


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except OSError:
        return False


def _children(pid: int):
    found = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as handle:
                    if int(handle.read().rsplit(")", 1)[1].split()[1]) == pid:
                        found.append(int(name))
            except (OSError, ValueError, IndexError):
                pass
    return found


def test_the_processes_of_a_killed_driver_are_stopped():
    driver = subprocess.Popen([sys.executable, "-c", DRIVER], stdout=subprocess.PIPE, text=True)
    middle, stubborn = None, []
    try:
        middle = int(driver.stdout.readline())
        deadline = time.monotonic() + 20
        while not _children(middle) and time.monotonic() < deadline:
            time.sleep(0.1)
        stubborn = _children(middle)
        assert stubborn, "the grandchild did not start"
        time.sleep(2.5)  # the watchdog notes the tree every second
        driver.kill()  # SIGKILL: the driver cleans nothing up
        driver.wait()
        deadline = time.monotonic() + 20
        while (_alive(middle) or any(map(_alive, stubborn))) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive(middle) and not any(map(_alive, stubborn))
    finally:  # whatever happened, nothing of this test outlives it
        for pid in [driver.pid, middle, *stubborn]:
            try:
                if pid is not None:
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
