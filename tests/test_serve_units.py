"""The Ray-free parts of serving: decoding and refusing what clients send, request controls, the proxy's
header filter. (tests/test_serve.py drives the same through real HTTP.)"""

import io

import numpy as np
import pytest
from PIL import Image

from eco_ray.serve.engine import InputError, Limits, RequestControl, decode_image


def encoded(fmt: str, size=(32, 24), mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, 128).save(buf, format=fmt)
    return buf.getvalue()


def test_only_png_jpeg_and_webp_are_decoded_whatever_the_declared_type():
    limits = Limits(10_000_000, 1_000_000)
    for fmt in ("PNG", "JPEG", "WEBP"):
        assert decode_image(encoded(fmt), "image/png", limits).shape == (24, 32, 3)
    for fmt in ("GIF", "TIFF", "BMP", "ICO", "PPM"):
        with pytest.raises(InputError) as e:
            decode_image(encoded(fmt), "image/png", limits)
        assert e.value.status == 415, fmt
    with pytest.raises(InputError) as e:
        decode_image(encoded("PNG"), "image/tiff", limits)
    assert e.value.status == 415


def test_pixels_are_counted_before_decoding():
    with pytest.raises(InputError) as e:  # 400 M pixels in a few kB: refused from the header
        decode_image(encoded("PNG", (20000, 20000), "1"), "image/png", Limits())
    assert e.value.status == 413
    with pytest.raises(InputError) as e:
        decode_image(encoded("PNG", (300, 300)), "image/png", Limits(10_000_000, 300 * 299))
    assert e.value.status == 413
    for bad, status in ((b"", 400), (encoded("PNG")[:40], 400), (b"\x89PNG\r\n\x1a\n" + bytes(100), 400),
                        (b"hello", 400)):
        with pytest.raises(InputError) as e:
            decode_image(bad, "image/png", Limits())
        assert e.value.status == status, bad[:12]


def test_request_controls():
    assert RequestControl.parse({}).budget is None
    c = RequestControl.parse({"max_gflops": "0.05"})
    assert str(c.budget) == "max_gflops=0.05"
    for params, status in (({"max_gflops": "abc"}, 422), ({"beta": "-1"}, 422), ({"exit": "2", "beta": "0.1"}, 422),
                           ({"max_gflops": "nan"}, 422), ({"max_gflops": "inf"}, 422)):
        with pytest.raises(InputError) as e:
            RequestControl.parse(params)
        assert e.value.status == status, params


def test_the_proxy_drops_the_clients_timeout_header():
    """Serve lets a client lift the operator's request timeout with x-request-timeout-seconds: 0; the proxy
    middleware (eco_ray/serve/proxy.py) removes the header before Serve reads it."""
    import asyncio

    from eco_ray.serve.proxy import DropClientTimeout, middlewares

    seen = {}

    async def app(scope, receive, send):
        seen.update(scope)

    scope = {"type": "http", "headers": [(b"x-request-timeout-seconds", b"0"), (b"content-type", b"image/png")]}
    asyncio.run(DropClientTimeout(app)(scope, None, None))
    assert seen["headers"] == [(b"content-type", b"image/png")]
    assert middlewares()[0].cls is DropClientTimeout
