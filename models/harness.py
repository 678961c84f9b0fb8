"""lm-evaluation-harness suites (`benchmark.lm_eval`) on a round's model: EleutherAI's own
evaluator (`lm_eval.simple_evaluate`) with its HF model class, fed the model the stage already
holds when the engine is in-process (hf), or loaded from the checkpoint otherwise."""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from typing import Any

from flywheel.errors import ConfigError


def _lm_eval():
    try:
        import lm_eval
    except ImportError:
        raise ConfigError("benchmark.lm_eval needs lm-evaluation-harness: pip install -e '.[eval]'") from None
    return lm_eval


def task_manager(cfg):
    """lm-eval's index of tasks (its own and include_path's), built once per process: indexing reads
    every task YAML, and the preflight and each round's benchmark both need it."""
    return _task_manager(str(cfg.include_path) if cfg.include_path else None)


@lru_cache(maxsize=4)
def _task_manager(include_path: str | None):
    _lm_eval()
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path, verbosity="ERROR")


def check(cfg) -> None:
    """Before any work: lm-eval is installed and every task name is known (one line if not)."""
    known = set(task_manager(cfg).all_tasks)
    unknown = [t for t in cfg.tasks if t not in known]
    if unknown:
        where = f" (include_path {cfg.include_path})" if cfg.include_path else ""
        raise ConfigError(f"unknown lm_eval task{'s' if len(unknown) > 1 else ''}: {', '.join(unknown)}{where}")


def _metric_name(key: str) -> str:
    # lm-eval keys are "<metric>,<filter>" ("acc,none", "exact_match,strict-match")
    metric, _, filt = key.partition(",")
    return metric if filt in ("", "none") else f"{metric}.{filt}"


def evaluate(cfg, model_ref: str, engine=None, *, seed: int = 0) -> tuple[dict[str, float], dict[str, list[dict]]]:
    """Run the suites; return (metrics `lm_eval.<task>.<metric>`, per-task item rows: item_id,
    response, score) for the benchmarks table."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    from flywheel.models import loading

    if engine is not None and hasattr(engine, "model") and hasattr(engine, "tokenizer"):
        lm = HFLM(pretrained=engine.model, tokenizer=engine.tokenizer, batch_size=cfg.batch_size)
    else:
        lm = HFLM(pretrained=model_ref, device=str(loading.device()), batch_size=cfg.batch_size)
    out = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(cfg.tasks),
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=task_manager(cfg),
        log_samples=True,
        bootstrap_iters=0,
        apply_chat_template=cfg.apply_chat_template,
        random_seed=seed,
        numpy_random_seed=seed,
        torch_random_seed=seed,
        fewshot_random_seed=seed,
    )
    metrics: dict[str, float] = {}
    for task, res in out["results"].items():
        for key, value in res.items():
            # metric keys are "<metric>,<filter>"; the others (alias, name, sample_len) are not metrics
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)):
                continue
            metrics[f"lm_eval.{task}.{_metric_name(key)}"] = float(value)
    rows: dict[str, list[dict]] = {}
    for task, samples in out.get("samples", {}).items():
        rows[task] = [_row(s, (s.get("metrics") or [None])[0]) for s in samples]
        for r in rows[task]:
            r["n_tokens"] = len(lm.tokenizer(r["response"], add_special_tokens=False)["input_ids"])
    return metrics, rows


def _response(resps: Any) -> str:
    """A generation task's text, or a multiple-choice task's pick (the choice of highest log-likelihood)."""
    if (
        isinstance(resps, list)
        and resps
        and all(isinstance(r, (list, tuple)) and r and isinstance(r[0], (int, float)) for r in resps)
    ):
        lls = [r[0] for r in resps]
        return f"choice {max(range(len(lls)), key=lls.__getitem__)}"
    while isinstance(resps, (list, tuple)):
        if not resps:
            return ""
        resps = resps[0]
    return "" if resps is None else str(resps)


def _row(sample: dict[str, Any], metric: str | None) -> dict:
    doc = json.dumps(sample.get("doc"), sort_keys=True, default=str)
    resp = _response(sample.get("filtered_resps", sample.get("resps")))
    score = sample.get(metric) if metric else None
    return {
        "item_id": hashlib.sha256(doc.encode()).hexdigest()[:16],
        "response": resp,
        "extracted": str(sample.get("target")) if sample.get("target") is not None else None,
        "score": float(score) if isinstance(score, (int, float)) else None,
    }
