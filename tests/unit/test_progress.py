"""Progress: a live bar with rate and time left on a terminal, plain lines with both elsewhere."""

import os
import pty
import subprocess
import sys

from flywheel.progress import eta

SCRIPT = """
import time
from flywheel import progress
with progress.stage("generate", 40, "samples") as advance:
    for _ in range(8):
        time.sleep(0.1)
        advance(5)
"""


def test_eta_at_the_current_rate():
    assert eta(10, 40, 2.0) == "0:15"
    assert eta(0, 40, 0.0) == "?"
    assert eta(1, 7201, 1.0) == "2:00:00"
    assert eta(40, 40, 3.0) == "0:00"


def test_plain_lines_off_a_terminal_carry_rate_and_eta():
    p = subprocess.run([sys.executable, "-c", SCRIPT], check=False, capture_output=True, text=True, timeout=60)
    lines = [ln for ln in p.stderr.splitlines() if ln.startswith("[generate]")]
    assert 4 <= len(lines) <= 11, p.stderr  # about every 10%, not every item
    assert lines[-1].startswith("[generate] 40/40 samples (") and "samples/s, eta 0:00)" in lines[-1]


def test_a_terminal_gets_a_live_bar_with_eta():
    pid, fd = pty.fork()
    if pid == 0:  # child: stderr is the pseudo-terminal
        os.execv(sys.executable, [sys.executable, "-c", SCRIPT])
    out = b""
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    os.waitpid(pid, 0)
    text = out.decode(errors="replace")
    assert "\x1b[" in text, "a terminal gets the live (ANSI) bar"
    assert "40/40" in text and "samples/s" in text and "eta" in text
    assert "[generate] " not in text, "no plain lines on a terminal"


def test_round_summaries_are_keyed_by_the_run_not_the_name():
    """Two workspaces that both keep the default name must not share one summary history."""
    import re

    from prefect.types.names import LOWERCASE_LETTERS_NUMBERS_AND_DASHES_ONLY_REGEX as PREFECT_KEY

    from flywheel.progress import summary_key

    a, b = summary_key("20250101-120000-abc123"), summary_key("20250101-120000-def456")
    assert a == "flywheel-20250101-120000-abc123-summary" and a != b
    assert re.match(PREFECT_KEY, summary_key("My_Run.v2")) and summary_key("My_Run.v2") == "flywheel-my-run-v2-summary"


def test_two_runs_of_one_name_publish_separate_summary_histories(prefect_harness):
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flywheel.progress import publish_summary, summary_key

    @flow
    def round_flow(run_id: str):
        publish_summary("flywheel", run_id, 1, {"exact_match": 0.5, "promotion_reasons": ["ok"]})

    for run_id in ("20250101-120000-aaaaaa", "20250101-120000-bbbbbb"):
        round_flow(run_id)
    with get_client(sync_client=True) as client:
        for run_id in ("20250101-120000-aaaaaa", "20250101-120000-bbbbbb"):
            arts = client.read_artifacts(
                artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[summary_key(run_id)]))
            )
            assert len(arts) == 1 and f"flywheel run {run_id}, round 1" in arts[0].data
