"""flows/server.py with real processes: the Prefect API server flywheel starts (under CPU load, and
killed with its parent), the user's own server, and a server that cannot start.

Each scenario runs in a subprocess with a fresh PREFECT_HOME, so this test process's own Prefect
settings (imported once, cached) neither leak into it nor get changed by it.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if not sys.platform.startswith("linux"):
    pytest.skip("the parent-death guarantee and the /proc checks are Linux's", allow_module_level=True)

PYTHON = sys.executable

# Runs a tiny flow inside prefect_api() and reports, as one JSON line, what it used.
FLOW_SCRIPT = r"""
import json, os, urllib.request
from prefect import flow
from prefect.runtime import flow_run

from flywheel.flows.server import owned_server, prefect_api

@flow(name="server-probe")
def probe(x: int) -> dict:
    return {"value": x * 2, "flow_run_id": flow_run.id}

env_before = os.environ.get("PREFECT_API_URL")
with prefect_api() as url:
    owned = owned_server()
    out = probe(21)
    # the run as the server it used has it
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(f"{url}/flow_runs/{out['flow_run_id']}", timeout=30) as r:
        recorded = json.load(r)
    env_inside = os.environ.get("PREFECT_API_URL")
print(json.dumps({"url": url, "value": out["value"], "flow_run_id": out["flow_run_id"],
                  "recorded_state": recorded["state"]["type"], "recorded_name": recorded["name"],
                  "owned_pid": owned.pid if owned else None, "env_before": env_before, "env_inside": env_inside,
                  "env_after": os.environ.get("PREFECT_API_URL"), "owned_after": owned_server() is not None}))
"""

# Starts the server, says its pid, then waits to be killed.
SLEEP_SCRIPT = r"""
import time
from flywheel.flows.server import owned_server, prefect_api

with prefect_api():
    print(owned_server().pid, flush=True)
    time.sleep(300)
"""

# Enters prefect_api() and says what it got, running nothing.
PROFILE_SCRIPT = r"""
import json, os
from flywheel.flows.server import owned_server, prefect_api

with prefect_api() as url:
    print(json.dumps({"url": url, "owned": owned_server() is not None,
                      "env_inside": os.environ.get("PREFECT_API_URL")}))
"""

# For the scripts below: the scenario process's own children (the servers it started).
CHILDREN = r"""
import os

def children():
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                status = open(f"/proc/{d}/status").read()
            except OSError:
                continue
            if f"\nPPid:\t{os.getpid()}\n" in status:
                out.append(int(d))
    return out
"""

# Expects the start to fail; reports the error and whether any child process is left.
FAIL_SCRIPT = (
    CHILDREN
    + r"""
import json, os
from flywheel.flows.server import PrefectServerError, owned_server, prefect_api

try:
    with prefect_api():
        print(json.dumps({"error": None}))
except PrefectServerError as e:
    print(json.dumps({"error": str(e), "children": children(), "owned": owned_server() is not None}))
"""
)


# The CLI's way: the server starts at once, the checks run meanwhile, ready() waits for it (every
# `flywheel run` in the tests goes through it). A check that fails stops the server that was starting.
EARLY_SCRIPT = (
    CHILDREN
    + r"""
import json, os
from flywheel.flows.server import owned_server, starting_prefect_api

class CheckFailed(Exception):
    pass

try:
    with starting_prefect_api() as ready:
        spawned = children()  # started at once, before anything waits for it
        owned = owned_server()  # not the process's server until ready() has waited for it
        raise CheckFailed("a bad config")
except CheckFailed:
    pass
print(json.dumps({"spawned": spawned, "owned": owned is not None, "env": os.environ.get("PREFECT_API_URL"),
                  "left": children()}))
"""
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scenario_env(home: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "FLYWHEEL_PREFECT_STARTUP_TIMEOUT"
    }
    return {
        **env,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        **extra,
    }


def run_script(tmp_path: Path, source: str, env: dict[str, str], timeout: float) -> dict:
    script = tmp_path / "scenario.py"
    script.write_text(source)
    p = subprocess.run(
        [PYTHON, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert p.returncode == 0, f"scenario failed ({p.returncode}):\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return json.loads(p.stdout.strip().splitlines()[-1])


def state_of(pid: int) -> str | None:
    """The process's state letter, or None when there is no such process."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("State:"):
                return line.split()[1]
    except OSError:
        return None
    return None


def gone(pid: int) -> bool:
    # a zombie has exited; whether its new parent (init) reaps it is not our business
    return state_of(pid) in (None, "Z", "X")


def is_prefect_server(pid: int) -> bool:
    try:
        return b"prefect.server.api.server:create_app" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def read_line(proc: subprocess.Popen, timeout: float) -> str:
    """One line of the process's standard output, waiting at most `timeout` seconds."""
    deadline, buf = time.monotonic() + timeout, b""
    fd = proc.stdout.fileno()
    while b"\n" not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"no line from the scenario within {timeout} s: {buf!r}"
        if select.select([fd], [], [], min(left, 1.0))[0]:
            chunk = os.read(fd, 4096)
            assert chunk, f"the scenario ended (exit code {proc.wait(timeout=20)}) before saying: {buf!r}"
            buf += chunk
    return buf.split(b"\n", 1)[0].decode()


def stop(proc: subprocess.Popen, group: bool = False) -> None:
    if proc.poll() is None:
        (os.killpg if group else os.kill)(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            (os.killpg if group else os.kill)(proc.pid, signal.SIGKILL)
            proc.wait(timeout=20)


def test_first_start_under_load_runs_a_flow_on_the_owned_server(tmp_path):
    # Each in its own session, as the server is: with the scheduler's autogroups (Linux desktops and
    # servers alike) a session shares the CPU with sessions, so load from this one would spare it.
    busy = [
        subprocess.Popen(
            [PYTHON, "-c", "import time\nt = time.time()\nwhile time.time() - t < 150: pass"], start_new_session=True
        )
        for _ in range(2)
    ]
    try:
        out = run_script(tmp_path, FLOW_SCRIPT, scenario_env(tmp_path / "home"), timeout=300)
    finally:
        for p in busy:
            p.kill()
            p.wait(timeout=20)
    assert out["value"] == 42
    assert out["recorded_state"] == "COMPLETED" and out["recorded_name"]
    assert out["owned_pid"] is not None and out["url"].startswith("http://127.0.0.1:")
    assert out["env_before"] is None and out["env_inside"] == out["url"] and out["env_after"] is None
    assert not out["owned_after"]
    assert (tmp_path / "home" / "prefect.db").is_file()  # Prefect's own database location
    assert gone(out["owned_pid"])  # stopped on the way out


def test_a_server_started_early_is_stopped_when_a_check_fails(tmp_path):
    out = run_script(tmp_path, EARLY_SCRIPT, scenario_env(tmp_path / "home"), timeout=300)
    assert len(out["spawned"]) == 1 and not out["owned"] and out["env"] is None
    assert out["left"] == [], "the failed check left no server behind"


def test_sigkill_of_the_parent_alone_takes_the_server_down(tmp_path):
    script = tmp_path / "scenario.py"
    script.write_text(SLEEP_SCRIPT)
    proc = subprocess.Popen(
        [PYTHON, str(script)],
        env=scenario_env(tmp_path / "home"),
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    server = None
    try:
        server = int(read_line(proc, timeout=240))
        assert is_prefect_server(server) and not gone(server)
        os.kill(proc.pid, signal.SIGKILL)  # this pid only: not its process group
        proc.wait(timeout=20)
        deadline = time.monotonic() + 15
        while not gone(server) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert gone(server), f"the Prefect server {server} outlived its killed parent (state {state_of(server)})"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=20)
        if server is not None and not gone(server) and is_prefect_server(server):
            os.kill(server, signal.SIGKILL)


def test_the_users_own_server_is_used_and_nothing_is_started(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}/api"
    with open(tmp_path / "user-server.log", "w") as log:
        user = subprocess.Popen(
            [PYTHON, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=scenario_env(tmp_path / "user-home"),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # its own group, to stop all of it
        try:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            deadline = time.monotonic() + 240
            while True:
                try:
                    with opener.open(f"{url}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                so_far = (tmp_path / "user-server.log").read_text()[-3000:]
                assert user.poll() is None and time.monotonic() < deadline, (
                    f"the user's Prefect server did not start:\n{so_far}"
                )
                time.sleep(0.5)
            home = tmp_path / "home"
            out = run_script(tmp_path, FLOW_SCRIPT, scenario_env(home, PREFECT_API_URL=url), timeout=300)
            assert out["url"] == url and out["env_inside"] == url and out["env_after"] == url
            assert out["owned_pid"] is None  # nothing started
            assert out["value"] == 42 and out["recorded_state"] == "COMPLETED"
            assert not (home / "prefect.db").exists()  # no server of ours made a database
            # the run is in the user's server, as its API lists it
            body = json.dumps({"flow_runs": {"id": {"any_": [out["flow_run_id"]]}}}).encode()
            req = urllib.request.Request(
                f"{url}/flow_runs/filter", data=body, headers={"Content-Type": "application/json"}
            )
            with opener.open(req, timeout=30) as r:
                runs = json.load(r)
            assert [(fr["id"], fr["state"]["type"]) for fr in runs] == [(out["flow_run_id"], "COMPLETED")]
        finally:
            stop(user, group=True)


def test_an_api_url_in_the_active_profile_counts_as_the_users_own(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    url = f"http://127.0.0.1:{free_port()}/api"  # nothing listens: it must not matter, nothing is started
    (home / "profiles.toml").write_text(f'active = "mine"\n[profiles.mine]\nPREFECT_API_URL = "{url}"\n')
    out = run_script(tmp_path, PROFILE_SCRIPT, scenario_env(home), timeout=120)
    assert out == {"url": url, "owned": False, "env_inside": None}  # the profile's URL, untouched
    assert not (home / "prefect.db").exists()


@pytest.mark.parametrize("case", ["timeout", "prefect_home_is_a_file"])
def test_a_server_that_cannot_start_gives_one_actionable_line(tmp_path, case):
    if case == "timeout":
        env = scenario_env(tmp_path / "home", FLYWHEEL_PREFECT_STARTUP_TIMEOUT="0.5")
    else:
        (tmp_path / "home").write_text("not a directory")
        env = scenario_env(tmp_path / "home")
    t0 = time.monotonic()
    out = run_script(tmp_path, FAIL_SCRIPT, env, timeout=240)
    error = out["error"]
    assert error is not None, "the server started"
    log = Path(error.rsplit("(server log: ", 1)[1].rstrip(")"))
    try:
        assert "\n" not in error and error.startswith("could not start a local Prefect API server")
        assert "set PREFECT_API_URL to a running server (prefect server start) or retry" in error
        if case == "timeout":
            assert "within 0.5 s" in error and "FLYWHEEL_PREFECT_STARTUP_TIMEOUT" in error
            assert time.monotonic() - t0 < 120
        else:
            assert "exited with code" in error and "unable to open database file" in error
        assert out["children"] == [] and not out["owned"]  # the server was stopped, and waited for
        assert log.is_file()  # kept, for the user to read
    finally:
        log.unlink(missing_ok=True)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:  # the field after the state is the parent's pid
            out.append(int(stat.parent.name))
    return out


def test_kill_9_of_the_flywheel_cli_leaves_no_server(tmp_path):
    """The real `flywheel run`, killed with SIGKILL alone (not its process group) while its flow runs:
    the Prefect API server it started does not outlive it."""
    (tmp_path / "c.yaml").write_text("task: {prompts_per_round: 8}\nsampling: {n: 2}\nbenchmark: {size: 400}\n")
    env = scenario_env(tmp_path / "home", HF_HUB_OFFLINE="1")
    env.pop("MLFLOW_TRACKING_URI", None)
    cli = subprocess.Popen(
        [PYTHON, "-m", "flywheel.flows.cli", "run", "--config", "c.yaml", "--workspace", str(tmp_path / "ws")],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    server = None
    try:
        deadline = time.monotonic() + 240
        while server is None:
            assert cli.poll() is None, cli.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "the CLI started no Prefect server"
            server = next((c for c in _children(cli.pid) if is_prefect_server(c)), None)
            time.sleep(0.5)
        # let the flow get under way (round 0's 400-item benchmark keeps it busy), then kill the CLI alone
        deadline = time.monotonic() + 240
        while not (tmp_path / "ws" / "runs").is_dir():
            assert cli.poll() is None and time.monotonic() < deadline, "the flow did not start"
            time.sleep(0.5)
        os.kill(cli.pid, signal.SIGKILL)
        cli.wait(timeout=20)
        deadline = time.monotonic() + 15
        while not gone(server) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gone(server), "the Prefect API server outlived the killed CLI"
    finally:
        if cli.poll() is None:
            cli.kill()
            cli.wait(timeout=20)
        if server is not None and not gone(server):
            os.kill(server, signal.SIGKILL)
