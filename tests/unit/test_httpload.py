"""The load generator's keep-alive client (adpulse/bench/httpload.py) over real sockets,
against the lean /decide server (streams/decideport.py) and a raw socket server."""

from __future__ import annotations

import asyncio
import json

import pytest

from adpulse.bench import httpload
from streams import decideport

Answer = tuple[int, bytes, dict[str, str]]


def test_requests_reuse_kept_connections_within_the_limit() -> None:
    peak = 0
    in_flight = 0

    async def handler(body: bytes, headers: dict[str, str]) -> Answer:
        nonlocal peak, in_flight
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.01)
        in_flight -= 1
        out = {"body": body.decode(), "auth": headers.get("authorization")}
        return 200, json.dumps(out).encode(), {}

    async def main() -> None:
        server = await decideport.serve(handler, "127.0.0.1", 0)
        pool = httpload.Pool("127.0.0.1", server.port, 3, {"Authorization": "Bearer t"})
        try:
            raws = [pool.build("POST", "/decide", f"b{i}".encode()) for i in range(30)]
            got = await asyncio.gather(*(pool.request(r, 10) for r in raws))
            assert [json.loads(b)["body"] for _, b in got] == [f"b{i}" for i in range(30)]
            assert {s for s, _ in got} == {200}
            assert json.loads(got[0][1])["auth"] == "Bearer t"
            assert peak <= 3 and pool.open <= 3
            assert len(server.conns) == pool.open  # every connection kept, none reopened
            status, _ = await pool.request(pool.build("GET", "/decide"), 10)
            assert status == 405
        finally:
            pool.close()
            await server.close()

    asyncio.run(main())


async def _raw_server(answer: bytes) -> asyncio.Server:
    async def on(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.readuntil(b"\r\n\r\n"):
            if answer:
                writer.write(answer)

    return await asyncio.start_server(on, "127.0.0.1", 0)


@pytest.mark.parametrize(
    ("answer", "error"),
    [
        (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", httpload.ClientError),
        (b"", TimeoutError),
    ],
)
def test_an_unusable_or_missing_answer_is_an_error(answer: bytes, error: type) -> None:
    async def main() -> None:
        server = await _raw_server(answer)
        port = server.sockets[0].getsockname()[1]
        pool = httpload.Pool("127.0.0.1", port, 2, {})
        try:
            with pytest.raises(error):
                await pool.request(pool.build("GET", "/health"), 0.2)
            assert pool.open == 0  # the connection was dropped, its slot freed
        finally:
            pool.close()
            server.close()

    asyncio.run(main())


def test_an_answer_that_closes_is_not_reused() -> None:
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok"

    async def main() -> None:
        server = await _raw_server(answer)
        port = server.sockets[0].getsockname()[1]
        pool = httpload.Pool("127.0.0.1", port, 2, {})
        try:
            assert await pool.request(pool.build("GET", "/health"), 5) == (200, b"ok")
            assert pool.open == 0 and not pool.idle
        finally:
            pool.close()
            server.close()

    asyncio.run(main())
