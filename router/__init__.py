"""router: tenant-routed streaming reverse proxy for zero-downtime migration."""

__version__ = "0.1.0"
