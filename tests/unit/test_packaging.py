"""Set-up is quiet: the package builds and installs (editable, as scripts/dev.py does) without
setuptools warnings, and ships its data files (rubric templates, preset configs)."""

import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _warnings(text: str) -> list[str]:
    # setuptools' notices (pip shows them as BuildBackendWarning, the hook alone as InformationOnly);
    # pip's notices about this machine's own index settings ("Location … is ignored") are not ours
    return [ln for ln in text.splitlines() if ("warn" in ln.lower() or "Editable installation" in ln
                                               or "absent from" in ln) and "Location 'file" not in ln]


def test_wheel_builds_without_warnings_and_ships_its_data(tmp_path):
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w",
                        str(tmp_path), str(ROOT)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert not _warnings(p.stdout + p.stderr), _warnings(p.stdout + p.stderr)
    names = zipfile.ZipFile(next(tmp_path.glob("flywheel-*.whl"))).namelist()
    assert "flywheel/models/templates/self_rewarding.txt" in names
    assert "flywheel/models/templates/pairwise.txt" in names
    assert "flywheel/configs/default.yaml" in names and "flywheel/configs/label_free.yaml" in names
    assert {f"flywheel/configs/accelerate/{n}.yaml" for n in ("ddp", "fsdp", "deepspeed_zero3")} <= set(names)
    assert "flywheel/configs/prefect/crash-zombie-flows.yaml" in names
    assert not [n for n in names if n.startswith(("flywheel/tests", "flywheel/benchmarks", "flywheel/.venv"))]


def test_editable_build_is_quiet_with_dev_py_settings(tmp_path, script):
    """The PEP 660 hook pip calls for `pip install -e` (run directly: installing for real would
    replace this environment's own editable install), under the environment dev.py gives pip."""
    import os

    hook = "import sys; from setuptools import build_meta; build_meta.build_editable(sys.argv[1])"
    run = lambda env: subprocess.run([sys.executable, "-c", hook, str(tmp_path)], cwd=ROOT,  # noqa: E731
                                     capture_output=True, text=True, timeout=300, env=env)
    quiet = run({**os.environ, **script("scripts/dev.py").QUIET_BUILD})
    assert quiet.returncode == 0, quiet.stderr
    assert not _warnings(quiet.stdout + quiet.stderr), _warnings(quiet.stdout + quiet.stderr)
    assert list(tmp_path.glob("flywheel-*.whl")), "an editable wheel was built"
    # and the settings are what silences it: without them setuptools does warn
    plain = run({k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"})
    assert any("Editable installation" in ln for ln in _warnings(plain.stdout + plain.stderr))
