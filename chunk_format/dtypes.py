"""Dtype names: how chunk headers and key namespaces spell a KV dtype, and its item size.

Names, not objects, so that nothing here needs torch: fp8 and bf16 are moved as bytes, and the
name only has to round-trip between writers and readers.
"""

from __future__ import annotations

# dtype name -> item size. fp8 and bf16 are moved as bytes; the name only has to round-trip.
DTYPE_SIZES: dict[str, int] = {
    "float32": 4,
    "float16": 2,
    "bfloat16": 2,
    "float8_e4m3fn": 1,
    "float8_e5m2": 1,
    "float8_e4m3fnuz": 1,
    "float8_e5m2fnuz": 1,
    "uint8": 1,
    "int8": 1,
}


def dtype_name(dtype: object) -> str:
    """``torch.bfloat16`` -> ``"bfloat16"``: the name used in namespaces and chunk headers."""
    return str(dtype).removeprefix("torch.")
