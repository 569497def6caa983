"""Starting ``padim serve`` as a real process on 127.0.0.1 for the browser and SIGTERM tests."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import padim

PACKAGE_ROOT = str(Path(padim.__file__).resolve().parents[1])  # the tree under test, not an installed copy


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str, timeout: float = 5.0):
    """-> (status, parsed JSON or text) for a GET; connection errors propagate."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            body = answer.read().decode()
            status = answer.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read().decode(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body


def serve_env(extra=None) -> dict:
    return dict(os.environ, PYTHONPATH=PACKAGE_ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra or {}))


def run_serve(args, env=None, timeout: float = 120.0):
    """``python -m padim.cli serve ARGS`` that is expected to stop by itself -> (exit status, stderr)."""
    done = subprocess.run([sys.executable, "-m", "padim.cli", "serve", *map(str, args)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, env=serve_env(env), timeout=timeout, check=False)
    return done.returncode, done.stderr.decode(errors="replace")


class Server:
    """``python -m padim.cli serve ARGS --port P`` with the tree under test; waits for /health."""

    def __init__(self, args, log_dir: Path, timeout: float = 120.0):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.stderr_path = log_dir / f"serve-{self.port}.log"
        env = serve_env()
        with open(self.stderr_path, "wb") as stderr:
            self.process = subprocess.Popen([sys.executable, "-m", "padim.cli", "serve", *map(str, args),
                                             "--host", "127.0.0.1", "--port", str(self.port)],
                                            stdout=subprocess.DEVNULL, stderr=stderr, env=env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"padim serve exited with {self.process.returncode}: {self.log()}")
            try:
                if get(self.url + "/health", 2)[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise AssertionError(f"padim serve was not ready after {timeout} s: {self.log()}")

    def log(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def stop(self) -> int:
        """SIGTERM (SIGKILL after 60 s) -> the exit status."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()
