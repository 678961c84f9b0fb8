import pytest

from flywheel.config import ConfigError, FlywheelConfig, load_config


def test_defaults_are_the_documented_ones():
    c = FlywheelConfig()
    assert (c.rounds, c.sampling.n, c.benchmark.size, c.task.name) == (3, 8, 200, "chain_sum")


@pytest.mark.parametrize(
    "overrides, field",
    [
        ({"rounds": 0}, "rounds"),
        ({"sampling": {"n": 1}}, "sampling.n"),
        ({"bogus": 1}, "bogus"),
        ({"sampling": {"temprature": 0.5}}, "sampling.temprature"),
        ({"train": {"dpo": {"betta": 0.1}}}, "train.dpo"),
    ],
)
def test_bad_values_name_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value).startswith(field), str(e.value)
    assert "\n" not in str(e.value)


def test_dpo_overrides_merge_over_defaults():
    c = load_config(None, {"train": {"dpo": {"beta": 0.3}}})
    assert c.train.dpo["beta"] == 0.3
    assert c.train.dpo["learning_rate"] == FlywheelConfig().train.dpo["learning_rate"]


def test_yaml_then_flags(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("rounds: 5\nsampling:\n  n: 4\n")
    c = load_config(f, {"rounds": 2})
    assert (c.rounds, c.sampling.n) == (2, 4)


def test_missing_and_malformed_yaml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1,\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"judge": {"sources": ["llm_judge"]}}, "curation.reward names 'verifier', which is not among judge.sources"),
        ({"curation": {"reward": {"verifier": 1.0, "majority_vote": 0.5}}}, "curation.reward names 'majority_vote'"),
        ({"curation": {"reward": {"verifier": 0.0}}}, "curation.reward: a weighted reward needs at least one non-zero"),
        ({"curation": {"consistency": ["verifier", "pairwise_judge"]}}, "curation.consistency names 'pairwise_judge'"),
        ({"judge": {"sources": ["verifier", "verifier"]}}, "two sources named 'verifier'"),
        ({"judge": {"sources": ["verifier", "telepathy"]}}, "judge.sources.1: unknown type 'telepathy'"),
        ({"judge": {"sources": [{"type": "verifier", "match": "callable"}]}}, "match: callable needs callable"),
        ({"curation": {"cream": "skip"}}, "curation.cream needs the 'llm_judge' judge with previous: true"),
    ],
)
def test_reward_sources_and_their_uses_are_checked(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert message in str(e.value) and "\n" not in str(e.value)


def test_source_shorthand_and_names():
    c = load_config(
        None,
        {
            "judge": {
                "sources": [
                    "verifier",
                    "majority_vote",
                    {"type": "llm_judge", "previous": True},
                    {"type": "verifier", "name": "exact", "match": "exact"},
                ]
            },
            "curation": {"reward": {"majority_vote": 1.0, "exact": 0.5}},
        },
    )
    assert c.judge.names() == ["verifier", "majority_vote", "llm_judge", "llm_judge@previous", "exact"]
    assert c.curation.reward_name() == "1*majority_vote+0.5*exact"


def test_hash_ignores_workspace_but_not_meaning():
    a = FlywheelConfig(workspace="a")
    assert a.hash() == FlywheelConfig(workspace="b").hash()
    assert a.hash() != FlywheelConfig(seed=1).hash()
    assert a.hash() == FlywheelConfig(judge={"batch_size": 3}).hash(), "the judge's batch size is a speed knob"
    # decoding's batch shape can flip a sampled token in the logits' last bits: it is part of the meaning
    assert a.hash() != FlywheelConfig(sampling={"batch_size": 7}).hash()


def test_flat_params_are_prefixed():
    flat = FlywheelConfig().flat()
    assert flat["cfg.sampling.n"] == "8"
    assert all(k.startswith("cfg.") for k in flat)


def test_shipped_default_yaml_is_the_defaults():
    from pathlib import Path

    import yaml

    shipped = Path(__file__).resolve().parents[2] / "configs" / "default.yaml"
    assert load_config(shipped) == FlywheelConfig()

    # every setting is written out, so the file is the list of settings it says it is
    def missing(defaults: dict, written: dict, at: str) -> list[str]:
        out = []
        for k, v in defaults.items():
            if k not in written:
                out.append(at + k)
            elif isinstance(v, dict) and isinstance(written[k], dict):
                out += missing(v, written[k], f"{at}{k}.")
        return out

    assert missing(FlywheelConfig().model_dump(mode="json"), yaml.safe_load(shipped.read_text()), "") == []


@pytest.mark.parametrize("name, kind", [("ddp", "MULTI_GPU"), ("fsdp", "FSDP"), ("deepspeed_zero3", "DEEPSPEED")])
def test_shipped_accelerate_configs_parse_as_accelerate_configs(name, kind):
    """By name, the shipped file; read by Accelerate's own loader (they need GPUs to run)."""
    from accelerate.commands.config.config_args import load_config_from_file

    c = load_config(None, {"train": {"accelerate_config": name}})
    assert c.train.launched() and c.train.accelerate_config.is_file()
    cluster = load_config_from_file(str(c.train.accelerate_config))
    assert str(cluster.distributed_type).endswith(kind) and cluster.num_processes == 8
    assert not load_config(None, {}).train.launched()
    assert load_config(None, {"train": {"num_processes": 2}}).train.launched()


def test_workers_are_speed_and_shards_are_meaning():
    from flywheel.config import load_config

    base = load_config()
    assert (
        load_config(None, {"model": {"workers": 2}, "sampling": {"shards": 2}}).hash()
        == load_config(None, {"sampling": {"shards": 2}}).hash()
    )
    assert load_config(None, {"sampling": {"shards": 2}}).hash() != base.hash()
    assert load_config(None, {"sampling": {"shards": 1}}).hash() == base.hash()  # the default, as hashed before


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"model": {"workers": 2}}, "model.workers (2) > sampling.shards (1)"),
        ({"model": {"workers": 0}}, "model.workers: Input should be greater than or equal to 1"),
        (
            {"judge": {"sources": ["verifier", {"type": "llm_judge", "model": {"name": "x", "workers": 2}}]}},
            "model.workers shards the generate stage only",
        ),
    ],
)
def test_bad_worker_settings(overrides, message):
    from flywheel.config import load_config
    from flywheel.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(None, overrides)


def _judge_endpoint(base_url: str) -> dict:
    return {
        "judge": {
            "sources": [
                "verifier",
                {
                    "type": "llm_judge",
                    "model": {
                        "name": "big-judge",
                        "engine": "openai",
                        "openai": {"base_url": base_url, "api_key_env": "JUDGE_KEY"},
                    },
                },
            ]
        }
    }


@pytest.mark.parametrize(
    "url", ["http://alice:hunter2@127.0.0.1:8000/v1", "https://hunter2@judge.example/v1", "http://alice:@h/v1"]
)
def test_credentials_in_an_endpoint_url_are_refused(url):
    """The config is saved with the run (config.yaml) and logged as MLflow params: a password in the
    URL would be kept in both."""
    with pytest.raises(ConfigError) as e:
        load_config(None, _judge_endpoint(url))
    msg = str(e.value)
    assert msg.startswith("judge.sources.1.llm_judge.model.openai.base_url: holds credentials"), msg
    assert "api_key_env" in msg and "hunter2" not in msg and "\n" not in msg


@pytest.mark.parametrize("url", ["http://127.0.0.1:8000/v1", "https://judge.example/v1?team=a@b"])
def test_endpoint_urls_without_credentials_load(url):
    c = load_config(None, _judge_endpoint(url))
    assert c.judge.sources[1].model.openai.base_url == url


def test_seed_fits_the_seeders():
    """A round's training seed (seed + round) seeds numpy, which takes seeds below 2**32."""
    assert load_config(None, {"seed": 2**31 - 1}).seed == 2**31 - 1
    with pytest.raises(ConfigError, match=r"^seed: Input should be less than 2147483648"):
        load_config(None, {"seed": 2**40})


@pytest.mark.parametrize(
    "content, message",
    [
        (b"rounds: \x80\x81\n", "is not UTF-8 text (byte 9)"),
        (b"name: 2001-13-01\n", "is not valid YAML: month must be in 1..12"),
        (b"seed: " + b"1" * 5000 + b"\n", "is not valid YAML: Exceeds the limit (4300 digits)"),
        (b"a: " + b"[" * 5000 + b"]" * 5000 + b"\n", "is not valid YAML"),
        (b"- 1\n- 2\n", "must hold a mapping at the top level"),
    ],
)
def test_unreadable_yaml_is_one_config_error(tmp_path, content, message):
    f = tmp_path / "c.yaml"
    f.write_bytes(content)
    with pytest.raises(ConfigError) as e:
        load_config(f)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"train": {"dpo": {1: 2, "betta": 3}}}, "train.dpo: unknown trl.DPOConfig field(s): 1, betta"),
        ({"line\nbreak": 1}, "line\\nbreak: Extra inputs are not permitted"),
        ({"name": "x", "task": {"name\r": 1}}, "task.name\\r: Extra inputs are not permitted"),
    ],
)
def test_odd_keys_give_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        load_config(None, overrides)
    assert str(e.value) == message


def test_transfer_suites_need_distinct_names_and_a_task_with_options(tmp_path):
    three = {"name": "three_terms", "options": {"min_terms": 3, "max_terms": 3}}
    with pytest.raises(ConfigError, match="two transfer suites named 'three_terms'"):
        load_config(None, {"benchmark": {"transfer": [three, three]}})
    with pytest.raises(ConfigError, match=r"^benchmark\.transfer\.0\.name"):
        load_config(None, {"benchmark": {"transfer": [dict(three, name="three terms")]}})
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "1 + 1 =", "answer": "2"}\n')
    with pytest.raises(ConfigError, match=r"benchmark\.transfer varies a reasoning-gym task's options"):
        load_config(None, {"task": {"prompts_file": str(prompts)}, "benchmark": {"transfer": [three]}})


def test_a_transfer_suite_is_the_task_with_its_options_over_the_task_s():
    from flywheel.errors import TaskError
    from flywheel.models.tasks.splits import transfer_suites

    three = {"name": "three_terms", "options": {"min_terms": 3, "max_terms": 3}, "size": 5}
    ((name, source, items),) = transfer_suites(load_config(None, {"benchmark": {"transfer": [three]}}))
    assert name == "three_terms" and len(items) == 5
    # three terms; the digits still the task's (1–2)
    assert all(it.metadata["entry"]["metadata"]["num_terms"] == 3 for it in items)
    assert all(source.evaluate(it.answer, it)[1] == 1.0 for it in items)
    bad = dict(three, options={"min_terms": 5, "max_terms": 3})
    with pytest.raises(
        TaskError, match=r"^benchmark\.transfer 'three_terms': bad options for reasoning-gym task 'chain_sum'"
    ):
        transfer_suites(load_config(None, {"benchmark": {"transfer": [bad]}}))
