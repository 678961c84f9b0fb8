"""Set-up is quiet and reproducible: the package builds and installs (editable, as scripts/dev.py
does) without setuptools warnings, ships its data files (rubric templates, preset configs), and
installs the tested set: pyproject's bounded ranges, pinned exactly by constraints.txt."""

import subprocess
import sys
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[2]


def _warnings(text: str) -> list[str]:
    # setuptools' notices (pip shows them as BuildBackendWarning, the hook alone as InformationOnly);
    # pip's notices about this machine's own index settings ("Location … is ignored") are not ours
    return [
        ln
        for ln in text.splitlines()
        if ("warn" in ln.lower() or "Editable installation" in ln or "absent from" in ln) and "Location 'file" not in ln
    ]


def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), str(ROOT)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr
    assert not _warnings(p.stdout + p.stderr), _warnings(p.stdout + p.stderr)
    names = zipfile.ZipFile(next(tmp_path.glob("flywheel-*.whl"))).namelist()
    assert "flywheel/models/templates/self_rewarding.txt" in names
    assert "flywheel/models/templates/pairwise.txt" in names
    assert {f"flywheel/configs/{n}.yaml" for n in ("default", "label_free", "star")} <= set(names)
    assert {f"flywheel/configs/accelerate/{n}.yaml" for n in ("ddp", "fsdp", "deepspeed_zero3")} <= set(names)
    assert "flywheel/configs/prefect/crash-zombie-flows.yaml" in names
    assert not [n for n in names if n.startswith(("flywheel/tests", "flywheel/benchmarks", "flywheel/.venv"))]


def test_editable_build_is_quiet_with_dev_py_settings(tmp_path, script):
    """The PEP 660 hook pip calls for `pip install -e` (run directly: installing for real would
    replace this environment's own editable install), under the environment dev.py gives pip."""
    import os

    hook = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    run = lambda env: subprocess.run(  # noqa: E731
        [sys.executable, "-c", hook, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    quiet = run({**os.environ, **script("scripts/dev.py").QUIET_BUILD})
    assert quiet.returncode == 0, quiet.stderr
    assert not _warnings(quiet.stdout + quiet.stderr), _warnings(quiet.stdout + quiet.stderr)
    assert list(tmp_path.glob("flywheel-*.whl")), "an editable wheel was built"
    # and the settings are what silences it: without them setuptools does warn
    plain = run({k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert any("Editable installation" in ln for ln in _warnings(plain.stdout + plain.stderr))


def _requirements() -> dict[str, list[Requirement]]:
    """pyproject's requirements by group: the runtime dependencies and each extra."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = {f"[{k}]": v for k, v in project["optional-dependencies"].items()}
    return {
        group: [Requirement(r) for r in reqs] for group, reqs in {"runtime": project["dependencies"], **extras}.items()
    }


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, sep, version = line.partition("==")
            assert sep and version and not set(";@ <>") & set(line), f"not an exact pin: {line!r}"
            pins[canonicalize_name(name)] = version
    return pins


def test_every_dependency_has_an_upper_bound():
    """A fresh install never takes a release the tests have not seen (a new transformers or TRL)."""
    unbounded = [
        f"{group} {r}"
        for group, reqs in _requirements().items()
        for r in reqs
        if not any(s.operator in ("<", "<=", "==", "~=", "===") for s in r.specifier)
    ]
    assert not unbounded, unbounded


def test_constraints_pin_each_tested_dependency_inside_its_range():
    pins = _pins()
    assert "flywheel" not in pins and pins["torch"] == "2.13.0"
    # vllm is the GPU extra: resolved on its own (test_engines.py), not in the CPU set CI tests
    tested = [r for group, reqs in _requirements().items() if group != "[vllm]" for r in reqs]
    unpinned = [r.name for r in tested if canonicalize_name(r.name) not in pins]
    outside = [
        f"{r} (pinned {pins[canonicalize_name(r.name)]})"
        for r in tested
        if canonicalize_name(r.name) in pins
        and not r.specifier.contains(pins[canonicalize_name(r.name)], prereleases=True)
    ]
    assert not unpinned and not outside, (unpinned, outside)


def test_installed_packages_are_the_pinned_ones():
    """The environment these tests run in is the tested set: a package at another version than
    constraints.txt pins (an install without -c, a hand-upgraded package) fails here by name."""
    installed = {canonicalize_name(d.metadata["Name"]): d.version for d in metadata.distributions()}
    drift = [
        f"{name} {installed[name]} (pinned {version})"
        for name, version in _pins().items()
        if name in installed and not SpecifierSet(f"=={version}").contains(installed[name], prereleases=True)
    ]
    assert not drift, drift
    missing = [
        r.name
        for r in _requirements()["runtime"] + _requirements()["[dev]"]
        if canonicalize_name(r.name) not in installed
    ]
    assert not missing, missing


def test_setup_installs_with_the_constraints_and_a_changed_pin_reinstalls(tmp_path, script, monkeypatch):
    dev = script("scripts/dev.py")
    calls = []
    monkeypatch.setattr(dev, "sh", lambda *cmd, **kw: calls.append([str(c) for c in cmd]))
    monkeypatch.setattr(dev, "VENV", tmp_path)
    monkeypatch.setattr(dev, "PY", tmp_path / "python")
    (tmp_path / "python").touch()  # an existing environment: setup() only installs into it
    pins = tmp_path / "constraints.txt"
    pins.write_text("torch==2.13.0\nrich==15.0.0\n")
    monkeypatch.setattr(dev, "CONSTRAINTS", pins)
    dev.setup("dev")
    installs = [c for c in calls if "--upgrade" not in c]
    assert len(installs) == 3, calls  # torch, the project, the embedded model
    assert all(c[c.index("-c") + 1] == str(pins) for c in installs), installs
    calls.clear()
    dev.setup("dev")
    assert calls == [], "an unchanged set installs nothing"
    pins.write_text("torch==2.13.0\nrich==15.0.1\n")
    dev.setup("dev")
    assert calls, "a changed pin installs again"


def test_another_torch_keeps_every_other_pin(tmp_path, script, monkeypatch):
    """FLYWHEEL_TORCH picks another torch build or release: the file's torch pin would conflict with it."""
    dev = script("scripts/dev.py")
    monkeypatch.setattr(dev, "VENV", tmp_path)
    monkeypatch.setattr(dev, "CONSTRAINTS", tmp_path / "constraints.txt")
    (tmp_path / "constraints.txt").write_text("# head\ntorch==2.13.0\nrich==15.0.0\n")
    assert dev.constraints() == ["-c", str(tmp_path / "constraints.txt")]
    monkeypatch.setattr(dev, "TORCH", "torch==2.13.1")
    flag, path = dev.constraints()
    assert flag == "-c" and Path(path).read_text().splitlines() == ["# head", "rich==15.0.0"]
