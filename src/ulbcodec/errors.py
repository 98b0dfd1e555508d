"""Errors shared across layers, at the bottom of the import graph."""


class BitstreamError(ValueError):
    """A .ulb file is malformed, truncated, corrupted or unsupported."""
