"""Requests and responses as the endpoints see them, from h11's events, and the bytes of
a closing answer."""

from __future__ import annotations

from dataclasses import dataclass

import h11

REASONS = {
    200: "OK",
    400: "Bad Request",
    500: "Internal Server Error",
    401: "Unauthorized",
    404: "Not Found",
    405: "Method Not Allowed",
    429: "Too Many Requests",
    431: "Request Header Fields Too Large",
    503: "Service Unavailable",
}


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    #: header names lower-case; repeated headers joined with ", "
    headers: dict[str, str]
    #: the peer's address (no port); "" when unknown
    peer: str = ""


@dataclass
class Response:
    status: int
    headers: list[tuple[str, str]]
    body: list[bytes]


def text_response(status: int, text: str, *headers: tuple[str, str]) -> Response:
    """A plain-text response (every error is one)."""
    return Response(
        status, [("Content-Type", "text/plain; charset=utf-8"), *headers], [text.encode()]
    )


def refusal(status: int) -> Response:
    """The answer to a request that could not be parsed (400, 431)."""
    return text_response(status, f"{REASONS[status].lower()}\n")


def raw_response(
    request: Request | None, response: Response, extra: list[tuple[str, str]]
) -> bytes:
    """`response` as bytes, with `Connection: close` (the connection closes after it)."""
    body = b"".join(response.body)
    lines = [f"HTTP/1.1 {response.status} {REASONS.get(response.status, '')}"]
    lines += [f"{name}: {value}" for name, value in (*response.headers, *extra)]
    lines += [f"Content-Length: {len(body)}", "Connection: close", "", ""]
    head = "\r\n".join(lines).encode("latin-1")
    return head if request is not None and request.method == "HEAD" else head + body


def header_bytes(event: h11.Request) -> int:
    """The size of the request line and headers as sent (give or take whitespace)."""
    size = len(event.method) + len(event.target) + len("  HTTP/1.1\r\n\r\n")
    return size + sum(len(name) + len(value) + 4 for name, value in event.headers)


def to_request(event: h11.Request, peer: str) -> Request:
    headers: dict[str, str] = {}
    for name, value in event.headers:
        key = name.decode("ascii", "replace")
        text = value.decode("latin-1")
        headers[key] = f"{headers[key]}, {text}" if key in headers else text
    target = event.target.decode("latin-1")
    return Request(event.method.decode("ascii", "replace"), target.split("?")[0], headers, peer)
