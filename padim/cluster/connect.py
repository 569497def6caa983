"""Connecting to a Ray cluster (the optional ``ray`` extra): by address, or a cluster of this machine.

Why a module: every Ray job (``padim fit --ray``, ``padim predict --ray``, ``padim benchmark --ray``)
starts the same way, and a missing extra or an unreachable address must be one line, not a traceback.

The library does not change the host process: ``connect`` only calls ``ray.init`` when Ray is not
initialised yet (a user who called ``ray.init`` themselves keeps their connection), and
``loopback_environment`` - which sets environment variables - is called by the command line only.
"""

from __future__ import annotations

import os
from typing import Optional

from padim.errors import PadimError, one_line

INSTALL_HINT = "pip install 'padim-inspect[ray]'"

# Ray reads these when it starts processes. Usage statistics would try to reach the internet; and on
# Linux Ray replaces a loopback node address by the machine's network address unless it believes it
# runs a single-machine (Windows/macOS style) cluster, so a "local" cluster would listen on the network.
# Token authentication (Ray >= 2.5x) is left off: otherwise a local ``ray.init`` writes ~/.ray/auth_token,
# and from then on every ``ray start`` of that user turns authentication on, which drivers given an
# explicit address do not follow (they are refused: "InvalidAuthToken").
LOOPBACK_ENVIRONMENT = {"RAY_USAGE_STATS_ENABLED": "0", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                        "RAY_AUTH_MODE": "disabled"}


def require_ray():
    """The ``ray`` module, or a PadimError saying how to install it."""
    try:
        import ray
    except ModuleNotFoundError:
        raise PadimError(f"--ray needs Ray, which is not installed: {INSTALL_HINT}") from None
    return ray


def is_loopback(address: Optional[str]) -> bool:
    """True for "local" and for an address on this machine's loopback (127.x.x.x, localhost, ::1):
    connecting to such a cluster needs ``loopback_environment`` set before Ray is imported, or Ray
    looks for it at the machine's network address."""
    if address is None or address == "local":
        return address == "local"
    address = address.split("://", 1)[-1]  # ray://HOST:PORT (Ray Client)
    host = address.rsplit(":", 1)[0].strip("[]") if ":" in address else address
    return host == "localhost" or host == "::1" or host.startswith("127.")


def loopback_environment() -> None:
    """Sets ``LOOPBACK_ENVIRONMENT`` in this process, before Ray is imported (the command line does,
    for ``--ray local`` and loopback addresses): a cluster it starts keeps every server on 127.0.0.1,
    reports nothing, and a driver can reach a cluster started on 127.0.0.1."""
    for key, value in LOOPBACK_ENVIRONMENT.items():
        os.environ.setdefault(key, value)


def connect(address: Optional[str], num_cpus: Optional[int] = None):
    """Connects this process to Ray and returns the ``ray`` module.

    address: "local" starts a cluster of this machine (on 127.0.0.1, no dashboard); "HOST:PORT" joins
             a running cluster (``ray start --head ...`` printed it); None uses the connection the
             caller made with ``ray.init``, or starts a local one when there is none.
    """
    ray = require_ray()
    if ray.is_initialized():
        return ray
    if address not in (None, "local") and is_loopback(address) and _swaps_loopback():
        # Ray on Linux would try the machine's network address instead, and wait minutes for it
        raise PadimError(f"to reach a Ray cluster at {address}, set RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 in the "
                         "environment before Python starts (the padim command does this itself)")
    if address not in (None, "local", "auto") and "://" not in address:
        _probe(address)
    quiet = dict(include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    try:
        if address in (None, "local"):
            ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", **quiet)
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise PadimError(f"cannot connect to the Ray cluster at {address}: {one_line(exc, typed=False)}") from None
    return ray


def require_ray_data():
    """The ``ray`` module with Ray Data and pyarrow (``padim predict --ray``), or a PadimError saying
    how to install them."""
    ray = require_ray()
    try:
        import pyarrow  # noqa: F401
        import ray.data  # noqa: F401
    except ModuleNotFoundError as exc:
        raise PadimError(f"--ray predict needs Ray Data ({exc.name} is missing): {INSTALL_HINT}") from None
    return ray


def cpus_in_cluster(ray) -> int:
    """CPUs the connected cluster offers (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def largest_node_cpus(ray) -> int:
    """CPUs of the cluster's largest live node: the most one task or actor can ask for."""
    cpus = [node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    return max(1, int(max(cpus, default=1)))


def check_task_cpus(ray, cpus: int, option: str) -> None:
    """Refuses a task size no node can run (Ray would wait for one forever, silently)."""
    largest = largest_node_cpus(ray)
    if cpus > largest:
        raise PadimError(f"{option} {cpus}: the largest node of the Ray cluster has {largest} CPUs, so no "
                         "task of that size could ever start")


def get(ray, refs):
    """``ray.get`` with one-line errors: a task's exception becomes a PadimError with the task's own
    message (not the worker's traceback); a lost worker, actor or object says so in one line."""
    from ray.exceptions import RayError, RayTaskError

    try:
        return ray.get(refs)
    except RayTaskError as exc:
        cause = getattr(exc, "cause", None)
        raise PadimError(f"on a Ray worker: {one_line(cause if cause is not None else exc)}") from None
    except RayError as exc:
        raise PadimError(f"the Ray job failed: {one_line(exc)}") from None


def _probe(address: str, timeout: float = 5.0) -> None:
    """One line, after at most ``timeout`` seconds, when nothing listens at HOST:PORT (Ray itself
    retries for about a minute, silently)."""
    import socket

    host, _, port = address.rpartition(":")
    if not port.isdigit() or not host:
        raise PadimError(f"--ray takes 'local' or HOST:PORT, got {address!r}")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=timeout):
            pass
    except OSError as exc:
        raise PadimError(f"cannot connect to the Ray cluster at {address}: {exc.strerror or exc}") from None


def _swaps_loopback() -> bool:
    """Whether this process's Ray replaces 127.0.0.1 by the machine's network address (its default on
    Linux; read when Ray was imported)."""
    from ray._private import ray_constants  # no public equivalent; only consulted, never changed

    return bool(ray_constants.ENABLE_RAY_CLUSTER)
