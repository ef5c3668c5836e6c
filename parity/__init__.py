"""Parity harness: proves the port computes what Scenic computes."""
