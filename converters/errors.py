"""Errors the converters raise for expected failures (bad input, unwritable output)."""


class ConversionError(Exception):
    """An expected failure: the message is one line, shown to the user as is."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))
