"""What the Serve HTTP proxy runs before a request reaches the app: Serve lets a client set its own request
timeout with the ``x-request-timeout-seconds`` header, and a value of 0 disables the timeout the operator set
(``http_options.request_timeout_s``). The header is dropped here, so the operator's timeout holds.

Serve's proxy loads these from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``eco_ray.serve.proxy:middlewares``),
which must be in the environment of the cluster's processes: ``eco-ray serve`` sets it before it starts Ray,
the RayService manifest sets it in every pod.
"""

from __future__ import annotations

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "eco_ray.serve.proxy:middlewares"
DROPPED = (b"x-request-timeout-seconds",)


class DropClientTimeout:
    """ASGI middleware: the request goes on without the headers a client may not set."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope.get("type") == "http":
            scope = {**scope, "headers": [(k, v) for k, v in scope.get("headers", []) if k.lower() not in DROPPED]}
        await self.app(scope, receive, send)


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(DropClientTimeout)]
