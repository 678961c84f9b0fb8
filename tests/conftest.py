import os

import pytest

# Tests never reach a model hub; the embedded model ships in a package.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# as the CLI sets it: run logs reach the Prefect API at INFO, the terminal shows warnings only
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "WARNING")


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
