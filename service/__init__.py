"""fedstr-escrow: Lightning escrow for a FEDSTR training marketplace on Nostr."""

__version__ = "0.1.0"
