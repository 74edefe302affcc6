"""Test data builders live in conformance.synthetic (the bench uses them too)."""
from conformance.synthetic import *  # noqa: F401,F403
from conformance.synthetic import SECONDARY_CAPTURE, WSI, jpeg_tile  # noqa: F401
