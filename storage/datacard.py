"""A data card per round: what curation kept at each filter, margin and length distributions,
the category mix, the overlap checks against the evaluation splits and earlier rounds, and how
often the pairs' chosen side is exactly correct. A Markdown file plus a PNG,
written beside the round's tables (runs/<run>/round=<k>/) and logged to MLflow."""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pyarrow as pa

from flywheel.storage import plots

CARD = "data_card.md"
FIGURE = "data_card.png"

_FUNNEL_ROWS = (
    ("candidates", "candidates sampled"),
    ("candidates_scored", "… with a non-NULL reward"),
    ("candidates_unique", "… unique per prompt (after whitespace normalisation)"),
    ("prompts", "prompts"),
    ("prompts_scored", "… with a scored candidate"),
    ("prompts_uniform", "… whose samples all score the same (dropped: no signal)"),
    ("prompts_below_margin", "… whose spread is below min_margin (dropped)"),
    ("prompts_with_signal", "… with signal"),
    ("pairs_eligible", "pairs the rule proposes"),
    ("pairs_chosen_correct", "… whose chosen response is exactly correct (verifier; curation.chosen: exact)"),
    ("pairs_consistent", "… whose order every `consistency` source agrees with (SCIR)"),
    ("pairs_cream_kept", "… kept by CREAM (τ ≥ cream_min_tau, with cream: skip)"),
    ("pairs_capped", "… within pairs_per_prompt"),
    ("pairs", "… after category balance: the round's pairs"),
)


def card_dir(root: Path, run_id: str, round_: int) -> Path:
    return Path(root) / "runs" / run_id / f"round={round_}"


def _quantiles(xs: Sequence[float]) -> str:
    if not xs:
        return "–"
    xs = sorted(xs)
    pick = [xs[min(len(xs) - 1, int(q * len(xs)))] for q in (0.0, 0.25, 0.5, 0.75)] + [xs[-1]]
    return " / ".join(f"{v:.3g}" for v in pick)


def _short(text: str, n: int = 120) -> str:
    text = " ".join(text.split()).replace("|", "\\|")
    return text if len(text) <= n else text[: n - 1] + "…"


def render(
    run_id: str,
    round_: int,
    cfg,
    funnel: dict[str, int],
    pairs: pa.Table,
    sft: pa.Table,
    removed: Sequence[dict],
    draw: dict | None = None,
    labels: dict | None = None,
) -> str:
    p = pairs.to_pylist()
    margins = [r["margin"] for r in p]
    chosen_len, rejected_len = [r["chosen_tokens"] for r in p], [r["rejected_tokens"] for r in p]
    gap = statistics.fmean(c - r for c, r in zip(chosen_len, rejected_len)) if p else 0.0
    lines = [
        f"# Data card: run {run_id}, round {round_}",
        "",
        f"Rule `{cfg.rule}` on reward `{cfg.reward_name()}` (normalize {cfg.normalize}), "
        f"min_margin {cfg.min_margin}, length_penalty "
        f"{cfg.length_penalty}, dedup {cfg.dedup}, pairs_per_prompt {cfg.pairs_per_prompt}, "
        f"balance_categories {cfg.balance_categories}, max_pairs_per_category {cfg.max_pairs_per_category}.",
        "",
        "## What each filter kept",
        "",
        "| step | count |",
        "|---|---:|",
    ]
    lines += [f"| {label} | {funnel.get(key, 0)} |" for key, label in _FUNNEL_ROWS]
    if funnel.get("cream_tau") is not None:
        lines.append(
            f"| CREAM: mean Kendall τ, this round's vs the previous round's judge | {funnel['cream_tau']:.3f} |"
        )
    lines += [
        f"| SFT examples ({_best(cfg.sft_per_prompt)} with reward ≥ {cfg.sft_threshold}) | {sft.num_rows} |",
        f"| training prompts dropped as evaluation overlaps | {len(removed)} |",
        "",
        "## Margins and lengths",
        "",
        "| | min / q25 / median / q75 / max | mean |",
        "|---|---|---:|",
        f"| margin | {_quantiles(margins)} | {statistics.fmean(margins) if p else 0:.3g} |",
        f"| chosen tokens | {_quantiles(chosen_len)} | {statistics.fmean(chosen_len) if p else 0:.3g} |",
        f"| rejected tokens | {_quantiles(rejected_len)} | {statistics.fmean(rejected_len) if p else 0:.3g} |",
        "",
        f"Chosen-vs-rejected length gap: {gap:+.2f} tokens on average (positive: the chosen answers are longer).",
        "",
        "## Category mix",
        "",
        "| category | pairs | SFT examples |",
        "|---|---:|---:|",
    ]
    pair_cats, sft_cats = Counter(r["category"] for r in p), Counter(sft.column("category").to_pylist())
    for cat in sorted(set(pair_cats) | set(sft_cats)):
        lines.append(f"| {cat} | {pair_cats[cat]} | {sft_cats[cat]} |")
    if labels:
        lines += [
            "",
            "## What the pairs teach (against the verifier)",
            "",
            "| | share |",
            "|---|---:|",
            f"| chosen responses exactly correct | {_share(labels.get('chosen_exact'))} |",
            f"| rejected responses wrong (not exactly correct) | {_share(labels.get('rejected_wrong'))} |",
        ]
    if draw:
        d = draw.get("removed", {})
        lines += [
            "",
            "## Overlap checks",
            "",
            f"This round's {draw.get('prompts', 0)} training prompts were checked against the "
            f"{draw.get('evaluation_items', 0)} evaluation items (validation and test) and against the "
            "prompts of earlier rounds.",
            "",
            "| check | prompts dropped |",
            "|---|---:|",
            f"| exact copy (case and spacing aside) | {d.get('exact', 0)} |",
            f"| normalised form (numbers and operators; a sum's terms in any order) | {d.get('normalised', 0)} |",
            f"| n-gram overlap ≥ {cfg.decontam_threshold:g} (n scaled to the prompt's length, at most "
            f"{cfg.decontam_ngram}) | {d.get('ngram', 0)} |",
            f"| trained on in an earlier round (fresh prompts each round) | {draw.get('repeats_skipped', 0)} |",
        ]
    if removed:
        lines += ["", "## Dropped as evaluation overlaps", ""]
        lines += [f"- {_short(r['prompt'])}" for r in removed[:50]]
        if len(removed) > 50:
            lines.append(
                f"- … and {len(removed) - 50} more: `SELECT prompt FROM prompts WHERE split = 'decontaminated'`"
            )
    if p:
        lines += ["", "## Examples", "", "| prompt | chosen | rejected | margin |", "|---|---|---|---:|"]
        lines += [
            f"| {_short(r['prompt'], 80)} | {_short(r['chosen'], 60)} | {_short(r['rejected'], 60)} | "
            f"{r['margin']:.3g} |"
            for r in p[:5]
        ]
    lines += ["", f"![margins, lengths and categories]({FIGURE})", ""]
    return "\n".join(lines)


def _share(x: float | None) -> str:
    return "–" if x is None else f"{x:.0%}"


def write(
    out: Path,
    run_id: str,
    round_: int,
    cfg,
    funnel: dict[str, int],
    pairs: pa.Table,
    sft: pa.Table,
    removed: Sequence[dict],
    draw: dict | None = None,
    labels: dict | None = None,
) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    card = out / CARD
    tmp = card.with_suffix(".md.tmp")
    tmp.write_text(render(run_id, round_, cfg, funnel, pairs, sft, removed, draw, labels))
    tmp.replace(card)
    figure = plots.data_card_plot(pairs.to_pylist(), sft.column("category").to_pylist(), out / FIGURE)
    return [card, figure]


def _best(per_prompt: int) -> str:
    return "a prompt's best sample" if per_prompt == 1 else f"a prompt's best {per_prompt} distinct samples"
