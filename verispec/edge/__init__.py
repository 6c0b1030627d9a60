"""The edge client: a local proposer drafting against a remote verifier (`verispec edge`, `EdgeClient`)."""

from verispec.edge.client import EdgeClient, EdgeError, EdgeStats

__all__ = ["EdgeClient", "EdgeError", "EdgeStats"]
