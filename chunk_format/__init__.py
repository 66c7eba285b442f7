"""The chunk format: what a stored chunk is called and what its bytes say, shared by everyone.

- ``keys``: the prefix hash chain and the key namespace (model, dtype, layout, shard, salt);
- ``codec``: the stored form (prefix, msgpack header, aligned raw payload) and its checks;
- ``dtypes``: dtype names and item sizes;
- ``integrity``: keyed MACs over payload and header fields.

A leaf: it imports nothing else of kvtier, so tiers, the copy layer, the core, the engine adapters
and the tools may all import it, and a change here is a change of the format (``FORMAT_VERSION``).
"""
