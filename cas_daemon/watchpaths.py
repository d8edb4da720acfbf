"""Watching model dirs, the paths: what decides a dir's requirements, and whether to trust it.

:func:`requirements_chain` follows ``requirements.txt`` one ``readlink`` at a time, as the
kernel does, so that every symlink that decides what the file reads is known: the watch
(:mod:`cas_daemon.fswatch`) watches the dir holding each one, and the trust check
(:func:`trust_problems`) looks at who may change each one. ``os.path.realpath`` would give
only the last target, and a swapped link earlier in the chain (``current -> v2``) would go
unseen.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from cas_daemon.protocol import BadRequest, NotPermitted
from cas_daemon.watch import requirements_path
from lockgen.lockfile import REQUIREMENTS_FILENAME

log = logging.getLogger("wheelcas.daemon")

#: Symlinks followed while resolving requirements.txt, at most (the kernel's own limit).
MAX_LINKS = 40


@dataclass(frozen=True, slots=True)
class Chain:
    """What ``requirements.txt`` resolves through.

    ``links``: every symlink met (file or directory components), in order, as absolute paths
    whose parent is the real dir holding the link; ``target``: the file reached (it may not
    exist: a dangling link), or None when the chain is longer than :data:`MAX_LINKS` (a
    loop). ``requirements.txt`` itself is always ``links[0]`` or ``target``.
    """

    links: tuple[str, ...]
    target: str | None

    @property
    def names(self) -> frozenset[str]:
        """The paths whose creation, removal or change changes what the file reads."""
        return frozenset(self.links) | ({self.target} if self.target is not None else set())

    @property
    def holders(self) -> frozenset[str]:
        """The dirs holding those paths: the ones to watch."""
        return frozenset(os.path.dirname(name) for name in self.names)  # noqa: PTH120


def requirements_chain(model_dir: Path) -> Chain:
    """Resolve ``model_dir/requirements.txt`` one component at a time (blocking).

    The first name is kept as given (the watch reports events under the path it was given);
    after the first link, resolution goes on from the real model dir, so that ``..`` in a
    target means what the kernel makes of it.
    """
    first = requirements_path(str(model_dir))
    if not os.path.islink(first):  # noqa: PTH114 - the strings are what events carry
        return Chain((), first)
    links = [first]
    target = os.readlink(first)  # noqa: PTH115
    current = "/" if target.startswith("/") else os.path.realpath(model_dir)
    pending = _parts(target, reverse=True)
    while pending:
        part = pending.pop()
        if part == "..":
            current = os.path.dirname(current)  # noqa: PTH120 - current has no symlink
            continue
        candidate = os.path.join(current, part)  # noqa: PTH118
        if os.path.islink(candidate):  # noqa: PTH114
            if len(links) >= MAX_LINKS:
                return Chain(tuple(links), None)
            links.append(candidate)
            target = os.readlink(candidate)  # noqa: PTH115
            if target.startswith("/"):
                current = "/"
            pending.extend(_parts(target, reverse=True))
            continue
        if not pending:
            return Chain(tuple(links), candidate)
        current = candidate
    return Chain(tuple(links), current)  # a target ending in "/" or ".."


def _parts(path: str, *, reverse: bool) -> list[str]:
    parts = [part for part in path.split("/") if part not in ("", ".")]
    return parts[::-1] if reverse else parts


# --- trust -----------------------------------------------------------------------------------


def unsafe_reason(path: str, st: os.stat_result, uid: int, *, link: bool = False) -> str | None:
    """Why another user could change ``path`` (from its ``lstat``), or None.

    Owned by ``uid`` or root, and not writable by group or others (a symlink's own mode
    means nothing; a sticky dir, as ``/tmp``, keeps others from replacing what they do not
    own, so it may hold a link).
    """
    if st.st_uid not in (uid, 0):
        return f"{path} is owned by uid {st.st_uid}"
    sticky = stat.S_ISDIR(st.st_mode) and st.st_mode & stat.S_ISVTX
    if not link and st.st_mode & 0o022 and not sticky:
        who = "its group" if st.st_mode & 0o020 else "other users"
        return f"{path} is writable by {who} (mode {stat.S_IMODE(st.st_mode):o})"
    return None


def trust_problems(model_dir: Path, uid: int) -> list[str]:
    """Who besides ``uid`` and root could change what a re-lock of ``model_dir`` runs.

    The dir, every symlink of ``requirements.txt``'s chain and the dir holding it, and the
    file reached. A re-lock runs pip on that file as ``uid``; pip then builds sdists,
    clones ``-e git+`` URLs and follows ``--index-url`` lines, so whoever may write any of
    these can run code as the daemon's user.
    """
    chain = requirements_chain(model_dir)
    checks: list[tuple[str, bool]] = [(str(model_dir), False)]
    for link in chain.links:
        checks += [(link, True), (os.path.dirname(link), False)]  # noqa: PTH120
    if chain.target is not None:
        checks += [(chain.target, False), (os.path.dirname(chain.target), False)]  # noqa: PTH120
    problems: list[str] = []
    for path, is_link in dict.fromkeys(checks):
        try:
            st = os.stat(path) if path == str(model_dir) else os.lstat(path)  # noqa: PTH116
        except OSError:
            continue  # a dangling link: nothing there to run
        reason = unsafe_reason(path, st, uid, link=is_link)
        if reason is not None and reason not in problems:
            problems.append(reason)
    return problems


def trust_message(model_dir: Path, problems: list[str], uid: int) -> str:
    owner = "root" if uid == 0 else f"uid {uid} or root"
    return (
        f"{'; '.join(problems)}. A re-lock of {model_dir} runs pip on its requirements as "
        f"this daemon's user (uid {uid}), and pip may build sdists, clone `-e git+` URLs and "
        "follow `--index-url` lines, so another user able to change these could run code as "
        f"that user. Make them owned by {owner} and not group- or other-writable "
        "(`chmod go-w`), or watch the dir with a daemon of its owner."
    )


def check_model_dir(model_dir: Path, uid: int) -> None:
    """A dir to watch for a client (blocking): it exists, has a requirements.txt, only the
    daemon's user (or root) may change what a re-lock runs, and that user may write it."""
    if not model_dir.is_dir():
        raise BadRequest("model_dir", f"{model_dir} is not a directory")
    if not (model_dir / REQUIREMENTS_FILENAME).is_file():
        raise BadRequest(
            "model_dir",
            f"{model_dir} has no {REQUIREMENTS_FILENAME} (a model dir lists its dependencies "
            "there; it may be empty)",
        )
    problems = trust_problems(model_dir, uid)
    if problems:
        raise NotPermitted("refusing to watch: " + trust_message(model_dir, problems, uid))
    carton = model_dir / ".carton"
    for directory in (model_dir, carton) if carton.is_dir() else (model_dir,):
        if not os.access(directory, os.W_OK | os.X_OK):
            raise NotPermitted(
                f"the daemon's user (uid {uid}) cannot write to {directory}, where a "
                "re-lock writes the lockfile. Make it writable for that user, or watch it with "
                "a daemon of the dir's owner."
            )


def warn_if_untrusted(model_dir: Path, uid: int) -> bool:
    """For a dir of the configuration file: log what :func:`check_model_dir` would refuse
    (the admin listed it, so it is watched anyway); whether it is trusted."""
    try:
        problems = trust_problems(model_dir, uid)
    except OSError:
        return True  # gone or unreadable: the check round says so
    if problems:
        log.warning("watch %s: %s", model_dir, trust_message(model_dir, problems, uid))
    return not problems
