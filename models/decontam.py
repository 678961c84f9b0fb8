"""Decontamination: no training prompt may overlap a benchmark item.

A training prompt is contaminated when, for some benchmark item, at least `threshold` of the
word n-grams of the shorter of the two also occur in the other (the overlap coefficient), so
a prompt that embeds a whole item in text of its own is caught as well as a near copy. N-grams that a large share of benchmark items contain (a task's shared
template: "State the final answer to the following …") carry no information about any one
item and are ignored; a text shorter than n words is one n-gram, so it matches only a
benchmark item that holds it whole. An exact (normalised) copy of an item always counts as 1.0.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

_TOKEN = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    return _TOKEN.findall(text.lower())


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    w = words(text)
    if len(w) <= n:
        return {tuple(w)} if w else set()
    return {tuple(w[i:i + n]) for i in range(len(w) - n + 1)}


@dataclass(frozen=True)
class Overlap:
    share: float  # overlap coefficient with the closest benchmark item
    item: int | None  # index of the benchmark item it overlaps most


class Decontaminator:
    def __init__(self, benchmark: Sequence[str], n: int = 8, threshold: float = 0.7,
                 boilerplate_share: float = 0.2) -> None:
        self.n, self.threshold = n, threshold
        self.exact = {" ".join(words(t)): i for i, t in enumerate(benchmark)}
        self.index: dict[tuple[str, ...], list[int]] = {}
        for i, text in enumerate(benchmark):
            for g in ngrams(text, n):
                self.index.setdefault(g, []).append(i)
        # Too few items to tell a template from a coincidence: nothing is boilerplate then.
        limit = max(boilerplate_share * len(benchmark), 5)
        self.boilerplate = {g for g, items in self.index.items() if len(items) >= limit}
        self.sizes = [len(ngrams(t, n) - self.boilerplate) for t in benchmark]

    def overlap(self, text: str) -> Overlap:
        exact = self.exact.get(" ".join(words(text)))
        if exact is not None:
            return Overlap(1.0, exact)
        grams = ngrams(text, self.n) - self.boilerplate
        shared = Counter(i for g in grams for i in self.index.get(g, ()))
        if not shared:
            return Overlap(0.0, None)
        share, item = max((c / min(len(grams), self.sizes[i]), -i) for i, c in shared.items())
        return Overlap(share, -item)

    def contaminated(self, text: str) -> Overlap | None:
        o = self.overlap(text)
        return o if o.share >= self.threshold else None
