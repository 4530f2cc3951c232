"""A lean HTTP/1.1 keep-alive client for load generators: a pool of asyncio protocols.

Why not aiohttp's client: ``bench serve`` runs the load generator on the same two cores
as the worker and the broker, and at 1,000 requests/s aiohttp's ``ClientSession`` took a
third of a core (request and response objects, header multidicts, a streaming payload
reader per answer): CPU the worker under test did not get. Here a request is one prebuilt
``bytes`` written in one call, and an answer is read from the connection's buffer with
``bytes.find``: the same requests on the same connections, at a fraction of the CPU.

What is kept from the ``aiohttp.TCPConnector(limit=N)`` it replaces: at most ``limit``
connections, each kept alive and reused (a request waits, in order, for one to be free
when all are busy; a new one is opened while fewer are open, its connect time counted in
that request's latency), a total timeout per request. Answers need ``Content-Length``
(both adpulse servers send it); anything else is a :class:`ClientError`.
"""

from __future__ import annotations

import asyncio
import collections


class ClientError(Exception):
    """The request got no usable answer (connection refused or lost, malformed answer)."""


class _Conn(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.waiter: asyncio.Future[tuple[int, bytes, bool]] | None = None
        self.alive = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(ClientError(f"connection lost: {exc!r}"))

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.waiter is None or self.waiter.done():
            return
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self.buf[:end]).lower()
        at = head.find(b"\r\ncontent-length:")
        if not head.startswith(b"http/1.") or at < 0:
            self.waiter.set_exception(ClientError(f"unusable answer: {head[:80]!r}"))
            self.close()
            return
        eol = head.find(b"\r\n", at + 2)
        try:
            length = int(head[at + 17 : eol if eol >= 0 else len(head)])
            status = int(head[9:12])
        except ValueError:
            self.waiter.set_exception(ClientError(f"unusable answer: {head[:80]!r}"))
            self.close()
            return
        start = end + 4
        if len(self.buf) < start + length:
            return
        body = bytes(self.buf[start : start + length])
        del self.buf[: start + length]
        self.waiter.set_result((status, body, b"\r\nconnection: close" not in head))

    def send(self, raw: bytes) -> asyncio.Future[tuple[int, bytes, bool]]:
        assert self.transport is not None
        self.waiter = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.waiter

    def close(self) -> None:
        self.alive = False
        if self.transport is not None:
            self.transport.close()


class Pool:
    """Keep-alive connections to one ``host:port``; ``headers`` go with every request."""

    def __init__(self, host: str, port: int, limit: int, headers: dict[str, str]) -> None:
        self.host, self.port, self.limit = host, port, limit
        self.extra = "".join(f"{k}: {v}\r\n" for k, v in headers.items()).encode()
        self.host_header = f"Host: {host}:{port}\r\n".encode()
        self.idle: list[_Conn] = []
        self.open = 0
        self.waiting: collections.deque[asyncio.Future[_Conn | None]] = collections.deque()

    def build(self, method: str, path: str, body: bytes = b"") -> bytes:
        """The request's bytes, to build before the clock starts."""
        length = f"Content-Length: {len(body)}\r\n".encode() if body or method == "POST" else b""
        ctype = b"Content-Type: application/json\r\n" if body else b""
        head = f"{method} {path} HTTP/1.1\r\n".encode() + self.host_header + self.extra
        return head + ctype + length + b"\r\n" + body

    async def request(self, raw: bytes, timeout_s: float) -> tuple[int, bytes]:
        """Send one prebuilt request; its status and body. ClientError or TimeoutError."""
        conn = await self._acquire()
        loop = asyncio.get_running_loop()
        try:
            if conn is None:
                conn = await self._connect()
            fut = conn.send(raw)
            timer = loop.call_later(timeout_s, _expire, fut)
            try:
                status, body, keep = await fut
            finally:
                timer.cancel()
        except BaseException:
            if conn is not None:
                conn.close()
            self._release(None)
            raise
        self._release(conn if keep and conn.alive else None)
        return status, body

    async def _connect(self) -> _Conn:
        loop = asyncio.get_running_loop()
        try:
            _, conn = await loop.create_connection(_Conn, self.host, self.port)
        except OSError as exc:
            msg = f"cannot connect to {self.host}:{self.port}: {exc}"
            raise ClientError(msg) from None
        return conn

    async def _acquire(self) -> _Conn | None:
        """A free connection; None: open one (a slot is held for it)."""
        while self.idle:
            conn = self.idle.pop()
            if conn.alive:
                return conn
            self.open -= 1
        if self.open < self.limit:
            self.open += 1
            return None
        fut: asyncio.Future[_Conn | None] = asyncio.get_running_loop().create_future()
        self.waiting.append(fut)
        return await fut

    def _release(self, conn: _Conn | None) -> None:
        """Hand the connection (None: its slot, the connection closed) to the next waiter."""
        while self.waiting:
            fut = self.waiting.popleft()
            if not fut.done():
                fut.set_result(conn)
                return
        if conn is None:
            self.open -= 1
        else:
            self.idle.append(conn)

    def close(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


def _expire(fut: asyncio.Future[tuple[int, bytes, bool]]) -> None:
    if not fut.done():
        fut.set_exception(TimeoutError())
