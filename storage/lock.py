"""One flywheel run per workspace at a time: an exclusive lock on `<workspace>/.lock`.

The lock is an OS file lock (flock), so it is released when its process ends, however it
ends: a run killed with SIGKILL never leaves a stale lock behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path


class WorkspaceBusy(RuntimeError):
    pass


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    path = Path(root) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    f = open(path, "a+")
    try:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise WorkspaceBusy(f"workspace {root} is in use by another flywheel run ({holder}); "
                                "wait for it to finish or use another --workspace") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        yield
    finally:
        f.close()
