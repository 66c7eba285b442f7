"""SIGSTOP a server process and wait until it really is stopped.

``kill(SIGSTOP)`` returns before the process stops: the kernel wakes one thread for the signal, and
only when that thread runs does it stop the others. On a loaded machine the others can meanwhile
answer requests, so a test of "a hung server" must wait until every thread shows state ``T``."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path


def pause_process(pid: int, timeout_s: float = 5) -> None:
    os.kill(pid, signal.SIGSTOP)
    deadline = time.monotonic() + timeout_s
    while not all(_thread_state(stat) in ("T", "") for stat in Path(f"/proc/{pid}/task").glob("*/stat")):
        if time.monotonic() > deadline:
            raise RuntimeError(f"process {pid} did not stop within {timeout_s} s")
        time.sleep(0.001)


def resume_process(pid: int) -> None:
    os.kill(pid, signal.SIGCONT)


def _thread_state(stat: Path) -> str:
    """The state letter of /proc/<pid>/task/<tid>/stat (after the parenthesised name); '' if gone."""
    try:
        return stat.read_text().rpartition(")")[2].split()[0]
    except (OSError, IndexError):
        return ""
