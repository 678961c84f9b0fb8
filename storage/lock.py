"""One flywheel run per workspace at a time: an exclusive lock on `<workspace>/.lock`.

The lock is an OS file lock (flock), so it is released when its process ends, however it
ends: a run killed with SIGKILL never leaves a stale lock behind. It is re-entrant within a
process: the CLI takes it before its checks and holds it through the flow, which takes it
again (a deployment's flow run, with no CLI around it, takes it itself), so there is no moment
between the two in which a second run could slip in.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flywheel.errors import WorkspaceBusy

_HELD: dict[str, tuple[IO[str], int]] = {}  # resolved lock path → (open file, depth)
_GUARD = threading.Lock()


def held(root: Path) -> bool:
    """Whether this process holds the workspace's lock."""
    return str((Path(root) / ".lock").resolve()) in _HELD


# A reader (`flywheel runs`) probes the lock for an instant; a run that meets such a probe waits it
# out instead of taking the reader for a second run.
WAIT_S = 2.0


def _take(f: IO[str], wait_s: float) -> bool:
    deadline = time.monotonic() + wait_s
    while True:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)


def busy(root: Path) -> bool:
    """Whether another process holds the workspace's lock (a probe: taken and released at once)."""
    path = Path(root) / ".lock"
    if held(root) or not path.is_file():
        return False
    with open(path) as f:
        if not _take(f, 0):
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
    return False


@contextlib.contextmanager
def workspace_lock(root: Path, wait_s: float = WAIT_S) -> Iterator[None]:
    path = Path(root) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            f, depth = _HELD[key]
            _HELD[key] = (f, depth + 1)
        else:
            f = open(path, "a+")  # noqa: SIM115 - held open as the lock, past this block
            if not _take(f, wait_s):
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise WorkspaceBusy(
                    f"workspace {root} is in use by another flywheel run ({holder}); "
                    "wait for it to finish or use another --workspace"
                ) from None
            f.seek(0)
            f.truncate()
            f.write(f"pid {os.getpid()}")
            f.flush()
            _HELD[key] = (f, 1)
    try:
        yield
    finally:
        with _GUARD:
            f, depth = _HELD[key]
            if depth > 1:
                _HELD[key] = (f, depth - 1)
            else:
                del _HELD[key]
                f.close()
