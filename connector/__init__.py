"""The engine-agnostic core of kvtier and the thin engine adapters on top of it.

Dependencies point one way: engine adapters (``vllm*.py``, ``sglang*.py``: they alone import an
engine) -> core (config, engine set-up, store registry and factory, chunk store, prompt chains,
planner, transfers) -> {tiers (``kvtier.storage_backends``), copy layer (``kvtier.cuda_ext``)} ->
the chunk format (``kvtier.chunk_format``). ``tests/test_layering.py`` walks every import and fails
on a backward one or a cycle, so the house stays this way.
"""
