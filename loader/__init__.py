"""wheelcas's loader: load a locked model and run it.

Importing ``loader`` is cheap: the API is imported on first use (PEP 562), so a process that
only needs, say, ``loader.syspath`` never pays for the store or the lock machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader import aio as aio
    from loader.api import load_unpacked as load_unpacked
    from loader.gathering import gather as gather
    from loader.model import Model as Model
    from loader.packing import get_model_info as get_model_info
    from loader.packing import load as load
    from loader.packing import pack as pack
    from loader.selftesting import selftest as selftest

__all__ = [
    "Model",
    "aio",
    "gather",
    "get_model_info",
    "load",
    "load_unpacked",
    "pack",
    "selftest",
]


def __getattr__(name: str) -> Any:
    if name == "load_unpacked":
        from loader.api import load_unpacked

        return load_unpacked
    if name == "aio":
        import importlib

        return importlib.import_module("loader.aio")
    if name == "selftest":
        # In loader.selftesting, not loader.selftest, for the reason given for `pack` below.
        from loader.selftesting import selftest

        return selftest
    if name == "gather":
        # In loader.gathering, not loader.gather, for the reason given for `pack` below.
        from loader.gathering import gather

        return gather
    if name == "Model":
        from loader.model import Model

        return Model
    if name in ("pack", "load", "get_model_info"):
        # In loader.packing, not loader.pack: importing a submodule named `pack` would rebind
        # this package's attribute `pack` from the function to the module.
        from loader import packing

        return getattr(packing, name)
    raise AttributeError(f"module 'loader' has no attribute {name!r}")
