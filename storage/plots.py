"""Pictures people would rather look at than read: metrics per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# The headline first: test exact match (full credit only), with the partial-credit mean score beside it.
PANELS = (
    ("exact_match", "test exact match"),
    ("pairs", "preference pairs"),
    ("judge_verifier_agreement", "judge–verifier agreement"),
    ("mean_response_tokens", "mean response tokens"),
)


def rounds_plot(history: Sequence[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        pts = [(h["round"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o", label=title)
        mean = [(h["round"], h["accuracy"]) for h in history if isinstance(h.get("accuracy"), (int, float))]
        if key == "exact_match" and mean:
            ax.plot(*zip(*mean), linestyle="--", color="tab:gray", label="mean score")
        rejected = [
            (h["round"], h[key])
            for h in history
            if not h.get("promoted", True) and isinstance(h.get(key), (int, float))
        ]
        if key == "exact_match" and rejected:  # the next round started from the champion instead
            ax.scatter(*zip(*rejected), marker="x", s=90, color="tab:red", zorder=3, label="not promoted")
        if key == "exact_match":
            ax.legend(fontsize=8, loc="lower right")
        if key in ("exact_match", "judge_verifier_agreement"):
            ax.set_ylim(0, 1)  # shares: a fixed scale keeps small wobbles from looking like trends
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks([h["round"] for h in history])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, out)


def data_card_plot(pairs: Sequence[dict], sft_categories: Sequence[str], out: Path) -> Path:
    """Margin histogram, chosen vs rejected lengths, and pairs per category."""
    from collections import Counter

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b, c) = plt.subplots(1, 3, figsize=(13, 3.4))
    a.hist([p["margin"] for p in pairs], bins=20, color="tab:blue")
    a.set_title("pair margin")
    a.set_xlabel("chosen − rejected reward")
    bins = max([1, *(p["chosen_tokens"] for p in pairs), *(p["rejected_tokens"] for p in pairs)])
    a_kw = dict(bins=min(30, bins), alpha=0.6, range=(0, bins))
    b.hist([p["chosen_tokens"] for p in pairs], label="chosen", **a_kw)
    b.hist([p["rejected_tokens"] for p in pairs], label="rejected", **a_kw)
    b.set_title("response length (tokens)")
    b.legend()
    cats = Counter(p["category"] for p in pairs)
    sft = Counter(sft_categories)
    names = sorted(set(cats) | set(sft))
    ys = range(len(names))
    c.barh([y + 0.2 for y in ys], [cats[n] for n in names], height=0.4, label="pairs")
    c.barh([y - 0.2 for y in ys], [sft[n] for n in names], height=0.4, label="SFT")
    c.set_yticks(list(ys), names, fontsize=7)
    c.set_title("category mix")
    c.legend()
    fig.tight_layout()
    return _save(fig, out)


def score_histograms(rows: Sequence[dict], out: Path) -> Path:
    """One histogram of scores per reward source (NULL scores counted in the title)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sources = sorted({r["source"] for r in rows}) or ["(none)"]
    fig, axes = plt.subplots(1, len(sources), figsize=(3.6 * len(sources), 3), squeeze=False)
    for ax, source in zip(axes[0], sources):
        scores = [r["score"] for r in rows if r["source"] == source]
        kept = [s for s in scores if s is not None]
        if kept:
            ax.hist(kept, bins=20, color="tab:purple")
        ax.set_title(f"{source} ({len(scores) - len(kept)} NULL)", fontsize=9)
        ax.set_xlabel("score")
    fig.tight_layout()
    return _save(fig, out)


def _save(fig, out: Path) -> Path:
    import matplotlib.pyplot as plt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(out)
    return out


def compare_plot(rows: Sequence[dict], out: Path) -> Path:
    """Each run a line, per round: test exact match, pairs, judge–verifier agreement, mean length."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.4))
    runs = list(dict.fromkeys(r["run"] for r in rows))
    for ax, (key, title) in zip(axes, PANELS):
        for run in runs:
            pts = [(r["round"], r[key]) for r in rows if r["run"] == run and isinstance(r.get(key), (int, float))]
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, marker="o", label=run)
                promoted = [
                    (r["round"], r[key])
                    for r in rows
                    if r["run"] == run and r.get("promoted") and isinstance(r.get(key), (int, float))
                ]
                if promoted and key == "exact_match":
                    ax.scatter(*zip(*promoted), s=80, facecolors="none", edgecolors="k", zorder=3)
        if key in ("exact_match", "judge_verifier_agreement"):
            ax.set_ylim(0, 1)
        ax.set_title(title + (" (○ promoted)" if key == "exact_match" else ""))
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, out)
