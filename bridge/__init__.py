"""Trunkline: the application (config, sessions, apps, HTTP, metrics, CLI)."""
__all__ = ["__version__"]
__version__ = "0.1.0"
