"""A reader that probes the workspace lock (`flywheel runs`) never makes a run fail: a run that
meets a probe waits it out; only a holder that stays is another run."""

import subprocess
import sys
import time

import pytest

from flywheel.errors import WorkspaceBusy
from flywheel.storage import lock

HOLD = """
import fcntl, sys, time
f = open(sys.argv[1] + "/.lock", "a+")
fcntl.flock(f, fcntl.LOCK_EX)
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def holder(ws, seconds: float) -> subprocess.Popen:
    ws.mkdir(exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(ws), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def test_a_run_waits_out_a_brief_probe(tmp_path):
    ws = tmp_path / "ws"
    p = holder(ws, 0.5)
    assert lock.busy(ws)
    t0 = time.monotonic()
    with lock.workspace_lock(ws):
        waited = time.monotonic() - t0
        assert lock.held(ws) and not lock.busy(ws)
    assert 0.2 < waited < lock.WAIT_S + 0.5
    p.wait(10)


def test_a_holder_that_stays_is_another_run(tmp_path):
    ws = tmp_path / "ws"
    p = holder(ws, 10)
    try:
        with (
            pytest.raises(WorkspaceBusy, match="in use by another flywheel run"),
            lock.workspace_lock(ws, wait_s=0.3),
        ):
            pass
    finally:
        p.kill()
        p.wait(10)
    assert not lock.busy(ws)
