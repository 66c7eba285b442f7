"""Storage tiers behind one small batched interface: cpu, disk, redis and the tiered composition."""

from .base import StorageBackend

__all__ = ["StorageBackend"]
