"""Running the app under uvicorn, with a stop that loses nothing.

On SIGTERM (or Ctrl+C) uvicorn closes its listening socket (new connections are refused), lets
every request already accepted finish, closes idle connections, then runs the app's shutdown,
which drains the batchers. ``timeout_graceful_shutdown`` stays unset: an accepted request is
answered, however long its batch takes.

uvicorn re-raises the signal it caught once it has stopped, so that the previous handler runs. For
SIGTERM that would be the default action (death by signal, exit status 143) after a clean stop;
``run`` installs a handler that only notes the signal, so ``padim serve`` exits 0. This is the
command's own process-wide choice, made here and restored afterwards, never by the library.
"""

from __future__ import annotations

import signal
import sys
from typing import Mapping, Optional

import uvicorn

from padim.errors import PadimError
from padim.serve.app import ServeSettings, create_app
from padim.serve.registry import ServedModel


def run(models: Mapping[str, ServedModel], settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000,
        log_level: str = "warning") -> None:
    """Serves until SIGTERM/SIGINT; returns after a graceful stop. Raises PadimError when warm-up fails."""
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

    app = create_app(models, settings, on_ready)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=False,
                            timeout_graceful_shutdown=None, lifespan="on")
    server = uvicorn.Server(config)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: None)  # see the module docstring
    try:
        server.run()
    except SystemExit:  # uvicorn's answer to an address it cannot bind (it logged why)
        raise PadimError(f"could not listen on {host}:{port} (in use, or not an address of this machine)") from None
    finally:
        signal.signal(signal.SIGTERM, previous)
    if "error" in failure:
        raise PadimError(f"warm-up failed: {failure['error']}")
    metrics = app.state.service.metrics
    print(f"padim serve: stopped: {metrics.answered} of {metrics.accepted} accepted requests answered",
          file=sys.stderr, flush=True)
