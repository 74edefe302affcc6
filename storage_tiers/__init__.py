"""pathpacs storage_tiers package."""
