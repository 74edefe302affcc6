"""pathpacs archive package."""
