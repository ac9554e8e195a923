"""The HTTP side of the ingress, apart from the deployment classes (Serve ships those to replicas by value):
reading a body under a limit, and the JSON error every non-2xx answer carries."""

from __future__ import annotations

import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from eco_ray.serve.engine import InputError, Limits

MULTIPART_OVERHEAD = 64 * 1024  # part headers and boundaries around the image in a multipart body
RETRY_AFTER_S = 2


def error_response(status: int, message: str, request_id: str | None = None,
                   retry_after: float | None = None) -> JSONResponse:
    """The body of every non-2xx answer: ``{"error", "request_id"}`` (and Retry-After where retrying helps)."""
    headers = {"Retry-After": str(int(retry_after))} if retry_after else None
    return JSONResponse({"error": message, "request_id": request_id or uuid.uuid4().hex[:16]}, status_code=status,
                        headers=headers)


async def read_image_body(request: Request, limits: Limits) -> tuple[bytes, str]:
    """(image bytes, content type) of a raw or multipart body, counted as it streams in: a body past the limit
    is refused (413) as soon as it gets there, whatever its Content-Length says or whether it has one."""
    from starlette.formparsers import MultiPartException, MultiPartParser

    ctype = request.headers.get("content-type", "")
    multipart = ctype.startswith("multipart/form-data")
    limit = limits.max_image_bytes + (MULTIPART_OVERHEAD if multipart else 0)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise InputError(413, f"request of {declared} bytes exceeds the limit of {limits.max_image_bytes} bytes")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise InputError(413, f"request body exceeds the limit of {limits.max_image_bytes} bytes")
        chunks.append(chunk)
    body = b"".join(chunks)
    if not multipart:
        return body, ctype

    async def replay():
        yield body

    try:
        form = await MultiPartParser(request.headers, replay(), max_files=1, max_fields=8,
                                     max_part_size=limits.max_image_bytes).parse()
    except MultiPartException as e:
        raise InputError(400, f"malformed multipart body: {e.message}") from None
    except Exception as e:  # noqa: BLE001 - the parser's other failures on garbage input
        raise InputError(400, f"malformed multipart body: {type(e).__name__}") from None
    try:
        part = form.get("file")
        if part is None or not hasattr(part, "read"):
            raise InputError(400, "multipart body without a 'file' part")
        return await part.read(), part.content_type or ""
    finally:
        await form.close()  # the parser's spooled temp files
