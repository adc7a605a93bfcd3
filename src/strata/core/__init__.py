"""Shared, pure building blocks: package format, hardware profiles, wire schemas, errors, hashing."""
