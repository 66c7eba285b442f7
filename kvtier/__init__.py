"""kvtier: a tiered KV-cache connector for LLM serving engines."""

__version__ = "0.1.0"
