"""Coilsight agent: the long-running inspection service."""
__version__ = "0.1.0"
