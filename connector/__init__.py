"""Engine-agnostic core of kvtier (keys, chunk codec, store) and the thin engine adapters."""
