#!/usr/bin/env python3
"""Stalled handshakes: hold N TCP connections to HOST:PORT that never send a byte (no
ClientHello), and open a new one for every one the server closes, for SECONDS or until
SIGTERM.

    loadtest/stall.py HOST PORT N SECONDS [SOURCE_IPS]

SOURCE_IPS (e.g. 127.0.0.2,127.0.0.3) spreads the sockets over several loopback addresses.
Prints one JSON line at the end: sockets opened, closed by the server, held at the end."""
import asyncio
import json
import resource
import signal
import sys


async def main():
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    host, port, n, seconds = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    sources = sys.argv[5].split(",") if len(sys.argv) > 5 else [None]
    stats = {"opened": 0, "closed_by_server": 0, "connect_errors": 0}
    held = set()
    stop = asyncio.get_running_loop().time() + seconds

    async def one(i):
        src = sources[i % len(sources)]
        while asyncio.get_running_loop().time() < stop:
            try:
                r, w = await asyncio.open_connection(
                    host, port, local_addr=(src, 0) if src else None)
            except OSError:
                stats["connect_errors"] += 1
                await asyncio.sleep(0.05)
                continue
            stats["opened"] += 1
            held.add(i)
            try:
                left = stop - asyncio.get_running_loop().time()
                data = await asyncio.wait_for(r.read(1), timeout=max(left, 0.01))
                if not data:
                    stats["closed_by_server"] += 1
            except asyncio.TimeoutError:
                pass
            except OSError:
                stats["closed_by_server"] += 1
            finally:
                held.discard(i)
                w.close()

    # Open them gradually (a few hundred per second at first), then hold.
    tasks = []
    for i in range(n):
        tasks.append(asyncio.create_task(one(i)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)
    done = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, done.set)
    try:
        await asyncio.wait_for(done.wait(), max(stop - asyncio.get_running_loop().time(), 0))
    except asyncio.TimeoutError:
        pass
    stats["held_at_end"] = len(held)
    print(json.dumps(stats), flush=True)
    for t in tasks:
        t.cancel()


asyncio.run(main())
