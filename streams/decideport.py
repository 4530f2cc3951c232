"""A lean HTTP/1.1 server for ``POST /decide`` alone, on its own port (``ADPULSE_DECIDE_PORT``).

Why: on the web port a decision goes through Faust's aiohttp application (its
request and response objects, middleware, router, streaming payload reader and
writer); py-spy put that at about an eighth of a saturated worker's samples, and
measured apart (docs/decide.md) aiohttp's server cost several times the CPU per
request of this one. Here a request is parsed from the connection's buffer with
``bytes.find`` and ``split`` (a decision request is one small head and one small
body) and answered with one ``transport.write``.

What it keeps of HTTP/1.1: keep-alive (HTTP/1.0 and ``Connection: close`` close
after the answer), pipelined requests answered in order, heads and bodies split
across reads, ``Expect: 100-continue``, ``Content-Length`` bodies (over
``MAX_BODY`` → 413 and close). What it refuses, with a one-line body and a close:
a malformed head (400), ``Transfer-Encoding`` (411: send ``Content-Length``), a
head over ``MAX_HEAD``. Any other path is 404, another method 405. A connection
idle for ``IDLE_S`` (or stuck in a partial request that long) is closed. A client
that goes away mid-request does not cancel its request: a decision already queued
is made and logged like any other (as on aiohttp, whose handlers are not
cancelled either), its answer dropped.

Framework-free (asyncio only): ``serve`` is given the handler that decides, so the
protocol is unit-tested over real sockets without a worker.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from email.utils import formatdate

log = logging.getLogger(__name__)

MAX_HEAD = 16 * 1024  # bytes of request line and headers (aiohttp's limit is 8190 a line)
MAX_BODY = 1024 * 1024  # as the web port's aiohttp (client_max_size)
IDLE_S = 75.0  # aiohttp's keep-alive timeout
PATH = b"/decide"

# (body, headers with lower-case names) -> (status, body, extra headers).
Handler = Callable[[bytes, dict[str, str]], Awaitable[tuple[int, bytes, dict[str, str]]]]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found",
            405: "Method Not Allowed", 411: "Length Required", 413: "Payload Too Large",
            500: "Internal Server Error", 503: "Service Unavailable"}  # fmt: skip
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class _Clock:
    """The ``Date`` header, formatted once a second rather than once an answer."""

    def __init__(self) -> None:
        self.second = -1
        self.value = b""

    def date(self) -> bytes:
        now = int(time.time())
        if now != self.second:
            self.second, self.value = now, formatdate(now, usegmt=True).encode()
        return self.value


_clock = _Clock()


def response(status: int, body: bytes, headers: dict[str, str], close: bool) -> bytes:
    head = [f"HTTP/1.1 {status} {_REASONS.get(status, 'Unknown')}".encode(),
            b"Content-Type: application/json", b"Content-Length: " + str(len(body)).encode(),
            b"Date: " + _clock.date()]  # fmt: skip
    head += [f"{k}: {v}".encode() for k, v in headers.items()]
    if close:
        head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


class BadRequest(Exception):
    """A request this server will not read further: answered with ``status``, then closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def parse_head(head: bytes) -> tuple[bytes, bytes, bool, dict[str, str]]:
    """Method, path (query left off), HTTP/1.1 or not, headers (names lower-cased)."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[0].isalpha() or not parts[1].startswith(b"/"):
        raise BadRequest(400, "malformed request line")
    method, target, version = parts
    if version == b"HTTP/1.1":
        v11 = True
    elif version == b"HTTP/1.0":
        v11 = False
    else:
        raise BadRequest(400, "only HTTP/1.0 and HTTP/1.1 are served")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(b":")
        if not sep or not name or name != name.strip() or b" " in name or b"\t" in name:
            raise BadRequest(400, "malformed header line")
        key = name.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        if key in headers:
            if key == "content-length" and headers[key] != text:
                raise BadRequest(400, "conflicting Content-Length headers")
            if key != "content-length":
                headers[key] = f"{headers[key]}, {text}"
            continue
        headers[key] = text
    return method, target.partition(b"?")[0], v11, headers


def body_length(headers: dict[str, str]) -> int:
    if "transfer-encoding" in headers:
        raise BadRequest(411, "Transfer-Encoding is not served here: send Content-Length")
    text = headers.get("content-length", "0")
    if not text.isdigit() or not text.isascii():
        raise BadRequest(400, "malformed Content-Length")
    length = int(text)
    if length > MAX_BODY:
        raise BadRequest(413, f"body over {MAX_BODY} bytes")
    return length


class DecideProtocol(asyncio.Protocol):
    """One connection: requests parsed from ``buf`` and answered one at a time, in order."""

    def __init__(self, handler: Handler, conns: set[DecideProtocol]) -> None:
        self.handler = handler
        self.conns = conns
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.busy = False  # a request is being answered: the next waits in buf
        self.closing = False
        self.reading = True
        self.continued = False  # "100 Continue" already sent for the request in buf
        self.active = time.monotonic()
        self.task: asyncio.Task[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.conns.discard(self)
        self.closing = True

    def pause_writing(self) -> None:
        """The client does not read its answers: stop reading its requests."""
        self._pause()

    def resume_writing(self) -> None:
        self._resume()

    def _pause(self) -> None:
        if self.reading and self.transport is not None:
            self.transport.pause_reading()
            self.reading = False

    def _resume(self) -> None:
        if not self.reading and self.transport is not None and not self.closing:
            self.transport.resume_reading()
            self.reading = True

    def data_received(self, data: bytes) -> None:
        self.active = time.monotonic()
        self.buf += data
        if not self.busy:
            self._next()
        if len(self.buf) > MAX_HEAD + MAX_BODY:  # pipelined faster than answered
            self._pause()

    def _next(self) -> None:
        """Start answering the first complete request in ``buf``, if there is one."""
        if self.closing:
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > MAX_HEAD:
                self._refuse(BadRequest(400, f"request head over {MAX_HEAD} bytes"))
            return
        try:
            method, path, v11, headers = parse_head(bytes(self.buf[:end]))
            length = body_length(headers)
        except BadRequest as exc:
            self._refuse(exc)
            return
        start = end + 4
        if len(self.buf) < start + length:  # the body is still on its way
            if not self.continued and headers.get("expect", "").lower() == "100-continue":
                self.continued = True
                self._write(_CONTINUE)
            return
        body = bytes(self.buf[start : start + length])
        del self.buf[: start + length]
        self.continued = False
        connection = headers.get("connection", "").lower()
        close = "close" in connection if v11 else "keep-alive" not in connection
        self.busy = True
        self._resume()
        if path != PATH:
            self._answer(404, b'{"error": "not found: this port serves POST /decide"}', {}, close)
        elif method != b"POST":
            self._answer(405, b'{"error": "POST only"}', {"Allow": "POST"}, close)
        else:
            self.task = asyncio.get_running_loop().create_task(self._decide(body, headers, close))

    async def _decide(self, body: bytes, headers: dict[str, str], close: bool) -> None:
        try:
            status, out, extra = await self.handler(body, headers)
        except Exception:  # the caller gets an answer, never a hang
            log.exception("POST /decide failed")
            status, out, extra = 500, b'{"error": "internal error"}', {}
        self._answer(status, out, extra, close)

    def _answer(self, status: int, body: bytes, headers: dict[str, str], close: bool) -> None:
        self._write(response(status, body, headers, close))
        self.busy = False
        self.task = None
        if close:
            self._close()
        elif self.buf:
            self._next()

    def _refuse(self, exc: BadRequest) -> None:
        body = b'{"error": "' + str(exc).encode() + b'"}'
        self._write(response(exc.status, body, {}, close=True))
        self._close()

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self) -> None:
        self.closing = True
        self.buf.clear()
        if self.transport is not None:
            self.transport.close()  # after what was written is flushed

    def idle(self, now: float) -> bool:
        return not self.busy and now - self.active > IDLE_S


class DecideServer:
    """The listening socket and its connections; ``close`` ends both."""

    def __init__(self, server: asyncio.Server, conns: set[DecideProtocol]) -> None:
        self.server = server
        self.conns = conns
        self._sweeper = asyncio.get_running_loop().create_task(self._sweep())

    @property
    def port(self) -> int:
        return int(self.server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Close connections idle (or stuck mid-request) for IDLE_S: one timer for all of
        them instead of one rearmed per request."""
        while True:
            await asyncio.sleep(IDLE_S / 5)
            now = time.monotonic()
            for conn in [c for c in self.conns if c.idle(now)]:
                conn._close()

    async def close(self) -> None:
        self._sweeper.cancel()
        self.server.close()
        for conn in list(self.conns):
            conn._close()
        await self.server.wait_closed()


async def serve(handler: Handler, host: str, port: int) -> DecideServer:
    """Listen on ``host:port`` (0: any free port) and answer ``POST /decide`` with ``handler``."""
    loop = asyncio.get_running_loop()
    conns: set[DecideProtocol] = set()
    server = await loop.create_server(
        lambda: DecideProtocol(handler, conns), host, port, reuse_address=True, backlog=1024
    )
    return DecideServer(server, conns)
