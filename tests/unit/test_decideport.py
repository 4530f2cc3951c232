"""The lean ``POST /decide`` server (streams/decideport.py) over real sockets.

A real listening socket on 127.0.0.1 and real client connections; the handler echoes
what it was given, so each test shows what the protocol handed on and what it wrote.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

from streams import decideport

Reader = asyncio.StreamReader
Writer = asyncio.StreamWriter


async def echo(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
    if body == b"boom":
        raise RuntimeError("a handler bug")
    out = {"body": body.decode(), "auth": headers.get("authorization")}
    return 200, json.dumps(out).encode(), {"X-Seen": str(len(body))}


def post(body: bytes, *extra: str, path: str = "/decide") -> bytes:
    head = [f"POST {path} HTTP/1.1", "Host: x", f"Content-Length: {len(body)}", *extra]
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


async def answer(reader: Reader) -> tuple[int, dict[str, str], bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ")[1])
    headers = {k.lower(): v.strip() for k, _, v in (ln.partition(":") for ln in lines[1:] if ln)}
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


async def closed(reader: Reader) -> bool:
    """The server closed the connection (EOF within a generous deadline)."""
    return await asyncio.wait_for(reader.read(), 10) == b""


def run(test: Callable[[int], Awaitable[Any]], handler: decideport.Handler = echo) -> Any:
    async def main() -> Any:
        server = await decideport.serve(handler, "127.0.0.1", 0)
        try:
            return await test(server.port)
        finally:
            await server.close()

    return asyncio.run(main())


async def connect(port: int) -> tuple[Reader, Writer]:
    return await asyncio.open_connection("127.0.0.1", port)


def test_keep_alive_answers_several_requests_on_one_connection() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        for i in range(3):
            w.write(post(f"req{i}".encode(), "Authorization: Bearer tok"))
            status, headers, body = await answer(r)
            assert status == 200
            assert json.loads(body) == {"body": f"req{i}", "auth": "Bearer tok"}
            assert headers["x-seen"] == "4" and headers["content-type"] == "application/json"
            assert "connection" not in headers and "date" in headers
        w.close()

    run(t)


def test_pipelined_requests_are_answered_in_order() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(b"".join(post(f"p{i}".encode()) for i in range(5)))
        bodies = [json.loads((await answer(r))[2])["body"] for _ in range(5)]
        assert bodies == [f"p{i}" for i in range(5)]
        w.close()

    run(t)


def test_a_request_split_across_packets_byte_by_byte_is_read_whole() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        raw = post(b'{"user_id": "u1"}')
        for i in range(len(raw)):
            w.write(raw[i : i + 1])
            await w.drain()
            await asyncio.sleep(0)
        status, _, body = await answer(r)
        assert status == 200 and json.loads(body)["body"] == '{"user_id": "u1"}'
        w.close()

    run(t)


def test_a_body_over_one_mib_gets_413_before_it_is_sent_and_a_close() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(b"POST /decide HTTP/1.1\r\nContent-Length: %d\r\n\r\n" % (2 * 1024 * 1024))
        status, headers, body = await answer(r)
        assert status == 413 and headers["connection"] == "close"
        assert b"body over" in body
        assert await closed(r)

    run(t)


def test_malformed_http_gets_400_and_a_close() -> None:
    cases = [
        b"GARBAGE\r\n\r\n",
        b"POST /decide HTTP/2.0\r\nContent-Length: 0\r\n\r\n",
        b"POST /decide HTTP/1.1\r\nno colon here\r\n\r\n",
        b"POST /decide HTTP/1.1\r\n folded: header\r\n\r\n",
        b"POST /decide HTTP/1.1\r\nContent-Length: -3\r\n\r\n",
        b"POST /decide HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\n",
        b"POST /decide HTTP/1.1\r\nX: " + b"a" * (decideport.MAX_HEAD + 10),
    ]

    async def t(port: int) -> None:
        for raw in cases:
            r, w = await connect(port)
            w.write(raw)
            status, headers, body = await answer(r)
            assert status == 400, raw[:40]
            assert headers["connection"] == "close"
            assert b"\n" not in body and json.loads(body)["error"]
            assert await closed(r)

    run(t)


def test_chunked_bodies_are_refused_with_411() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(b"POST /decide HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n")
        status, _, body = await answer(r)
        assert status == 411 and b"Content-Length" in body
        assert await closed(r)

    run(t)


def test_expect_100_continue_gets_a_continue_then_the_answer() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(post(b"")[:0] + b"POST /decide HTTP/1.1\r\nContent-Length: 5\r\n"
                b"Expect: 100-continue\r\n\r\n")  # fmt: skip
        assert await r.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"hello")
        status, _, body = await answer(r)
        assert status == 200 and json.loads(body)["body"] == "hello"
        w.close()

    run(t)


def test_connection_close_and_http_1_0_close_after_the_answer() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(post(b"x", "Connection: close"))
        status, headers, _ = await answer(r)
        assert status == 200 and headers["connection"] == "close"
        assert await closed(r)
        r, w = await connect(port)
        w.write(b"POST /decide HTTP/1.0\r\nContent-Length: 1\r\n\r\nx")
        assert (await answer(r))[0] == 200
        assert await closed(r)
        r, w = await connect(port)  # HTTP/1.0 asking for keep-alive keeps it
        w.write(b"POST /decide HTTP/1.0\r\nConnection: keep-alive\r\nContent-Length: 1\r\n\r\nx")
        w.write(b"POST /decide HTTP/1.0\r\nContent-Length: 1\r\n\r\ny")
        assert json.loads((await answer(r))[2])["body"] == "x"
        assert json.loads((await answer(r))[2])["body"] == "y"
        assert await closed(r)

    run(t)


def test_other_paths_get_404_and_other_methods_405_on_a_kept_connection() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(post(b"x", path="/health"))
        assert (await answer(r))[0] == 404
        w.write(b"GET /decide HTTP/1.1\r\n\r\n")
        status, headers, _ = await answer(r)
        assert status == 405 and headers["allow"] == "POST"
        w.write(post(b"x", path="/decide?debug=1"))  # the query is not part of the path
        assert (await answer(r))[0] == 200
        w.close()

    run(t)


def test_a_failing_handler_gets_500_and_the_connection_lives_on() -> None:
    async def t(port: int) -> None:
        r, w = await connect(port)
        w.write(post(b"boom"))
        assert (await answer(r))[0] == 500
        w.write(post(b"fine"))
        assert (await answer(r))[0] == 200
        w.close()

    run(t)


def test_a_client_gone_mid_request_leaves_the_server_answering_others() -> None:
    release = asyncio.Event()
    seen: list[bytes] = []

    async def slow(body: bytes, headers: dict[str, str]) -> tuple[int, bytes, dict[str, str]]:
        seen.append(body)
        if body == b"slow":
            await release.wait()
        return 200, b"{}", {}

    async def t(port: int) -> None:
        _r, w = await connect(port)
        w.write(post(b"slow"))
        await w.drain()
        while not seen:
            await asyncio.sleep(0.01)
        w.close()  # gone while its request is being decided
        r2, w2 = await connect(port)
        _w3r, w3 = await connect(port)
        w3.write(post(b"0123456789")[:-4])  # gone with half a body sent
        await w3.drain()
        w3.close()
        release.set()
        w2.write(post(b"next"))
        assert (await answer(r2))[0] == 200
        assert seen == [b"slow", b"next"]  # the half request was never handed on
        w2.close()

    run(t, slow)
