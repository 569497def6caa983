"""``padim serve``: fitted models behind an HTTP API and a web page.

A thin shell over the library, as the CLI is: ``registry`` loads and names models, ``uploads`` reads
multipart bodies into memory and decodes them with padim's own image reader, ``batcher`` gathers
concurrent requests into one backbone batch, ``render`` draws the pictures, ``versions`` and
``reloader`` swap model versions live, ``monitoring`` feeds the drift alarms, the decision log and
the operators' feedback, ``service`` holds the state, ``app`` and ``routes_*`` the routes, and
``server`` runs uvicorn with a graceful stop. It needs the ``serve`` extra
(``pip install "padim-inspect[serve]"``: FastAPI, uvicorn, prometheus-client, python-multipart); nothing else
in padim imports this package but the CLI, and this file imports nothing eagerly, so that
``padim.serve.settings`` (the option checks) loads without the extra.
"""

__all__ = ["ServeSettings", "create_app", "load_models"]


def __getattr__(name):
    if name == "ServeSettings":
        from padim.serve.settings import ServeSettings

        return ServeSettings
    if name == "create_app":
        from padim.serve.app import create_app

        return create_app
    if name == "load_models":
        from padim.serve.registry import load_models

        return load_models
    raise AttributeError(f"module 'padim.serve' has no attribute {name!r}")
