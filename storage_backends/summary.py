"""What a persistent store holds, for ``kvtier inspect``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class StoreSummary:
    """Chunk count, bytes and models of a disk folder or a Redis namespace."""

    location: str
    chunks: int = 0
    bytes: int = 0
    unreadable: int = 0  # entries whose header does not parse (corrupt, foreign or truncated)
    models: Counter[str] = field(default_factory=Counter)  # model -> chunk count
    layouts: Counter[str] = field(default_factory=Counter)  # layout id -> chunk count
