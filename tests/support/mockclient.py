"""A `BinanceClient` in front of an httpx MockTransport: one call, what it returned or
raised, and the request reports it made (tests of the client's parsing and errors)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import httpx

from exporter.binance import errors
from exporter.binance.client import BinanceClient, RequestReport


def call_client(
    handler: Callable[[httpx.Request], httpx.Response],
    call: Callable[[BinanceClient], Awaitable[object]],
    *,
    timeout: float = 1.0,
) -> tuple[object, list[RequestReport]]:
    """`call(client)`'s result, or the BinanceError it raised, and the client's reports."""
    reports: list[RequestReport] = []

    async def go() -> object:
        client = BinanceClient(
            base_url="http://binance.test",
            timeout_seconds=timeout,
            recv_window_ms=5000,
            observer=reports.append,
            transport=httpx.MockTransport(handler),
        )
        try:
            return await call(client)
        except errors.BinanceError as exc:
            return exc
        finally:
            await client.aclose()

    return asyncio.run(go()), reports
