"""Audit trail: records of every request, redacted before any sink."""
