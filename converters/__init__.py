"""pathpacs converters package."""
