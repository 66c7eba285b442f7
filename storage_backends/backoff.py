"""Capped exponential backoff, shared by the lookup guard and the Redis tiers' circuit breakers.

A medium that fails slowly (a server that accepts connections but never answers, a host that drops
SYNs) costs every caller that tries it a full timeout. Trying it again at a fixed interval makes the
callers pay that timeout over and over for as long as the stall lasts, so the pause between tries
doubles with each consecutive slow failure, up to a cap, and falls back to its base as soon as the
medium answers once.
"""

from __future__ import annotations


def backoff_delay(base_s: float, failures: int, cap_s: float) -> float:
    """The pause after the ``failures``-th consecutive slow failure: ``base_s`` after the first,
    doubled for each further one, never more than ``cap_s`` (nor less than ``base_s``, so a base
    configured above the cap is kept as it is)."""
    if failures <= 1:
        return base_s
    return min(max(cap_s, base_s), base_s * 2.0 ** min(failures - 1, 60))
