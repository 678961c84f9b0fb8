"""The LLM judge's rubric and verdicts, engine-free.

The pointwise judge uses Self-Rewarding LMs' additive 5-point rubric. Instead of sampling a
justification and parsing "Score: N" out of it, the judge's turn is pre-filled up to "Score:" and
the score is read from one forward pass: the distribution over the tokens "0".."5" at that
position (G-Eval style expected score), which every engine returns as a `NextToken`. The judge
"parsed" when its most likely next token over the whole vocabulary is a score digit; otherwise the
score is NULL and the raw top token is kept, so failures are counted, never hidden.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from flywheel import seeds
from flywheel.errors import RubricError
from flywheel.models.generation import NextToken

ASSISTANT_MARK = "<|assistant|>"
SCORES = range(6)


@dataclass(frozen=True)
class Rubric:
    user: str  # user turn, with {question} and {response} (pointwise) or {response_a} and {response_b} (pairwise)
    prefill: str  # start of the judge's own turn, ending right before the verdict
    hash: str

    def render(self, question: str, **responses: str) -> tuple[str, str]:
        """The user turn with each placeholder replaced once, in one pass over the template: an
        inserted text is never searched again, so a question or response that holds "{response}"
        or braces of its own arrives verbatim (str.format would choke on its braces)."""
        values = {"question": question, **responses}
        pattern = "|".join(re.escape("{" + key + "}") for key in values)
        return re.sub(pattern, lambda m: values[m.group()[1:-1]], self.user), self.prefill


PLACEHOLDERS = {"pointwise": ("{question}", "{response}"), "pairwise": ("{question}", "{response_a}", "{response_b}")}
BUILTIN = {"pointwise": "self_rewarding.txt", "pairwise": "pairwise.txt"}


def load_rubric(path: Path | None = None, kind: str = "pointwise") -> Rubric:
    if path is None:
        text = resources.files("flywheel.models").joinpath(f"templates/{BUILTIN[kind]}").read_text()
        where = f"built-in {BUILTIN[kind]}"
    else:
        path = Path(path)
        if not path.is_file():
            raise RubricError(f"judge template not found: {path}")
        text, where = path.read_text(), str(path)
    for placeholder in PLACEHOLDERS[kind]:
        if placeholder not in text:
            raise RubricError(f"judge template {where} lacks the {placeholder} placeholder")
    user, mark, prefill = text.partition(ASSISTANT_MARK)
    # Only newlines are trimmed: the prefill's trailing space matters ("Score: " makes the next token the digit).
    prefill = prefill.strip("\n")
    if not mark or not prefill.strip():
        raise RubricError(
            f"judge template {where} lacks the verdict cue: a line '{ASSISTANT_MARK}' followed by "
            "the start of the judge's answer, right before the score (e.g. 'Score: ')"
        )
    return Rubric(user.strip(), prefill, hashlib.sha256(text.encode()).hexdigest()[:16])


@dataclass
class JudgeResult:
    score: float | None
    parse_ok: bool
    raw: str
    details: str  # JSON: probability of each score (and the sampled verdicts, if any)
    variance: float | None = None


SCORE_LABELS = tuple(str(s) for s in SCORES)


def pointwise_verdict(nt: NextToken, samples: int = 0, rng=None) -> JudgeResult:
    """A rubric score from the judge's next-token distribution.

    samples = 0: the expected score (G-Eval); the judge "parsed" when its most likely token over
    the whole vocabulary is a score digit. samples = k: k verdicts drawn from the full
    distribution (exactly what k sampled judge turns would start with); a draw that is not a
    digit is an unparsed verdict, the score is the mean of the parsed ones, their variance kept."""
    p = {int(k): v for k, v in nt.mass.items()}
    mass = sum(p.values())
    info: dict = {"p": {str(k): round(v, 5) for k, v in p.items()}, "score_mass": round(mass, 5)}
    if samples == 0:
        ok = nt.top.strip() in SCORE_LABELS and mass > 0
        mean: float | None = None
        var: float | None = None
        if ok:
            mean = sum(s * v for s, v in p.items()) / mass
            var = sum((s - mean) ** 2 * v for s, v in p.items()) / mass
        return JudgeResult(mean, ok, nt.top, json.dumps(info), var)
    outcomes = [*p, -1]  # -1: any other token
    weights = [*p.values(), max(0.0, 1.0 - mass)]
    draws = rng.choices(outcomes, weights=weights, k=samples)
    parsed = [d for d in draws if d >= 0]
    info["draws"] = draws
    if not parsed:
        return JudgeResult(None, False, nt.top, json.dumps(info), None)
    mean = sum(parsed) / len(parsed)
    var = sum((d - mean) ** 2 for d in parsed) / len(parsed)
    return JudgeResult(mean, True, ",".join(map(str, draws)), json.dumps(info), var)


def verdicts(nts: Sequence[NextToken], samples: int, seed: int) -> list[JudgeResult]:
    """Rubric scores from next-token distributions; one seeded generator per candidate position,
    so a sampled verdict does not depend on its batch neighbours."""
    return [pointwise_verdict(nt, samples, seeds.rng(seed, i)) for i, nt in enumerate(nts)]
