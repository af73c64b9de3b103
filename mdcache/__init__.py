"""mdcache: run a frozen teacher once, store its patch targets for K views per image, share them."""
__version__ = "0.1.0"

from .errors import CacheError, UserError  # noqa: E402,F401

_LAZY = {"Cache": "store", "list_caches": "store", "open_cache": "store", "replay": "views"}


def __getattr__(name: str):
    """`mdcache.open_cache` and friends, imported on first use: the CLI starts without torch."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
