"""vicifast-agent: signed gRPC in, timed nftables allow-sets out, for VICIdial hosts."""

__version__ = "0.1.0"
