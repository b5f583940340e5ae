"""The escrow engine: verified facts in, decisions about money out (see docs/escrow.md)."""
