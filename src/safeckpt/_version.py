"""The version, read by everything that records it (importing it costs nothing)."""

__version__ = "0.1.0"
