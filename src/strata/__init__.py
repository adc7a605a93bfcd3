"""strata: an edge AI inference platform (optimize, sign, roll out, serve, observe)."""

__version__ = "0.1.0"

__all__ = ["__version__"]
