"""The Prefect API the CLI's flows talk to: the user's own server, or one that flywheel starts and owns.

Prefect 3 starts a temporary API server by itself when no PREFECT_API_URL is set
(prefect.server.api.server.SubprocessASGIServer), but it waits only 20 s for it
(PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS, counted in sleeps, not wall time), which a busy
machine migrating a fresh sqlite database misses (PrefectHQ/prefect#16397, #15138), and it stops
that server only at exit (atexit), so a `kill -9` of the CLI leaves it running.

`prefect_api()` starts the same server the same way (same command line, environment and database,
PREFECT_HOME/prefect.db unless configured otherwise), waits for it generously, and ties its life
to this process: on Linux the kernel signals it when its parent dies, however it dies.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from flywheel import compat
from flywheel.errors import UserError

STARTUP_TIMEOUT_ENV = "FLYWHEEL_PREFECT_STARTUP_TIMEOUT"
_PR_SET_PDEATHSIG = 1
_PORT_RETRIES = 3
_ADVICE = "set PREFECT_API_URL to a running server (prefect server start) or retry"
_ADVICE_SLOW = (
    "set PREFECT_API_URL to a running server (prefect server start) or retry with a longer "
    "FLYWHEEL_PREFECT_STARTUP_TIMEOUT"
)


class PrefectServerError(UserError, RuntimeError):
    """The local Prefect API server could not be started; the message is one actionable line
    (a UserError: the CLI prints it as `flywheel: error: ...` and exits 2)."""


@dataclass(frozen=True)
class OwnedServer:
    """The Prefect API server this process started (and will stop)."""

    url: str  # the API URL, ending in /api
    pid: int  # its output: /proc/<pid>/fd/1 while it runs; a copy is kept when it fails


_owned: OwnedServer | None = None


def owned_server() -> OwnedServer | None:
    """The server `prefect_api()` started and is running now, or None (none started, or the user's own)."""
    return _owned


def configured_url() -> str | None:
    """The user's Prefect API: PREFECT_API_URL from the environment, or from the active Prefect profile."""
    url = os.environ.get("PREFECT_API_URL", "").strip()
    if url:
        return url
    from prefect.settings import get_current_settings

    return get_current_settings().api.url or None


@contextlib.contextmanager
def prefect_api(*, startup_timeout_s: float = 180.0) -> Iterator[str]:
    """Yield the Prefect API URL the flows will use.

    With PREFECT_API_URL configured (environment or profile), that server is used and nothing is
    started. Otherwise a Prefect API server is started on 127.0.0.1 as a child of this process and
    waited for (up to `startup_timeout_s`, or FLYWHEEL_PREFECT_STARTUP_TIMEOUT seconds); inside the
    context PREFECT_API_URL points at it, for this process's flows and for its subprocesses. On exit
    the previous settings come back and the server is stopped. If this process dies first, even by
    SIGKILL, the kernel kills the server too (Linux; elsewhere only a normal exit stops it).

    Enter it from the main thread: on Linux the server's parent-death signal belongs to the thread
    that started it. Raises PrefectServerError (one line) when the server cannot be started.
    """
    with starting_prefect_api(startup_timeout_s=startup_timeout_s) as ready, ready() as url:
        yield url


@contextlib.contextmanager
def starting_prefect_api(
    *, startup_timeout_s: float = 180.0
) -> Iterator[Callable[[], contextlib.AbstractContextManager[str]]]:
    """prefect_api() in two steps, so that the server starts while this process does other work.

    Entering starts the local server (when no server is configured) and returns at once; `ready()`
    is prefect_api(): it waits for the server, then points Prefect's settings at it. The server
    stops when the outer context exits. The CLI enters it once the config is valid: the server's
    start (about 5 s: imports, database migrations) then overlaps the checks, the MLflow store's
    setup and the imports of the flows."""
    user_url = configured_url()
    if user_url:

        @contextlib.contextmanager
        def configured() -> Iterator[str]:
            with _settings(user_url):
                yield user_url

        yield configured
        return
    starting = _Starting(_startup_timeout(startup_timeout_s))

    @contextlib.contextmanager
    def ready() -> Iterator[str]:
        server = starting.wait()
        global _owned
        previous = os.environ.get("PREFECT_API_URL")
        os.environ["PREFECT_API_URL"] = server.url
        _owned = server.info
        try:
            with _settings(server.url):
                try:
                    yield server.url
                finally:
                    _drain_prefect_workers()
        finally:
            _owned = None
            if previous is None:
                os.environ.pop("PREFECT_API_URL", None)
            else:
                os.environ["PREFECT_API_URL"] = previous

    try:
        yield ready
    finally:
        starting.stop()


def _startup_timeout(default: float) -> float:
    text = os.environ.get(STARTUP_TIMEOUT_ENV, "").strip()
    if not text:
        return default
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise PrefectServerError(f"{STARTUP_TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


@contextlib.contextmanager
def _settings(url: str) -> Iterator[None]:
    """Make Prefect's in-process settings say `url`: Prefect reads the environment once, at import,
    into a process-global settings context (prefect.context.GLOBAL_SETTINGS_CONTEXT)."""
    import prefect.context
    from prefect.settings import PREFECT_API_URL, get_current_settings, temporary_settings

    if get_current_settings().api.url == url:
        yield
        return
    with contextlib.ExitStack() as stack:
        stack.enter_context(temporary_settings(updates={PREFECT_API_URL: url}))
        # As prefect_test_harness does: also the global context, for contextvars contexts copied earlier.
        stack.enter_context(compat.prefect_global_settings(prefect.context.get_settings_context()))
        yield


def _drain_prefect_workers() -> None:
    """Send the logs and events Prefect still queues for the server before it stops (as
    prefect_test_harness does), so they neither get lost nor fail at exit."""
    for module, name in (("prefect.logging.handlers", "APILogWorker"), ("prefect.events.worker", "EventsWorker")):
        if module not in sys.modules:
            continue  # never used: nothing queued
        with contextlib.suppress(Exception):  # best effort, at shutdown
            result = getattr(sys.modules[module], name).drain_all(timeout=10)
            if hasattr(result, "close"):  # a coroutine: an event loop runs in this thread; let it be
                result.close()


class _Log:
    """The server's standard output and error, in a file unlinked at once: nothing is left behind,
    however this process ends. A copy is kept only to show a failure."""

    def __init__(self) -> None:
        fd, name = tempfile.mkstemp(prefix="flywheel-prefect-server-", suffix=".log")
        self.fd, self.path = fd, Path(name)
        self._reader = open(name, "rb")  # noqa: SIM115 - its own offset: the server's writes go on at theirs
        try:
            self.path.unlink()
            self.unlinked = True
        except OSError:  # Windows: an open file stays
            self.unlinked = False

    def text(self, limit: int = 16384) -> str:
        size = os.fstat(self.fd).st_size
        self._reader.seek(max(0, size - limit))
        return self._reader.read(limit).decode(errors="replace")

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        os.lseek(self.fd, 0, os.SEEK_SET)

    def keep(self) -> Path:
        if not self.unlinked:
            return self.path
        fd, name = tempfile.mkstemp(prefix="flywheel-prefect-server-", suffix=".log")
        with os.fdopen(fd, "wb") as out:
            self._reader.seek(0)
            out.write(self._reader.read(2**24))
        return Path(name)

    def close(self) -> None:
        self._reader.close()
        os.close(self.fd)
        if not self.unlinked:
            with contextlib.suppress(OSError):
                self.path.unlink()


_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b")


def _what_went_wrong(text: str) -> str:
    """From the server's output: its last exception line, else its last line."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    line = next((ln for ln in reversed(lines) if _EXCEPTION_LINE.match(ln)), lines[-1] if lines else "")
    return line if len(line) <= 300 else line[:297] + "..."


class _Server:
    def __init__(self, proc: subprocess.Popen, url: str, log: _Log) -> None:
        self.proc, self.url, self.log = proc, url, log
        self._atexit: Callable[[], object] | None = None

    @property
    def info(self) -> OwnedServer:
        return OwnedServer(self.url, self.proc.pid)

    def stop(self, *, failed: bool = False) -> Path | None:
        """Stop it (SIGTERM, then SIGKILL), close its log; the kept copy of the log, if any."""
        if self._atexit is not None:
            atexit.unregister(self._atexit)
            self._atexit = None
        died = self.proc.poll()
        if died is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        kept = None
        if failed or died is not None:
            kept = self.log.keep()
        if died is not None and not failed:
            print(
                f"flywheel: warning: the local Prefect API server stopped while in use (exit code {died}): "
                f"{_what_went_wrong(self.log.text())}; its log: {kept}",
                file=sys.stderr,
            )
        self.log.close()
        return kept


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(port: int) -> list[str]:
    """Prefect 3.9.1's SubprocessASGIServer._run_uvicorn_command, on our port."""
    import prefect

    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--app-dir",
        str(prefect.__module_path__.parent),
        "--factory",
        "prefect.server.api.server:create_app",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "error",
        "--lifespan",
        "on",
    ]


def _environment() -> dict[str, str]:
    """As SubprocessASGIServer: no UI, ephemeral services, and every setting set here (profile too)."""
    from prefect.settings import get_current_settings

    return {
        **os.environ,
        "PREFECT_UI_ENABLED": "0",
        "PREFECT__SERVER_EPHEMERAL": "1",
        "PREFECT__SERVER_FINAL": "1",
        **get_current_settings().to_environment_variables(exclude_unset=True),
    }


def _die_with_parent() -> Callable[[], None] | None:
    """A preexec_fn that makes the kernel SIGTERM the child when this process dies (Linux), or None.

    The signal goes when the thread that forked the child ends, hence: start it from the thread that
    outlives it (prefect_api's `with` block runs in one thread). Between fork and exec the child
    only calls prctl (looked up beforehand) and getppid, which take no lock another thread may hold."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up before fork: the child only calls it
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        prctl.restype = ctypes.c_int
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sig = int(signal.SIGTERM)

    def preexec() -> None:
        if prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
            os._exit(70)  # no guarantee: refuse to run rather than outlive the parent unnoticed
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(0)

    return preexec


def _healthy(url: str, timeout: float) -> bool:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through a proxy
    try:
        with opener.open(f"{url}/health", timeout=timeout) as r:
            return r.status == 200
    except (OSError, ValueError):
        return False


class _Starting:
    """A local server spawned at once; wait() until it answers (a port taken meanwhile: respawned)."""

    def __init__(self, timeout: float) -> None:
        try:
            self.log = _Log()
            self.env = _environment()
        except OSError as e:
            raise PrefectServerError(f"could not start a local Prefect API server ({e}); {_ADVICE}") from None
        self.timeout, self.preexec = timeout, _die_with_parent()
        self.deadline = time.monotonic() + timeout
        self.server: _Server | None = self._spawn()  # None once stopped
        self.ready = False

    def _spawn(self) -> _Server:
        port = _free_port()
        try:
            # Its own session: Ctrl-C stops the CLI's flows first, not the API they report to.
            proc = subprocess.Popen(
                _command(port),
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=self.log.fd,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=self.preexec,  # safe despite the threads: see _die_with_parent
            )
        except (OSError, subprocess.SubprocessError) as e:
            self.log.close()
            raise PrefectServerError(f"could not start a local Prefect API server ({e}); {_ADVICE}") from None
        server = _Server(proc, f"http://127.0.0.1:{port}/api", self.log)
        if self.preexec is None:  # no parent-death signal here: stop it at least on a normal exit
            server._atexit = server.stop
            atexit.register(server.stop)
        return server

    def _fail(self, what: str, advice: str = _ADVICE) -> PrefectServerError:
        detail = _what_went_wrong(self.log.text()) or "it wrote nothing"
        assert self.server is not None  # only wait() fails it, before anything stops it
        kept, self.server = self.server.stop(failed=True), None
        return PrefectServerError(
            f"could not start a local Prefect API server {what}: {detail}; {advice} (server log: {kept})"
        )

    def wait(self) -> _Server:
        if self.server is None:
            raise PrefectServerError("the local Prefect API server has stopped (or failed to start)")
        if self.ready:
            return self.server
        delay, retries = 0.1, 0
        while True:
            assert self.server is not None  # only _fail clears it, and that raises
            code = self.server.proc.poll()
            if code is not None:
                # uvicorn exits 3 when it cannot start, e.g. the port was taken since we picked it
                if code == 3 and retries < _PORT_RETRIES and "address already in use" in self.log.text().lower():
                    retries += 1
                    if self.server._atexit is not None:
                        atexit.unregister(self.server._atexit)
                    self.log.reset()
                    self.server = self._spawn()
                    continue
                raise self._fail(f"(it exited with code {code})")
            left = self.deadline - time.monotonic()
            if _healthy(self.server.url, timeout=max(0.2, min(5.0, left))):
                self.ready = True
                return self.server
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"within {self.timeout:g} s", _ADVICE_SLOW)
            time.sleep(min(delay, left))
            delay = min(delay * 1.5, 2.0)

    def stop(self) -> None:
        """Stop the server, whether it ever answered or not (a failed start stopped it already)."""
        if self.server is not None:
            self.server.stop()
            self.server = None
