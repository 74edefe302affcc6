"""pathpacs dicomweb package."""
