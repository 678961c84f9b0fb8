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
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from flywheel.errors import WorkspaceBusy

_HELD: dict[str, tuple[IO[str], int]] = {}  # resolved lock path → (open file, depth)
_GUARD = threading.Lock()


def held(root: Path) -> bool:
    """Whether this process holds the workspace's lock."""
    return str((Path(root) / ".lock").resolve()) in _HELD


@contextlib.contextmanager
def workspace_lock(root: Path) -> Iterator[None]:
    path = Path(root) / ".lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    key = str(path.resolve())
    with _GUARD:
        if key in _HELD:
            f, depth = _HELD[key]
            _HELD[key] = (f, depth + 1)
        else:
            f = open(path, "a+")
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                f.seek(0)
                holder = f.read().strip() or "another process"
                f.close()
                raise WorkspaceBusy(f"workspace {root} is in use by another flywheel run ({holder}); "
                                    "wait for it to finish or use another --workspace") from None
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
