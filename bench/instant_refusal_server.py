"""An HTTP/1.1 server that answers every request at once with a 503 and an OpenAI error body.

`bench.bench_serve_overload` runs it in a process of its own and sends it the same burst as the
servers it measures: the refusal latency it sees is what the client itself costs on this machine
(opening the connections, writing the requests, reading the answers), the floor under every row.

    python -m bench.instant_refusal_server PORT
"""

from __future__ import annotations

import asyncio
import json
import sys

BODY = json.dumps({"error": {"message": "refused", "type": "overloaded", "param": None, "code": "x"}}).encode()
RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\nretry-after: 1\r\n"
    b"content-length: %d\r\n\r\n%s" % (len(BODY), BODY)
)


async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length:
                await reader.readexactly(length)
            writer.write(RESPONSE)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        writer.close()


async def main(port: int) -> None:
    server = await asyncio.start_server(answer, "127.0.0.1", port, backlog=4096)
    await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1])))
