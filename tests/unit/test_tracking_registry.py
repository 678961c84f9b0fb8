"""The model registry on a real MLflow store in tmp, with a toy checkpoint: a referenced checkpoint
changed after registration is refused at load, names with quotes are found again, registration is
quiet unless MLflow's logger shows INFO, and a version's tags and description are kept as given."""

import logging
from pathlib import Path

import pytest

WORDS = ["what", "is", "2", "3", "5", "+", "-", "?", "the", "answer"]


def toy_checkpoint(path: Path, seed: int = 0) -> Path:
    """A one-layer Llama with a word-level tokenizer: enough for from_pretrained and generate."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)
    torch.manual_seed(seed)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=len(vocab),
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=32,
            eos_token_id=1,
            pad_token_id=1,
        )
    ).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """One sqlite store for the module: creating its tables takes seconds; each test has its own experiment."""
    return tmp_path_factory.mktemp("ws")


@pytest.fixture
def store(workspace, monkeypatch, request):
    """A new run in this test's own experiment, in the module's store."""
    from flywheel.storage import tracking

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    exp = tracking.setup(workspace, request.node.name)
    return lambda: tracking.start_run(exp, "round-1", tags={"flywheel.run_id": "r1"})


@pytest.fixture
def mlflow_logger():
    """The `mlflow` logger's level, restored after the test (the CLI sets it; tests set it here)."""
    logger = logging.getLogger("mlflow")
    before = logger.level
    yield logger
    logger.setLevel(before)


def test_a_referenced_checkpoint_changed_after_registration_is_refused_at_load(store, tmp_path, mlflow_logger):
    import mlflow

    from flywheel.models import loading
    from flywheel.storage import tracking

    mlflow_logger.setLevel(logging.ERROR)
    ckpt = toy_checkpoint(tmp_path / "round=1")
    registered = loading.weights_hash(str(ckpt))
    version = tracking.log_and_register_model(store(), ckpt, "toy", weights_sha256=registered)
    model = mlflow.pyfunc.load_model(f"models:/toy/{version}")
    assert isinstance(model.predict(["what is 2 + 3 ?"], params={"max_new_tokens": 2})[0], str)

    toy_checkpoint(ckpt, seed=1)  # retrained in place: other weights under the same path
    changed = loading.weights_hash(str(ckpt))
    assert changed != registered
    with pytest.raises(ValueError) as e:
        mlflow.pyfunc.load_model(f"models:/toy/{version}")
    message = str(e.value)
    assert "\n" not in message and f"registered model toy version {version}:" in message
    assert f"weights sha256 {changed}, not the registered {registered}" in message
    # loaded by the logged model's own URI, the version is found in the registry
    source = mlflow.MlflowClient().get_model_version("toy", version).source
    with pytest.raises(ValueError, match=f"^registered model toy version {version}: the checkpoint "):
        mlflow.pyfunc.load_model(source)


def test_the_served_model_hashes_weights_as_flywheel_does(tmp_path):
    from flywheel.models import loading, pyfunc

    ckpt = toy_checkpoint(tmp_path / "ckpt")
    (ckpt / "extra.bin").write_bytes(b"second weights file")
    (ckpt / "notes.txt").write_text("not weights")
    assert pyfunc.weights_hash(str(ckpt)) == loading.weights_hash(str(ckpt)) is not None
    assert pyfunc.weights_hash(str(tmp_path)) is loading.weights_hash(str(tmp_path)) is None


@pytest.mark.parametrize("name", ["a'b", 'say "hi"', 'it\'s "both"'])
def test_names_with_quotes_find_their_version_again(store, tmp_path, name, mlflow_logger):
    """A resumed round finds the version it registered before (and registers no second one)."""
    import mlflow

    from flywheel.storage import tracking

    mlflow_logger.setLevel(logging.ERROR)
    ckpt = toy_checkpoint(tmp_path / "ckpt")
    run = store()
    first = tracking.log_and_register_model(run, ckpt, name)
    assert tracking.log_and_register_model(run, ckpt, name) == first == "1"
    assert [str(v.version) for v in mlflow.MlflowClient().search_model_versions(f"run_id = '{run}'")] == ["1"]


@pytest.mark.parametrize("value", ["a'b", 'a"b', "a'b\"c", "back\\slash", "plain-1"])
def test_runs_are_found_by_tag_values_with_quotes(store, workspace, value, request):
    from flywheel.storage import tracking

    exp = tracking.setup(workspace, request.node.name)
    other = tracking.start_run(exp, "other", tags={"flywheel.run_id": value + "x"})
    mine = tracking.start_run(exp, "mine", tags={"flywheel.run_id": value, "flywheel.round": "1"})
    assert tracking.find_run(exp, {"flywheel.run_id": value, "flywheel.round": "1"}) == mine != other
    assert tracking.find_run(exp, {"flywheel.run_id": value, "flywheel.round": "2"}) is None


@pytest.mark.parametrize("level, notices", [(logging.ERROR, False), (logging.INFO, True)])
def test_registering_prints_nothing_unless_mlflow_logs_info(
    store, tmp_path, capfd, mlflow_logger, level, notices, monkeypatch
):
    """The CLI sets the `mlflow` logger to ERROR without --verbose: MLflow's registration notices
    (printed past that logger) stay off the terminal; with --verbose (INFO) they show."""
    from flywheel.storage import tracking

    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # as the CLI sets it
    ckpt = toy_checkpoint(tmp_path / "ckpt")
    run = store()
    capfd.readouterr()
    mlflow_logger.setLevel(level)
    tracking.log_and_register_model(run, ckpt, f"quiet-{level}")
    out, err = capfd.readouterr()
    if notices:
        assert f"Successfully registered model 'quiet-{level}'" in err and "Created version '1'" in err
    else:
        assert out + err == ""
    from mlflow.utils import logging_utils

    assert type(logging_utils.MLFLOW_LOGGING_STREAM).__name__ == "MlflowLoggingStream", "MLflow's own stream is back"


def test_version_tags_and_description_are_kept_as_given(store, tmp_path, mlflow_logger):
    import mlflow

    from flywheel.storage import tracking

    mlflow_logger.setLevel(logging.ERROR)
    tags = {"exact_match": "0.3750", "mean_score": "0.4180", "flywheel.round": "1", "promoted": "true"}
    description = "flywheel run r1, round 1: test exact match 37.5% (mean score 41.8%); promoted to champion"
    version = tracking.log_and_register_model(
        store(), toy_checkpoint(tmp_path / "ckpt"), "tagged", tags=tags, description=description
    )
    got = mlflow.MlflowClient().get_model_version("tagged", version)
    assert got.tags == tags and got.description == description
