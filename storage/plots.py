"""Pictures people would rather look at than read: metrics per round."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

PANELS = (("accuracy", "held-out accuracy"), ("pairs", "preference pairs"),
          ("judge_verifier_agreement", "judge–verifier agreement"), ("mean_response_tokens", "mean response tokens"))


def rounds_plot(history: Sequence[dict], out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(PANELS), figsize=(4 * len(PANELS), 3.2))
    for ax, (key, title) in zip(axes, PANELS):
        pts = [(h["round"], h[key]) for h in history if isinstance(h.get(key), (int, float))]
        if pts:
            xs, ys = zip(*pts)
            ax.plot(xs, ys, marker="o")
        if key in ("accuracy", "judge_verifier_agreement"):
            ax.set_ylim(0, 1)  # shares: a fixed scale keeps small wobbles from looking like trends
        ax.set_title(title)
        ax.set_xlabel("round")
        ax.set_xticks([h["round"] for h in history])
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
