"""The floor of a stream relay on this machine: ``python -m tests.bench.rawrelay UPSTREAM_URL PATH KEY PORT``.

A relay that does nothing but relay: uvloop protocols, httptools to find the requests and the
upstream's chunk boundaries, one new upstream connection per request with a fixed streaming
request, and every body piece written to the client as it comes. No ASGI, no parsing of events,
no accounting. Its CPU per relayed event, measured like the gateway's, is what one upstream read
and one client write per event cost here (mostly in the kernel): the many-streams phase prints it
beside the gateway's, so a target for the gateway can be read against it.
"""

from __future__ import annotations

import asyncio
import json
import sys

import httptools

BODY = json.dumps({"messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 100, "stream": True}).encode()


class Upstream(asyncio.Protocol):
    def __init__(self, client: Client, request: bytes) -> None:
        self.client, self.request = client, request
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport) -> None:
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_headers_complete(self) -> None:
        self.client.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.client.write(b"%x\r\n%s\r\n" % (len(body), body))

    def on_message_complete(self) -> None:
        self.client.write(b"0\r\n\r\n")
        if self.transport is not None:
            self.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, host: str, port: int, request: bytes) -> None:
        self.host, self.port, self.request = host, port, request
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.connecting: asyncio.Task | None = None  # kept, so the task is not collected mid-way

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        loop = asyncio.get_running_loop()
        self.connecting = loop.create_task(
            loop.create_connection(lambda: Upstream(self, self.request), self.host, self.port)
        )

    def write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve(upstream: str, path: str, key: str, port: int) -> None:
    host, upstream_port = upstream.removeprefix("http://").split(":")
    request = (
        f"POST {path} HTTP/1.1\r\nhost: {host}\r\napi-key: {key}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(BODY)}\r\n\r\n"
    ).encode() + BODY
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Client(host, int(upstream_port), request), "127.0.0.1", port, backlog=4096
    )
    print(f"raw relay listening on {port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str]) -> int:
    import uvloop

    uvloop.run(serve(argv[0], argv[1], argv[2], int(argv[3])))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
