"""pathpacs conformance package."""
