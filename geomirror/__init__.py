"""geomirror: site-level failover of a running QEMU guest over a WAN."""

__version__ = "0.1.0"
