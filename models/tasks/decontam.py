"""Decontamination: no training prompt may overlap an evaluation item (validation or test).

Three checks, in order; the first that fires names the overlap:

- **exact**: the same text, up to case and spacing;
- **normalised**: the same problem in another form. For arithmetic, the numbers and operators
  of the expression (reasoning-gym's `expression` metadata, else the prompt's own), with a sum's
  signed terms sorted, so `3 + 5` and `5 + 3` are one problem; a task's canonical form where its
  metadata gives one. Two splits that share a normalised form share an item;
- **n-gram**: at least `threshold` of the word n-grams of the shorter text also occur in the other
  (the overlap coefficient), so a prompt that embeds a whole item in text of its own is caught as
  well as a near copy. `n` scales down with the shorter text's length (a third of its words, at
  least 3, at most the configured n), so the rule can fire on 14-word prompts, where 8-grams
  cannot tell a changed number from a copy. N-grams that a large share of items contain (a
  task's template: "State the final answer to the following …") carry no information about any
  one item and are ignored.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

_TOKEN = re.compile(r"\w+|[^\w\s]")
_NUMBER_OR_OP = re.compile(r"\d+(?:\.\d+)?|[-+*/×÷^()]")
# an arithmetic expression inside a prompt: two or more numbers joined by operators
_EXPRESSION = re.compile(r"-?\d+(?:\.\d+)?(?:\s*[-+*/×÷^]\s*\(?\s*-?\d+(?:\.\d+)?\s*\)?)+")
MIN_N = 3


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) <= n:
        return {tuple(w)} if w else set()
    return {tuple(w[i : i + n]) for i in range(len(w) - n + 1)}


def scaled_n(length: int, n: int) -> int:
    """The n-gram length for a text of `length` words: a third of it, between MIN_N and n."""
    return max(MIN_N, min(n, length // 3))


def exact_form(text: str) -> str:
    return " ".join(words(text))


def expression_form(expression: str) -> str | None:
    """Numbers and operators, spaces gone; a chain of + and − as its sorted signed terms (the
    same sum in any order). None when it holds fewer than two numbers."""
    tokens = _NUMBER_OR_OP.findall(expression.replace("−", "-"))
    if sum(t[0].isdigit() for t in tokens) < 2:
        return None
    if all(t[0].isdigit() or t in "+-" for t in tokens):
        terms, sign = [], "+"
        for t in tokens:
            if t in "+-":
                sign = "-" if (sign == "-") != (t == "-") else "+"
            else:
                terms.append(sign + str(float(t)).removesuffix(".0"))
                sign = "+"
        return "sum:" + ",".join(sorted(terms))
    return "expr:" + "".join(tokens)


def normal_forms(text: str, metadata: dict[str, Any] | None = None) -> set[str]:
    """The item's normalised forms: its exact form, and its expression's form when it has one."""
    forms = {"text:" + exact_form(text)}
    entry = (metadata or {}).get("entry", metadata or {})
    meta = entry.get("metadata", entry) if isinstance(entry, dict) else {}
    expression = meta.get("expression") if isinstance(meta, dict) else None
    if not isinstance(expression, str):
        found = _EXPRESSION.findall(text)
        expression = found[0] if len(found) == 1 else None  # one expression: the problem; several: prose
    if expression is not None and (form := expression_form(expression)) is not None:
        forms.add(form)
    return forms


@dataclass(frozen=True)
class Overlap:
    share: float  # overlap coefficient with the closest evaluation item (1.0 for exact and normalised)
    item: int | None  # index of the evaluation item it overlaps most
    rule: str = "ngram"  # "exact" | "normalised" | "ngram"


class Decontaminator:
    def __init__(
        self,
        benchmark: Sequence[str],
        n: int = 8,
        threshold: float = 0.7,
        boilerplate_share: float = 0.2,
        metadata: Sequence[dict] | None = None,
    ) -> None:
        self.n, self.threshold = n, threshold
        metadata = list(metadata) if metadata is not None else [{}] * len(benchmark)
        self.exact = {exact_form(t): i for i, t in enumerate(benchmark)}
        self.forms: dict[str, int] = {}
        for i, (t, meta) in enumerate(zip(benchmark, metadata)):
            for f in normal_forms(t, meta):
                self.forms.setdefault(f, i)
        self.lengths = [len(words(t)) for t in benchmark]
        # one index per n-gram length a comparison may use
        self.index: dict[int, dict[tuple[str, ...], list[int]]] = {}
        self.boilerplate: dict[int, set[tuple[str, ...]]] = {}
        self.sizes: dict[int, list[int]] = {}
        limit = max(boilerplate_share * len(benchmark), 5)  # too few items to tell a template from chance
        for m in range(MIN_N, max(n, MIN_N) + 1):
            index: dict[tuple[str, ...], list[int]] = {}
            grams = [ngrams(t, m) for t in benchmark]
            for i, g in enumerate(grams):
                for gram in g:
                    index.setdefault(gram, []).append(i)
            self.index[m] = index
            self.boilerplate[m] = {g for g, items in index.items() if len(items) >= limit}
            self.sizes[m] = [len(g - self.boilerplate[m]) for g in grams]

    def overlap(self, text: str, metadata: dict | None = None) -> Overlap:
        exact = self.exact.get(exact_form(text))
        if exact is not None:
            return Overlap(1.0, exact, "exact")
        for f in sorted(normal_forms(text, metadata)):
            if f in self.forms:
                return Overlap(1.0, self.forms[f], "normalised")
        best: tuple[float, int | None]
        length, best = len(words(text)), (0.0, None)
        for m in {scaled_n(min(length, L), self.n) for L in set(self.lengths)}:
            grams = ngrams(text, m) - self.boilerplate[m]
            if not grams:
                continue
            shared = Counter(
                i
                for g in grams
                for i in self.index[m].get(g, ())
                if scaled_n(min(length, self.lengths[i]), self.n) == m
            )
            for i, c in shared.items():
                share = c / max(1, min(len(grams), self.sizes[m][i]))
                if (share, -i) > (best[0], -(best[1] if best[1] is not None else 1 << 60)):
                    best = (share, i)
        return Overlap(best[0], best[1], "ngram")

    def contaminated(self, text: str, metadata: dict | None = None) -> Overlap | None:
        o = self.overlap(text, metadata)
        return o if o.share >= self.threshold else None
