"""A TCP proxy in front of a broker that can cut the link of chosen clients: a network fault.

The broker advertises the proxy's port, so every Kafka connection (bootstrap and
after Metadata) goes through it. The proxy reads the client id of each
connection's first request: clients whose id starts with ``spared`` (the
caller's own, standing in for the apps) are never cut; every other connection
(a worker's) is closed and refused for the length of the cut, as when that
worker's network fails. Used by ``tests/faults/test_broker_cut.py`` and by
``adpulse bench promises`` (broker cut -> resume).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading

from adpulse.broker import free_port


class Proxy:
    """127.0.0.1:port -> upstream; ``cut()`` drops and refuses every connection whose
    client id does not start with ``spared`` (the caller's own clients)."""

    def __init__(self, upstream: int, spared: str) -> None:
        self.upstream = upstream
        self.spared = spared
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self.is_cut = False
        self.links: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.refused = 0
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        ready.wait(10)

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        server = self.loop.run_until_complete(
            asyncio.start_server(self._accept, "127.0.0.1", self.port)
        )
        ready.set()
        self.loop.run_forever()
        server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readexactly(4)
            body = await reader.readexactly(int.from_bytes(head, "big"))
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        # Request header: api_key, api_version, correlation_id, then client_id (int16 + bytes).
        n = int.from_bytes(body[8:10], "big", signed=True)
        client = body[10 : 10 + n].decode(errors="replace") if n > 0 else ""
        spared = client.startswith(self.spared)
        if self.is_cut and not spared:
            self.refused += 1
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
        up_writer.write(head + body)
        link = (writer, up_writer)
        if not spared:
            self.links.add(link)
        await asyncio.gather(self._pump(reader, up_writer), self._pump(up_reader, writer))
        self.links.discard(link)

    async def _pump(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(ConnectionError, OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    def cut(self) -> None:
        def drop() -> None:
            self.is_cut = True
            for a, b in list(self.links):
                a.close()
                b.close()

        self.loop.call_soon_threadsafe(drop)

    def restore(self) -> None:
        self.loop.call_soon_threadsafe(setattr, self, "is_cut", False)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
