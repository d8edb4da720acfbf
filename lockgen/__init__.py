"""wheelcas's lockgen: requirements.txt to a Carton-compatible ``.carton/carton.lock``.

``lockgen.lock`` is the function (re-exported eagerly: importing the submodule
``lockgen.lock`` would otherwise rebind the package attribute to the module). Every module it
pulls in imports only the standard library at import time.
"""

from __future__ import annotations

from lockgen.lock import LockResult, lock

__all__ = ["LockResult", "lock"]
