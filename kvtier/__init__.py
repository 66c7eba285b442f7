"""kvtier: a tiered KV-cache connector for LLM serving engines.

This root package holds the version, the ``kvtier`` command and the demos; the code lives in
``kvtier.chunk_format`` (the chunk format), ``kvtier.storage_backends`` (the tiers),
``kvtier.cuda_ext`` (the copy layer) and ``kvtier.connector`` (the core and the engine adapters).
This file imports nothing, so importing any of them costs nothing here.
"""

__version__ = "0.1.0"
