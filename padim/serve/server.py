"""Running the app under uvicorn, with a stop that loses nothing.

On SIGTERM (or Ctrl+C) uvicorn closes its listening socket (new connections are refused), lets
every request already accepted finish, closes idle connections, then runs the app's shutdown,
which drains the batchers. ``timeout_graceful_shutdown`` stays unset: an accepted request is
answered, however long its batch takes.

uvicorn re-raises the signal it caught once it has stopped, so that the previous handler runs. For
SIGTERM that would be the default action (death by signal, exit status 143) after a clean stop;
``run`` installs a handler that only notes the signal, so ``padim serve`` exits 0. This is the
command's own process-wide choice, made here and restored afterwards, never by the library.

The address is bound (and listened on) before the models warm up, and the socket handed to uvicorn:
a port out of range, taken, or not of this machine is one line before anything is announced, and
"ready" is only printed once connections are being accepted. Port 0 takes a free port; the ready
line names it.
"""

from __future__ import annotations

import errno
import signal
import socket
import sys
from typing import Mapping, Optional

import uvicorn

from padim.errors import PadimError
from padim.serve.app import ServeSettings, create_app
from padim.serve.registry import ServedModel
from padim.serve.versions import ModelSource


def listen(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A socket bound to host:port and listening (as uvicorn binds one). Raises PadimError, one line."""
    if not 0 <= port <= 65535:
        raise PadimError(f"`port` must be between 1 and 65535 (0: any free port), got {port}")
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if isinstance(exc, socket.gaierror):
            raise PadimError(f"cannot listen on {host}: {exc.strerror or exc}") from None
        reason = {errno.EADDRINUSE: f"port {port} on {host} is in use",
                  errno.EADDRNOTAVAIL: f"cannot listen on {host}:{port}: not an address of this machine",
                  errno.EACCES: f"cannot listen on {host}:{port}: permission denied (ports below 1024 need privileges)",
                  }.get(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
        raise PadimError(reason) from None
    return sock


def run(models: Mapping[str, ServedModel], settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "warning", source: Optional[ModelSource] = None) -> None:
    """Serves until SIGTERM/SIGINT; returns after a graceful stop. Raises PadimError when warm-up fails.
    With ``source``, its model files are watched and new versions swapped in (``create_app``)."""
    failure = {}
    server: Optional[uvicorn.Server] = None

    def on_ready(error: Optional[str]) -> None:
        if error:
            failure["error"] = error
            server.should_exit = True
            return
        names = ", ".join(sorted(models))
        print(f"padim serve: ready: {names} on http://{host}:{port} (page at /, API docs at /docs)",
              file=sys.stderr, flush=True)

    app = create_app(models, settings, on_ready, source)
    sock = listen(host, port)  # before warm-up: nothing is announced on an address that cannot be had
    port = sock.getsockname()[1]  # the one chosen for port 0
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on")
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # see the module docstring
    try:
        server.run(sockets=[sock])
    except SystemExit:  # uvicorn's answer to a start-up that failed (it logged why)
        raise PadimError("the service failed to start (the lines above say why)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
        sock.close()
    if "error" in failure:
        raise PadimError(f"warm-up failed: {failure['error']}")
    metrics = app.state.service.metrics
    print(f"padim serve: stopped: {metrics.answered} of {metrics.accepted} accepted requests answered",
          file=sys.stderr, flush=True)
