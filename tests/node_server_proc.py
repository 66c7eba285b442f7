"""A real ``kvtier server`` for tests: a subprocess on a socket of the test's choosing, stoppable,
killable (SIGKILL, like a crash) and restartable on the same socket.

Nothing is mocked: tests start ``python -m kvtier.cli server`` and wait for its ready line, so what
they check is what an operator runs. ``with NodeServerProcess(path).start() as srv:`` stops it at
exit (SIGTERM, so it removes its socket and segments).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from process_pause import pause_process, resume_process

READY_PREFIX = "kvtier server: ready on "


class NodeServerProcess:
    """One ``kvtier server`` subprocess; its stderr goes to a log file beside the socket."""

    def __init__(self, socket_path: str | os.PathLike, max_bytes: str = "256MiB", slot_bytes: str = "1MiB",
                 extra_args: Sequence[str] = ()) -> None:
        self.socket_path = str(socket_path)
        self.max_bytes = max_bytes
        self.slot_bytes = slot_bytes
        self.extra_args = tuple(extra_args)
        self.log_path = self.socket_path + ".log"
        self.ready_line = ""
        self.proc: subprocess.Popen | None = None

    @property
    def args(self) -> list[str]:
        return [sys.executable, "-m", "kvtier.cli", "server", "--socket", self.socket_path,
                "--max-bytes", self.max_bytes, "--slot-bytes", self.slot_bytes, *self.extra_args]

    @property
    def pid(self) -> int:
        if self.proc is None:
            raise RuntimeError("the node server is not running")
        return self.proc.pid

    def start(self, timeout_s: float = 20) -> NodeServerProcess:
        """Start it (a no-op while it runs) and wait for its ready line; raises with its log if it fails."""
        if self.proc is not None and self.proc.poll() is None:
            return self
        Path(self.socket_path).parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL,
                                         env=env, text=True)
        line = self._read_ready_line(timeout_s)
        if not line.startswith(READY_PREFIX):
            self._terminate(signal.SIGKILL)
            raise RuntimeError(f"kvtier server did not start on {self.socket_path} (got {line!r}):\n"
                               f"{self.log()[-4000:]}")
        self.ready_line = line
        return self

    def _read_ready_line(self, timeout_s: float) -> str:
        """The first stdout line, read by a thread so that a server that never prints cannot hang the test."""
        assert self.proc is not None and self.proc.stdout is not None
        got: list[str] = []
        reader = threading.Thread(target=lambda: got.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(timeout_s)
        return got[0].rstrip("\n") if got else ""

    def log(self) -> str:
        try:
            return Path(self.log_path).read_text(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM and wait: a clean exit removes the socket and the segments."""
        self._terminate(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL and wait, like a crash: the socket file and the segments stay behind."""
        self._terminate(signal.SIGKILL)

    def pause(self) -> None:
        """SIGSTOP, returning once every thread of the server is stopped."""
        pause_process(self.pid)

    def resume(self) -> None:
        resume_process(self.pid)

    def restart(self, timeout_s: float = 20) -> NodeServerProcess:
        """Stop (SIGTERM) if running, then start again on the same socket: an empty cache."""
        self.stop()
        return self.start(timeout_s)

    def _terminate(self, sig: signal.Signals) -> None:
        proc, self.proc = self.proc, None
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc.stdout is not None:
            proc.stdout.close()

    def rss_bytes(self) -> int:
        """The server's resident set (VmRSS of /proc/<pid>/status), in bytes."""
        return self.memory_status()["VmRSS"]

    def memory_status(self) -> dict[str, int]:
        """The ``kB`` fields of /proc/<pid>/status (VmRSS, RssAnon, RssShmem, ...) in bytes."""
        out = {}
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            parts = value.split()
            if len(parts) == 2 and parts[1] == "kB":
                out[name] = int(parts[0]) * 1024
        return out

    def wait_gone(self, timeout_s: float = 5) -> bool:
        """Whether the socket file is gone within ``timeout_s`` (after a clean stop)."""
        deadline = time.monotonic() + timeout_s
        while os.path.exists(self.socket_path):
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def __enter__(self) -> NodeServerProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

