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
