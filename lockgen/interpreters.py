"""Finding a target interpreter and asking it for its PEP 508 environment.

``--python`` accepts a path (``/usr/bin/python3.12``), a command on ``PATH`` (``python3.12``)
or a bare version (``3.12``), which is also looked up among pyenv's versions.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

from lockgen.errors import InterpreterError
from lockgen.lockfile import KNOWN_MARKERS, current_environment

# Runs in the target interpreter (3.8 and later): keep it to syntax they all accept.
_PROBE = """
import json, os, platform, sys
impl = sys.implementation
v = impl.version
iv = "%d.%d.%d" % (v.major, v.minor, v.micro)
if v.releaselevel != "final":
    iv += v.releaselevel[0] + str(v.serial)
print(json.dumps({
    "implementation_name": impl.name,
    "implementation_version": iv,
    "os_name": os.name,
    "platform_machine": platform.machine(),
    "platform_release": platform.release(),
    "platform_system": platform.system(),
    "platform_python_implementation": platform.python_implementation(),
    "python_full_version": platform.python_version(),
    "python_version": ".".join(platform.python_version_tuple()[:2]),
    "sys_platform": sys.platform,
    "executable": sys.executable,
    "cache_tag": impl.cache_tag,
}))
"""


def _pyenv_candidates(version: str) -> list[Path]:
    root = Path(os.environ.get("PYENV_ROOT") or Path.home() / ".pyenv")
    major_minor = ".".join(version.split(".")[:2])
    found = [
        p
        for p in (root / "versions").glob(f"{version}*/bin/python{major_minor}")
        if os.access(p, os.X_OK)
    ]
    return sorted(found, key=lambda p: _version_key(p.parent.parent.name), reverse=True)


def _version_key(name: str) -> tuple[int, ...]:
    return tuple(int(part) if part.isdigit() else -1 for part in name.split("."))


def resolve_interpreter(spec: str | None) -> str:
    """The absolute path of the interpreter ``spec`` names; None means the running one."""
    if spec is None:
        return sys.executable
    import shutil  # not on the fast path: the running interpreter needs no lookup

    if os.sep in spec:
        path = Path(spec).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path.absolute())
        raise InterpreterError(f"--python {spec}: no executable interpreter at that path.")
    version = spec.removeprefix("python")
    looks_like_version = "." in version and version.replace(".", "").isdigit()
    # pyenv's shims only run the versions pyenv has selected; its real binaries always run.
    real = _pyenv_candidates(version) if looks_like_version else []
    on_path = shutil.which(spec) or (
        shutil.which(f"python{version}") if looks_like_version else None
    )
    if on_path and f"{os.sep}shims{os.sep}" not in on_path:
        return on_path
    if real:
        return str(real[0])
    if on_path:
        return on_path
    raise InterpreterError(
        f"--python {spec}: no such interpreter on PATH or among pyenv's versions. Pass a path, "
        "a command such as python3.12, or an installed version such as 3.12."
    )


@functools.cache
def interpreter_facts(python: str) -> dict[str, str]:
    """The PEP 508 markers, executable and cache tag of ``python`` (one short subprocess)."""
    if python == sys.executable:
        return {
            **current_environment(),
            "executable": sys.executable,
            "cache_tag": sys.implementation.cache_tag or "",
        }
    import json
    import subprocess

    try:
        done = subprocess.run(
            [python, "-I", "-S", "-c", _PROBE], capture_output=True, text=True, check=False
        )
    except OSError as exc:
        raise InterpreterError(f"cannot run the interpreter {python!r}: {exc.strerror}") from None
    if done.returncode != 0:
        raise InterpreterError(
            f"the interpreter {python} failed to start: {done.stderr.strip()[-500:]}"
        )
    facts = json.loads(done.stdout)
    return {str(k): str(v) for k, v in facts.items()}


def interpreter_environment(python: str) -> dict[str, str]:
    """Only the PEP 508 markers of ``python``."""
    facts = interpreter_facts(python)
    return {k: facts[k] for k in KNOWN_MARKERS}
