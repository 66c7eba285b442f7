"""Storage tiers behind one small batched interface: cpu, disk, redis and the tiered composition.

``registry`` is where tier types are registered (the built-in ones and plug-ins from the
``kvtier.tiers`` entry points); a tier author needs only the names exported here.
"""

from .base import StorageBackend
from .registry import register_tier, tier_type, tier_types
from .tier_spec import TierContext, TierSettings, TierType

__all__ = ["StorageBackend", "TierContext", "TierSettings", "TierType", "register_tier", "tier_type", "tier_types"]
