"""wheelcas's loader: load a locked model and run it.

Importing ``loader`` is cheap: the API is imported on first use (PEP 562), so a process that
only needs, say, ``loader.syspath`` never pays for the store or the lock machinery.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from loader.api import load_unpacked as load_unpacked
    from loader.model import Model as Model

__all__ = ["Model", "load_unpacked"]


def __getattr__(name: str) -> Any:
    if name == "load_unpacked":
        from loader.api import load_unpacked

        return load_unpacked
    if name == "Model":
        from loader.model import Model

        return Model
    raise AttributeError(f"module 'loader' has no attribute {name!r}")
