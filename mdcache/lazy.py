"""Heavy libraries imported on first use, so that `mdcache --help`, `ls`, `info`, `plan`, `gc` and `rm` start
at once: importing torch alone takes about 2 s, and those commands never run a tensor op.

    torch = lazy("torch")   # a module object; the real import happens at the first attribute access
"""
from __future__ import annotations

import importlib
import types


class LazyModule(types.ModuleType):
    def __init__(self, name: str):
        super().__init__(name)
        self.__dict__["_target"] = name

    def __getattr__(self, attr: str):
        module = importlib.import_module(self.__dict__["_target"])
        self.__dict__.update(module.__dict__)  # later lookups skip this method
        return getattr(module, attr)


def lazy(name: str) -> types.ModuleType:
    return LazyModule(name)
