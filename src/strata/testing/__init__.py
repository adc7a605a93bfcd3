"""Helpers for tests and benchmarks that need real services (a throwaway PostgreSQL cluster)."""
