"""Trunkline: the application. Parts: core, records, agent, api, cell, box (see each __init__),
and cli.py, the entry point, which may import any of them."""
__all__ = ["__version__"]
__version__ = "0.1.0"
