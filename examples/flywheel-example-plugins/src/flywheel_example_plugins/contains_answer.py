"""A reward source: does the response contain the reference answer (as a whole word or number)?"""

from __future__ import annotations

import re
from typing import Literal

from flywheel.config import _Source
from flywheel.models.rewards import Batch, Models, Source, Verdict, register


class ContainsAnswerSource(_Source):
    """1 when the reference answer appears in the response, else 0; no score without a reference."""

    type: Literal["contains_answer"] = "contains_answer"
    case_sensitive: bool = False


class ContainsAnswer(Source):
    cheap_decider = True  # no model: it can tell which prompts cannot yield a pair

    def judge(self, batch: Batch, models: Models, progress=None) -> list[Verdict]:
        flags = 0 if self.spec.case_sensitive else re.IGNORECASE
        out = []
        for c in batch.candidates:
            answer = batch.prompt_of(c)["answer"]
            if answer is None:
                out.append(Verdict(None, False, None, {"reason": "no reference answer"}))
                continue
            found = re.search(rf"(?<![\w.-]){re.escape(answer.strip())}(?![\w.])", c["response"], flags)
            out.append(Verdict(float(found is not None), True, found.group(0) if found else None))
        if progress:
            progress(len(out))
        return out


register("contains_answer", spec=ContainsAnswerSource, source=ContainsAnswer, threshold=0.5)
