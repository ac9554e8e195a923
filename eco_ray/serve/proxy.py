"""What the Serve HTTP proxy runs before a request reaches the app, and after the app or the proxy answers.

- Headers a client may not set are dropped: ``x-request-timeout-seconds`` (0 would disable the operator's
  ``http_options.request_timeout_s``) and ``x-request-disconnect-disabled`` (a request would keep running
  after its client left).
- The body is capped in the proxy itself: Serve's proxy reads a client's body into memory as fast as the
  network delivers it, whatever the replica has read, so the replica's limit alone leaves the proxy's memory
  to the client. Past ``$ECO_RAY_PROXY_MAX_BODY_BYTES`` (by Content-Length at once, else counted as it
  arrives) the request ends with 413. Keep it above the Ingress's ``max_image_bytes`` (plus multipart
  overhead), which gives the finer answer.
- Every error the proxy makes itself (its timeout, backpressure, an unavailable app: plain text in Serve) is
  turned into the JSON body of the app's errors, ``{"error", "request_id"}``.

Serve's proxy loads these from ``RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH`` (``eco_ray.serve.proxy:middlewares``),
which must be in the environment of the cluster's processes: ``eco-ray serve`` sets it before it starts Ray,
the RayService manifest sets it in every pod. Pure ASGI, no eco-ray imports: the proxy stays light.
"""

from __future__ import annotations

import json
import os
import uuid

CALLBACK_ENV = "RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH"
CALLBACK = "eco_ray.serve.proxy:middlewares"
MAX_BODY_ENV = "ECO_RAY_PROXY_MAX_BODY_BYTES"
DEFAULT_MAX_BODY_BYTES = 16 * 2**20  # above the Ingress's default max_image_bytes (10 MB) plus multipart overhead
DROPPED = (b"x-request-timeout-seconds", b"x-request-disconnect-disabled")


def _max_body_bytes() -> int:
    value = os.environ.get(MAX_BODY_ENV, "")
    return int(value) if value.isdigit() else DEFAULT_MAX_BODY_BYTES


class ProxyGuard:
    """ASGI middleware for Serve's proxy: drops the headers a client may not set, caps the body, and gives
    the proxy's own errors a JSON body."""

    def __init__(self, app, max_body_bytes: int | None = None):
        self.app = app
        self.max_body_bytes = _max_body_bytes() if max_body_bytes is None else max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope.get("type") != "http":
            return await self.app(scope, receive, send)
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in DROPPED]
        scope = {**scope, "headers": headers}
        request_id = _header(headers, b"x-request-id") or uuid.uuid4().hex[:16]
        declared = _header(headers, b"content-length")
        if declared.isdigit() and int(declared) > self.max_body_bytes:
            return await _send_json(send, 413, self._too_large(), request_id)

        state = {"received": 0, "over": False, "started": False, "held": None, "body": [], "error": False}

        async def capped_receive():
            if state["over"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_body_bytes:
                    state["over"] = True  # the app sees the client leave: Serve cancels the request
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message):
            if state["over"] and not state["started"]:
                return  # the answer to a body past the cap is ours, sent when the app returns
            if message["type"] == "http.response.start":
                state["started"] = True
                if message["status"] >= 400 and b"json" not in _header(message.get("headers", []),
                                                                        b"content-type").encode():
                    state["held"] = message  # a plain-text error: rewritten once its body is complete
                    return
            elif message["type"] == "http.response.body" and state["held"] is not None:
                state["body"].append(message.get("body", b""))
                if message.get("more_body"):
                    return
                start, state["held"] = state["held"], None
                text = b"".join(state["body"]).decode("utf-8", "replace").strip()
                keep = [(k, v) for k, v in start.get("headers", [])
                        if k.lower() not in (b"content-type", b"content-length")]
                answered_id = _header(start.get("headers", []), b"x-request-id") or request_id
                return await _send_json(send, start["status"], text or "error", answered_id, keep)
            await send(message)

        try:
            await self.app(scope, capped_receive, guarded_send)
        except Exception:  # noqa: BLE001 - the proxy failed: the client still gets a JSON answer
            if state["started"] and state["held"] is None:
                raise  # a response is under way: nothing valid can follow it
            state["error"] = True
        # RequestIdMiddleware (inside this one) wrote the id Serve logs into the scope it was given
        request_id = _header(scope["headers"], b"x-request-id") or request_id
        if state["over"] and not state["started"]:
            await _send_json(send, 413, self._too_large(), request_id)
        elif state["held"] is not None:  # a held error whose body never completed
            await _send_json(send, state["held"]["status"], "error", request_id)
        elif not state["started"]:  # Serve's proxy sends nothing for some failures (a replica lost mid-call)
            await _send_json(send, 500 if state["error"] else 502, "the request could not be served",
                             request_id)

    def _too_large(self) -> str:
        return f"request body exceeds the proxy's limit of {self.max_body_bytes} bytes"


def _header(headers, name: bytes) -> str:
    for k, v in headers:
        if k.lower() == name:
            return v.decode("latin-1")
    return ""


async def _send_json(send, status: int, message: str, request_id: str, headers=()) -> None:
    body = json.dumps({"error": message, "request_id": request_id}).encode()
    headers = [h for h in headers if h[0].lower() != b"x-request-id"]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), (b"x-request-id", request_id.encode())]})
    await send({"type": "http.response.body", "body": body})


def middlewares() -> list:
    from starlette.middleware import Middleware

    return [Middleware(ProxyGuard)]
