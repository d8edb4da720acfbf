"""The public Python API, shaped like Carton's binding (synchronous here)."""

from __future__ import annotations

import os
import platform
import sys
from collections.abc import Mapping
from pathlib import Path

from loader import conflicts, embedded, syspath
from loader.errors import ModelConfigError
from loader.localpkgs import local_package_dirs
from loader.model import Model, ModelInfo, instantiate
from loader.options import OptionInput, OptionValue, normalize_runner_opts, parse_runner_opts
from loader.packages import DaemonChoice, ready_package_dirs
from loader.semver import VersionReq, parse_requirement
from loader.worker import IsolatedModel, WorkerSpec, worker_environment
from lockgen.errors import InterpreterError


def _visible_device_env(visible_device: str | int | None) -> str | None:
    if visible_device is None:
        return None
    if str(visible_device).lower() == "cpu":
        return ""  # hides every GPU from CUDA
    return str(visible_device)


def _stored_opts(runner_opts: Mapping[str, OptionInput] | None) -> dict[str, OptionValue]:
    """The options as Carton keeps them (a list of external dirs joined), for ``ModelInfo``.
    Called after :func:`parse_runner_opts` accepted them, so every value is kept."""
    return {
        key: value
        for key, value in normalize_runner_opts(runner_opts).items()
        if isinstance(value, bool | int | float | str)
    }


def load_unpacked(
    path: str | os.PathLike[str],
    runner_name: str = "python",
    required_framework_version: str | None = None,
    runner_compat_version: int | None = None,
    runner_opts: Mapping[str, OptionInput] | None = None,
    visible_device: str | int | None = None,
    *,
    daemon: DaemonChoice = None,
    isolated: bool = True,
    **_pack_metadata: object,
) -> Model:
    """Lock if needed, make every locked wheel ready, assemble ``sys.path``, call the entrypoint.

    ``isolated`` (the default): the model runs in a worker process of its own, in the highest
    Python that satisfies ``required_framework_version`` (see :mod:`loader.interpreters`),
    isolated from site-packages and ``PYTHONPATH``; tensors cross as numpy arrays. False: it
    runs in this process, which must then be a Python in the range, and ``sys.path`` and
    ``PYTHONPATH`` of this process are changed.

    Packages come from the daemon when one answers (``daemon``: None picks automatically, True
    requires one, False never asks), else from the store this process fills itself. Pack-only
    arguments that Carton accepts here (``model_name``, ``inputs``, ...) are accepted and
    ignored.

    ``runner_opts`` may name local package dirs (``bundled_packages_dir``,
    ``external_package_dirs``, ``keep_external_dir_names``: see :mod:`loader.localpkgs`);
    they are importable after the code dir and before the locked packages, and a top-level
    module that two of them, or one of them and a locked wheel, provide is a
    :class:`ModelConfigError` naming both. A model with external dirs loads as it is, without
    gathering.
    """
    del runner_compat_version  # accepted for Carton compatibility; one runner version here
    model_dir = Path(path).absolute()
    if runner_name != "python":
        raise ModelConfigError(
            f"runner_name {runner_name!r} is not supported; wheelcas runs 'python' models."
        )
    if required_framework_version is None:
        raise ModelConfigError(
            "required_framework_version is required: the Python versions the model runs on, "
            "e.g. '=3.11' or '>=3.9, <3.13'."
        )
    requirement = parse_requirement(required_framework_version)
    if isolated:
        return _load_isolated(
            model_dir, requirement, runner_name, runner_opts, visible_device, daemon
        )
    if not requirement.matches(platform.python_version()):
        raise InterpreterError(
            f"this process runs Python {platform.python_version()}, but the model requires "
            f"{required_framework_version!r}. Load it from an interpreter in that range."
        )
    options = parse_runner_opts(runner_opts)
    if not model_dir.is_dir():
        raise ModelConfigError(f"{model_dir} is not a directory; pass the model's code dir.")
    local = local_package_dirs(model_dir, options)  # a missing external dir fails before locking
    dirs = ready_package_dirs(model_dir, daemon=daemon)
    plan = embedded.plan_for(model_dir, dirs, local)
    conflicts.check_no_conflicts(plan.entries[1:], sys.modules)  # [0] is the code dir
    syspath.apply(plan)
    device = _visible_device_env(visible_device)
    if device is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = device
    instance = instantiate(model_dir, options)
    info = ModelInfo(
        model_dir=model_dir,
        runner_name=runner_name,
        required_framework_version=required_framework_version,
        runner_opts=_stored_opts(runner_opts),
        python_version=platform.python_version(),
        sys_path_entries=plan.entries,
    )
    return Model(instance, info)


def _load_isolated(
    model_dir: Path,
    requirement: VersionReq,
    runner_name: str,
    runner_opts: Mapping[str, OptionInput] | None,
    visible_device: str | int | None,
    daemon: DaemonChoice,
) -> IsolatedModel:
    """The worker path: the interpreter first, then its lock entry and its ``.pyc`` files."""
    from loader import interpreters

    options = parse_runner_opts(runner_opts)
    if not model_dir.is_dir():
        raise ModelConfigError(f"{model_dir} is not a directory; pass the model's code dir.")
    local = local_package_dirs(model_dir, options)
    python = interpreters.choose(requirement)
    dirs = ready_package_dirs(model_dir, daemon=daemon, python=python.path)
    # The worker puts plan.entries on its sys.path and in its children's PYTHONPATH.
    plan = embedded.plan_for(model_dir, dirs, local)
    env = worker_environment(os.environ, plan.entries, _visible_device_env(visible_device))
    spec = WorkerSpec(python=python.path, code_dir=model_dir, plan=plan, options=options, env=env)
    info = ModelInfo(
        model_dir=model_dir,
        runner_name=runner_name,
        required_framework_version=requirement.text,
        runner_opts=_stored_opts(runner_opts),
        python_version=python.version_text,
        sys_path_entries=plan.entries,
    )
    return IsolatedModel(spec, info)
