"""kme: an ETSI GS QKD 014 key-delivery server (KME emulator)."""

__version__ = "0.1.0"
