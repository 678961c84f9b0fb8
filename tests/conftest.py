import atexit
import os
import shutil
import tempfile

import pytest

# Tests never reach a model hub; the embedded model ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# Under pytest-xdist (scripts/dev.py test runs two workers), each worker's `flywheel run`s start
# their Prefect servers on a database of the worker's own: two servers migrating or writing one
# sqlite file at once would lock each other out. Set before anything imports prefect.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["PREFECT_HOME"] = tempfile.mkdtemp(prefix=f"flywheel-tests-prefect-{os.environ['PYTEST_XDIST_WORKER']}-")
    atexit.register(shutil.rmtree, os.environ["PREFECT_HOME"], ignore_errors=True)
    # The cores shared out among the workers, for torch here and in the processes a test starts:
    # two workers of two threads each on 2 cores spin against each other (a run took several times
    # longer). One thread costs a small test round little: 60 s against 51 s on two.
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // workers)))
# as the CLI sets it: run logs reach the Prefect API at INFO, the terminal shows warnings only
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


@pytest.fixture(autouse=True)
def _mlflow_tracking_uri_stays_in_its_test():
    """`mlflow.set_tracking_uri` (tests read a workspace's store with it) also exports
    MLFLOW_TRACKING_URI to this process's environment. Left behind, it would look like the user's
    store to a later test's in-process flywheel, which would log there (storage/tracking.py)."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def prefect_harness():
    """A throwaway Prefect API (sqlite) for the session, as in Prefect's own testing guide."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def load_script(path):
    """A script of the repository (scripts/, benchmarks/) as a module, for tests of its functions."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def script():
    """`script("benchmarks/cli_startup.py")`: that file of the repository, loaded as a module."""
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    return lambda relative: load_script(root / relative)


# The longest test files first (seconds in CI, one worker: resume 240, work pools 200, two-rank
# training 160, served engines 110, end to end 100, lifecycle runs 95). Two workers take whole files
# in this order (scripts/dev.py: --dist loadfile --no-loadscope-reorder), so that no long file is
# left to the end for one worker while the other has nothing to do. Within a file the order stays.
LONGEST_FIRST = (
    "test_resume.py",
    "test_work_pools.py",
    "test_distributed_training.py",
    "test_openai_engine.py",
    "test_end_to_end.py",
    "test_lifecycle_runs.py",
)


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONGEST_FIRST)))
