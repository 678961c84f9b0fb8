"""No secret reaches the MLflow store: params, tags, run names, text artifacts, tables and logged
dicts all pass through credential masking. A real store in tmp is scanned, every file, byte by byte."""

import json
from pathlib import Path

import pytest

from flywheel.errors import mask_credentials

PASSWORD = "pl%40nted:pw-4242"  # a percent-encoded '@' and a ':' inside the password
URL = f"postgresql+psycopg://flywheel:{PASSWORD}@db.example:5432/runs"
API_KEY = "sk-planted-unit-0123456789abcdef"
# No known shape: masked because an environment variable named like a secret holds it.
OPAQUE = "opaque-planted-98765"
SECRETS = (PASSWORD, "pl@nted:pw-4242", API_KEY, OPAQUE)


def leaks(root: Path) -> list[tuple[str, str]]:
    return [
        (str(p.relative_to(root)), s)
        for p in sorted(root.rglob("*"))
        if p.is_file()
        for s in SECRETS
        if s.encode() in p.read_bytes()
    ]


class TrainingArgs:
    """What TRL's config gives the training callback: to_dict()."""

    def to_dict(self):
        return {"hub_token": OPAQUE, "hub_model_id": URL, "beta": 0.1, "report_to": ["none"]}


def test_planted_secrets_reach_no_file_of_a_real_mlflow_store(tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from flywheel.storage import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("FLYWHEEL_TEST_KEY", OPAQUE)
    ws = tmp_path / "ws"
    exp = tracking.setup(ws, "secrets")
    run = tracking.start_run(
        exp,
        f"round-1 {URL}",
        tags={"flywheel.run_id": "r1", "flywheel.endpoint": f"https://bob:{PASSWORD}@h.example/v1"},
    )
    tracking.log_params(run, {"cfg.store.uri": URL, "cfg.judge.api_key": API_KEY, "cfg.sampling.n": 4})
    tracking.set_tags(run, {"flywheel.note": f"served with {API_KEY}", "flywheel.error": f"HTTP 401 for {OPAQUE}"})
    config = tmp_path / "config.yaml"
    config.write_text(f"store: {URL}\nopenai:\n  api_key: {API_KEY}\nrounds: 2\n")
    tracking.log_artifact(run, config)
    tracking.log_table(run, pd.DataFrame({"prompt": [f"connect to {URL}"], "score": [1.0]}), "samples/c.json")
    tracking.training_callback(run).on_train_begin(TrainingArgs(), None, None)
    assert ws.is_dir() and not leaks(ws), leaks(ws)

    # what is not a secret stays readable, under the names it was logged with
    client = mlflow.MlflowClient()
    data = client.get_run(run).data
    assert data.params == {
        "cfg.store.uri": "postgresql+psycopg://***@db.example:5432/runs",
        "cfg.judge.api_key": "***",
        "cfg.sampling.n": "4",
    }
    assert data.tags["flywheel.note"] == "served with ***" and data.tags["flywheel.error"] == "HTTP 401 for ***"
    assert data.tags["flywheel.endpoint"] == "https://***@h.example/v1" and data.tags["flywheel.run_id"] == "r1"
    assert tracking.find_run(exp, {"flywheel.run_id": "r1"}) == run
    logged = Path(client.download_artifacts(run, "config.yaml", str(tmp_path / "down"))).read_text()
    assert logged == "store: postgresql+psycopg://***@db.example:5432/runs\nopenai:\n  api_key: ***\nrounds: 2\n"
    trl = json.loads(Path(client.download_artifacts(run, "train/trl_config.json", str(tmp_path / "down"))).read_text())
    assert trl == {
        "hub_token": "***",
        "hub_model_id": "postgresql+psycopg://***@db.example:5432/runs",
        "beta": 0.1,
        "report_to": ["none"],
    }


@pytest.mark.parametrize(
    "text, masked",
    [
        ("postgresql+psycopg://me:pa55@db:5432/mlflow", "postgresql+psycopg://***@db:5432/mlflow"),
        ("https://u:p:a:ss@x.org/a and s3://k:p%40s@bucket/key", "https://***@x.org/a and s3://***@bucket/key"),
        ("mysql://u:p@ss@db/x", "mysql://***@db/x"),  # an unescaped '@' in the password
        ("https://ghp_onlyatokenasuser@github.com/o/r", "https://***@github.com/o/r"),
        ("GET https://h/v1/models?api_key=abc123&limit=2", "GET https://h/v1/models?api_key=***&limit=2"),
        ("host=db dbname=x password=hunter2 user=me", "host=db dbname=x password=*** user=me"),
        ("Authorization: Bearer abcdefghijklmnop0123", "Authorization: Bearer ***"),
        ("keys sk-proj-abcdefghijklmnop0123 hf_abcdefghijklmnopqrstuvwx AKIAABCDEFGHIJKLMNOP", "keys *** *** ***"),
    ],
)
def test_credentials_of_every_common_shape_are_masked(text, masked):
    assert mask_credentials(text) == masked


@pytest.mark.parametrize(
    "text",
    [
        "sqlite:////tmp/ws/mlflow.db",
        "file:///data/a@b/x",
        "https://h.org:8080/v1",
        "max_new_tokens=32",
        "guard basic_arithmetic 30.0% vs 40.0%",
        "embedded:smollm2-135m-instruct",
        "me@example.org",
        "weights 3f0c1e0d9a6b4c2e8f7a6b5c4d3e2f1a0b9c8d7e6f5a4b3c2d1e0f9a8b7c6d5e",
        "task-0123456789abcdefgh",
    ],
)
def test_what_is_not_a_credential_is_kept(text):
    assert mask_credentials(text) == text


def test_a_secret_named_environment_variable_is_masked_whatever_its_shape(monkeypatch):
    monkeypatch.setenv("MY_SERVER_API_KEY", "token-abc123-opaque")
    monkeypatch.setenv("SOME_FLAG_KEY", "short")  # too short to mask without garbling text
    monkeypatch.setenv("MODEL_NAME", "a-long-non-secret-value")
    assert (
        mask_credentials("401 with token-abc123-opaque; short; a-long-non-secret-value")
        == "401 with ***; short; a-long-non-secret-value"
    )
