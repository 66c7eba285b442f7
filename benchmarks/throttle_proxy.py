"""A TCP proxy that makes a fast server slow: a bandwidth cap and a one-way delay per direction.

Benchmarks put it in front of redis-server to stand for a remote store over a slow link (a busy
network, another zone): every byte in either direction is delayed by ``latency_s`` and paced to at
most ``bytes_per_s`` per connection and direction, as a link of that speed would. Data passes
unchanged and in order; a side that closes closes the other. It runs an asyncio loop in a daemon
thread of the calling process, or as a script:

    python benchmarks/throttle_proxy.py --target 127.0.0.1:6379 --port 6380 --mbytes-per-s 4 --latency-ms 2
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import threading
import time

PIECE = 16384  # bytes forwarded at a time: the pacing's granularity


class ThrottledProxy:
    """``with ThrottledProxy(host, port, bytes_per_s, latency_s) as proxy:`` listens on ``proxy.port``."""

    def __init__(self, target_host: str, target_port: int, bytes_per_s: float, latency_s: float = 0.0,
                 listen_port: int = 0) -> None:
        if bytes_per_s <= 0 or latency_s < 0:
            raise ValueError("bytes_per_s must be positive and latency_s not negative")
        self.target = (target_host, target_port)
        self.bytes_per_s = bytes_per_s
        self.latency_s = latency_s
        self.port = listen_port
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stopped: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._run, name="throttle-proxy", daemon=True)

    def __enter__(self) -> ThrottledProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the throttling proxy did not start")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", self.port)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopped.wait()

    async def _connection(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.close()
            return
        await asyncio.gather(self._pipe(client_r, server_w), self._pipe(server_r, client_w))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Bytes of one direction, each piece sent ``latency_s`` after it arrived and no sooner than
        the cap allows after the previous one."""
        free_at = 0.0  # when the link has sent everything before
        # Room for what is in flight on such a link, and no more: a fast sender then waits, as TCP makes it.
        in_flight = int(self.latency_s * self.bytes_per_s) // PIECE + 4
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=in_flight)

        async def send() -> None:
            nonlocal free_at
            while True:
                due, data = await queue.get()
                if not data:
                    break
                free_at = max(free_at, due) + len(data) / self.bytes_per_s
                await asyncio.sleep(max(0.0, free_at - time.monotonic()))
                writer.write(data)
                await writer.drain()

        sender = asyncio.ensure_future(send())
        try:
            while data := await reader.read(PIECE):
                await queue.put((time.monotonic() + self.latency_s, data))
        except (ConnectionError, OSError):
            pass
        finally:
            await queue.put((0.0, b""))
            with contextlib.suppress(ConnectionError, OSError):
                await sender
            writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", required=True, help="HOST:PORT of the real server")
    parser.add_argument("--port", type=int, required=True, help="port to listen on (127.0.0.1)")
    parser.add_argument("--mbytes-per-s", type=float, required=True, help="cap per connection and direction, MB/s")
    parser.add_argument("--latency-ms", type=float, default=0.0, help="one-way delay")
    args = parser.parse_args()
    host, _, port = args.target.rpartition(":")
    with ThrottledProxy(host, int(port), args.mbytes_per_s * 1e6, args.latency_ms / 1e3, args.port) as proxy:
        print(f"throttling 127.0.0.1:{proxy.port} -> {args.target} at {args.mbytes_per_s} MB/s, "
              f"{args.latency_ms} ms", flush=True)
        threading.Event().wait()


if __name__ == "__main__":
    main()
