"""Opens N keep-alive connections to HOST:PORT and holds them open: the first ASKED of
them (default: half) each send one GET and read its whole answer, the others send nothing.
Prints "held N" once every connection is open (and every answer read), then holds them
until stdin closes.

    python3 bench/hold_connections.py 127.0.0.1:28083 8000 [ASKED]
"""

import asyncio
import sys


async def one(host, port, ask):
    reader, writer = await asyncio.open_connection(host, port)
    if ask:
        writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value.strip())
        await reader.readexactly(length)
    return writer


async def main():
    host, _, port = sys.argv[1].rpartition(":")
    n = int(sys.argv[2])
    asked = int(sys.argv[3]) if len(sys.argv) > 3 else n // 2
    held = []
    # In batches: a listen backlog of thousands is not something to count on.
    for start in range(0, n, 200):
        batch = [one(host, int(port), i < asked) for i in range(start, min(n, start + 200))]
        held += await asyncio.gather(*batch)
    print(f"held {len(held)}", flush=True)
    await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)
    for w in held:
        w.close()


asyncio.run(main())
