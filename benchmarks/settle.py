"""Waiting, before a sample, until creating a file costs what it normally does.

ext4 without a journal (this machine's disk: ``/sys/fs/ext4/vda/journal_task`` is
``<none>``) will not reuse an inode freed in the last 60 s, or 360 s while its inode table
block is dirty: allocating one walks past every such inode of the group, one buffer lookup
each (``recently_deleted()`` in ``fs/ext4/ialloc.c``; ``perf record`` showed it and
``find_get_block_common`` as most of the system time of ``open(O_CREAT)``). After a store or
a venv of tens of thousands of files is deleted, creating a file costs 200-700 us instead of
~30 us for minutes, and every figure that writes a tree would measure that, more or less
depending on which tool happens to run first. Samples therefore start only once a probe says
the file system has settled; :meth:`benchmarks.session.Session.discard` keeps the run itself
from deleting anything until it ends.
"""

from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

#: Files the probe creates (and leaves: deleting them would be what it guards against).
PROBE_FILES = 400
#: Settled: creating a file takes at most this long. Seen here: ~30 us settled, 200-700 us
#: after a large delete.
SETTLED_SECONDS_PER_FILE = 80e-6
#: How long to wait at most; the window is 360 s at worst, so this always ends it.
MAX_WAIT_S = 420.0
POLL_S = 15.0


@dataclass(slots=True)
class Settler:
    """Probes ``probe_root`` before each sample and waits while file creation is slow."""

    probe_root: Path
    waited_s: float = 0.0
    probes: list[float] = field(default_factory=list)  # seconds per file, the last probe each

    def create_cost(self) -> float:
        """Seconds per empty file created in a new directory under ``probe_root``."""
        self.probe_root.mkdir(parents=True, exist_ok=True)
        directory = tempfile.mkdtemp(prefix="probe.", dir=self.probe_root)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
        start = time.perf_counter()
        for i in range(PROBE_FILES):
            os.close(os.open(f"{directory}/{i}", flags, 0o600))
        return (time.perf_counter() - start) / PROBE_FILES

    def wait(self, log: list[str] | None = None) -> float:
        """Sync, then wait until the probe is fast (or ``MAX_WAIT_S`` passed); seconds waited."""
        started = time.monotonic()
        while True:
            os.sync()  # clean inode tables shorten the kernel's window from 360 s to 60 s
            cost = self.create_cost()
            waited = time.monotonic() - started
            if cost <= SETTLED_SECONDS_PER_FILE or waited >= MAX_WAIT_S:
                break
            time.sleep(POLL_S)
        self.probes.append(cost)
        self.waited_s += waited
        if log is not None and waited >= POLL_S:
            log.append(f"waited {waited:.0f} s for file creation to settle ({cost * 1e6:.0f} us)")
        return waited

    def summary(self) -> str:
        if not self.probes:
            return "file creation: not probed"
        slowest = max(self.probes) * 1e6
        return (
            f"file creation probed before each sample ({len(self.probes)}): at most "
            f"{slowest:.0f} us per file; waited {self.waited_s:.0f} s in all for it to settle "
            f"below {SETTLED_SECONDS_PER_FILE * 1e6:.0f} us (benchmarks/settle.py)"
        )
