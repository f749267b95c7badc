"""router: tenant-routed streaming reverse proxy for zero-downtime migration between two backends."""

__version__ = "0.1.0"
