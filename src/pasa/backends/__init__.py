"""Block-sparse attention backends and the registry that picks one."""

from pasa.backends.registry import available_backends, get_backend

__all__ = ["available_backends", "get_backend"]
