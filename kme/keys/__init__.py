"""The ETSI GS QKD 014 domain: key pool, deliveries, and the three API methods."""
