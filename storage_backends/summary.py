"""What a persistent store holds, for ``kvtier inspect``."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from kvtier.chunk_format.codec import ChunkCorrupt, decode_header


@dataclass
class StoreSummary:
    """Chunk count, bytes and models of a disk folder or a Redis namespace."""

    location: str
    chunks: int = 0
    bytes: int = 0
    unreadable: int = 0  # entries whose header does not parse (corrupt, foreign or truncated)
    models: Counter[str] = field(default_factory=Counter)  # model -> chunk count
    layouts: Counter[str] = field(default_factory=Counter)  # layout id -> chunk count

    def count(self, key: str, head: bytes | None, size: int) -> None:
        """Count one stored entry of ``size`` bytes whose first bytes are ``head`` (None: unreadable).

        Every entry counts in ``bytes`` (what counts against a cap); only a header that parses,
        names ``key`` and agrees with ``size`` counts as a chunk of its model and layout.
        """
        self.bytes += size
        try:
            if head is None:
                raise ChunkCorrupt("unreadable")
            header, offset = decode_header(head)
            if header.key != key or size - offset != header.nbytes:
                raise ChunkCorrupt("key or size disagrees with the header")
        except ChunkCorrupt:
            self.unreadable += 1
            return
        self.chunks += 1
        self.models[header.model] += 1
        self.layouts[header.layout] += 1
