"""``padim serve``: fitted models behind an HTTP API and a web page.

A thin shell over the library, as the CLI is: ``registry`` loads and names models, ``uploads`` reads
multipart bodies into memory and decodes them with padim's own image reader, ``batcher`` gathers
concurrent requests into one backbone batch, ``render`` draws the pictures, ``app`` holds the routes
and ``server`` runs uvicorn with a graceful stop. It needs the ``serve`` extra
(``pip install "padim[serve]"``: FastAPI, uvicorn, prometheus-client, python-multipart); nothing else
in padim imports this package.
"""

from padim.serve.app import ServeSettings, create_app
from padim.serve.registry import load_models

__all__ = ["ServeSettings", "create_app", "load_models"]
