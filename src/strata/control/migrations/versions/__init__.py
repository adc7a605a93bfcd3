"""Alembic revision scripts, oldest first; each file is one schema change."""
