"""Where an engine's processes spend their time: py-spy on every process of a server, and a summary.

``serve_bench.py --profile`` wraps each client run in :class:`GroupProfile`: one ``py-spy record``
(raw collapsed stacks, ``--nonblocking`` so the engine is never paused) per process of the server's
process group. :func:`summarize` then reads each file and reports, per process, the share of
samples per thread and the kvtier frames that the samples were in (outermost kvtier frame, and the
innermost one with the leaf it called), so a cost on the step's critical path (the main thread)
shows apart from one in kvtier's background threads. py-spy samples Python threads only: time in
native threads (OpenMP's) is not in it, and a thread waiting for the CPU counts as active.

    pip install py-spy
    python benchmarks/serve_bench.py --workloads no-reuse --rounds 1 --profile
    python benchmarks/engine_profile.py WORK/profiles/*.txt
"""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

KVTIER_PARTS = ("(storage_backends/", "(connector/", "(chunk_format/", "(cuda_ext/")


class GroupProfile:
    """``with``: py-spy records every process of process group ``pgid`` into ``folder``."""

    def __init__(self, pgid: int, folder: Path, name: str, rate: int = 50) -> None:
        self.pgid, self.folder, self.name, self.rate = pgid, folder, name, rate
        self._spies: list[subprocess.Popen] = []

    def __enter__(self) -> GroupProfile:
        spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
        if not Path(spy).exists():
            raise SystemExit("FAIL: --profile needs py-spy (pip install py-spy)")
        self.folder.mkdir(parents=True, exist_ok=True)
        for pid, comm, _ in group_stats(self.pgid):
            out = self.folder / f"{self.name}-{comm}-{pid}.txt"
            self._spies.append(subprocess.Popen(
                [spy, "record", "--pid", str(pid), "--rate", str(self.rate), "--format", "raw", "--nonblocking",
                 "--output", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        return self

    def __exit__(self, *exc: object) -> None:
        for spy in self._spies:
            spy.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for spy in self._spies:
            try:
                spy.wait(timeout=30)
            except subprocess.TimeoutExpired:
                spy.kill()


def group_stats(pgid: int) -> list[tuple[int, str, list[str]]]:
    """The live processes of process group ``pgid``: pid, command name (letters, digits and dashes
    only) and the ``/proc/<pid>/stat`` fields after the name (field 3, the state, is index 0)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            head, _, rest = stat.read_text().rpartition(")")
            fields = rest.split()
            if int(fields[2]) == pgid:
                comm = "".join(c if c.isalnum() else "-" for c in head.partition("(")[2])
                out.append((int(stat.parent.name), comm, fields))
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
    return sorted(out)


def summarize(path: Path, top: int = 10) -> str:
    """Shares of samples per thread and per kvtier frame in one raw py-spy file."""
    total = 0
    threads: Counter[str] = Counter()
    outer: Counter[tuple[str, str]] = Counter()
    inner: Counter[tuple[str, str]] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames, n = stack.split(";"), int(count)
        total += n
        threads[frames[0]] += n
        ours = [f for f in frames if any(part in f for part in KVTIER_PARTS)]
        if ours:
            outer[(frames[0], ours[0])] += n
            inner[(ours[-1], frames[-1])] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples"]
    lines += [f"  thread {name}: {n / total:.1%}" for name, n in threads.most_common(4)]
    lines += [f"  kvtier {n / total:6.1%}  in {thread} via {frame}" for (thread, frame), n in outer.most_common(top)]
    lines += [f"  leaf   {n / total:6.1%}  {frame} -> {leaf}" for (frame, leaf), n in inner.most_common(top)]
    return "\n".join(lines)


if __name__ == "__main__":
    print("\n".join(summarize(Path(p)) for p in sys.argv[1:]))
