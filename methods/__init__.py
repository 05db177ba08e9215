"""WSSS methods behind one interface. Importing this package registers every method."""

from methods.base import METHODS, Method, register

__all__ = ["METHODS", "Method", "register", "load_all"]


def load_all() -> dict[str, type[Method]]:
    """Import every method folder so its ``@register`` runs; return the registry."""
    import importlib
    import pkgutil
    from pathlib import Path

    here = Path(__file__).parent
    for info in pkgutil.iter_modules([str(here)]):
        if info.ispkg and info.name != "common":
            importlib.import_module(f"methods.{info.name}")
    return METHODS
