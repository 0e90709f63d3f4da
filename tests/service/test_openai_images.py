"""Remote image URLs of the OpenAI-compatible API against a real HTTP server on
127.0.0.1: fetched only from a listed host, without following redirects, within the
size limit and the timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from aiohttp import web

from hero_core.errors import InvalidInputError
from services.vision.config import VisionConfig
from services.vision.openai.images import image_input

IMAGE = b"\x89PNG\r\n\x1a\n" + bytes(200)


async def serving(scenario: Callable[[str], Awaitable[Any]]) -> Any:
    """Run `scenario(base URL)` while a server on 127.0.0.1 answers /image, /redirect,
    /missing, /big (no length given), /slow."""
    async def image(_: web.Request) -> web.StreamResponse:
        return web.Response(body=IMAGE, content_type="image/png")

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(64):
            await response.write(bytes(1024))
        return response

    async def slow(_: web.Request) -> web.StreamResponse:
        await asyncio.sleep(2.5)
        return web.Response(body=IMAGE)

    async def redirect(_: web.Request) -> web.StreamResponse:
        raise web.HTTPFound("/image")

    app = web.Application()
    app.add_routes([web.get("/image", image), web.get("/big", big), web.get("/slow", slow),
                    web.get("/redirect", redirect)])
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        return await scenario(f"http://127.0.0.1:{port}")
    finally:
        await runner.cleanup()


def config(base: str, **values: Any) -> VisionConfig:
    host = base.removeprefix("http://")
    return VisionConfig.load(values={"allow_unauthenticated": True,
                                     "openai": {"image_url_hosts": [host],
                                                "image_fetch_timeout_s": 1.0},
                                     **values})


def test_an_image_from_a_listed_host_is_fetched():
    async def scenario(base: str) -> Any:
        return await image_input(f"{base}/image", config(base))
    assert asyncio.run(serving(scenario)).data == IMAGE


@pytest.mark.parametrize("path, values, words", [
    ("/redirect", {}, "answered HTTP 302"),
    ("/missing", {}, "answered HTTP 404"),
    ("/big", {"max_image_bytes": 10_000}, "larger than max_image_bytes=10000"),
    ("/image", {"max_image_bytes": 100}, "above max_image_bytes=100"),
    ("/slow", {}, "within 1 s"),
])
def test_a_fetch_that_is_not_a_small_image_at_once_is_refused(path, values, words):
    async def scenario(base: str) -> str:
        with pytest.raises(InvalidInputError) as info:
            await image_input(base + path, config(base, **values))
        return str(info.value)
    assert words in asyncio.run(serving(scenario))


def test_the_same_server_is_refused_unless_listed():
    async def scenario(base: str) -> str:
        settings = VisionConfig.load(values={"allow_unauthenticated": True})
        with pytest.raises(InvalidInputError) as info:
            await image_input(f"{base}/image", settings)
        return str(info.value)
    assert "image_url_hosts does not list it" in asyncio.run(serving(scenario))
