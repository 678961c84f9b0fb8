"""The `openai` engine: any OpenAI-compatible server over HTTP (`vllm serve`, SGLang, TGI, llama.cpp's
server, `transformers serve`): bounded concurrency, retries with backoff. It holds no weights, so it
judges (a judge's own `model`) and never serves the policy, which is retrained every round."""

from __future__ import annotations

import calendar
import email.utils
import json
import math
import os
import threading
import time
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from urllib.parse import urlsplit

from pydantic import Field, field_validator

from flywheel import seeds
from flywheel.errors import EngineError, mask_credentials
from flywheel.models.engines.base import Engine, Settings, label_mass
from flywheel.models.generation import Generation, NextToken, Progress, chat_texts, rendered_prompts


class OpenAISettings(Settings):
    """Any OpenAI-compatible server (`vllm serve`, SGLang, TGI, llama.cpp's server, `transformers
    serve`). The model's `name` is the name the server serves it under."""

    base_url: str = Field(min_length=1, pattern=r"^https?://", description="e.g. http://127.0.0.1:8000/v1")
    # The *name* of an environment variable holding the API key; the key itself never enters a
    # config, a log, a param or a table.
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    # A local checkpoint or hub id whose chat template renders prompts exactly as the in-process
    # engine does (the rubric's verdict cue is pre-filled, so the judge uses /completions);
    # None: the model's `name`.
    tokenizer: str | None = None
    max_concurrency: int = Field(8, ge=1, description="requests in flight at once")
    timeout_s: float = Field(120, gt=0, description="per request")
    retries: int = Field(4, ge=0, description="on 429, 5xx, connection errors and timeouts")
    backoff_s: float = Field(1.0, ge=0, description="first retry's wait; doubles each time")
    top_logprobs: int = Field(20, ge=1, le=20)
    # A server that returns no log-probs: a rubric score is the mean of this many sampled verdicts.
    verdict_samples: int = Field(8, ge=1)

    @field_validator("base_url")
    @classmethod
    def _no_credentials(cls, v: str) -> str:
        # The config is saved with the run (config.yaml) and logged as MLflow params: a password in
        # the URL would be kept in both.
        if "@" in urlsplit(v).netloc:
            raise ValueError(
                "holds credentials (user:password@): remove them and pass the key in an "
                "environment variable named by `api_key_env`"
            )
        return v


# Where the server is reached from and how patiently change nothing it answers: not hashed. The key
# variable's name is not hashed either, so a rotated key resumes the run.
SPEED_ONLY = frozenset({"api_key_env", "max_concurrency", "timeout_s", "retries", "backoff_s"})


def openai_completion(
    kind: str,
    model: str,
    prompt: str,
    *,
    max_new_tokens: int = 1,
    temperature: float = 1.0,
    top_p: float = 1.0,
    seed: int | None = None,
    top_logprobs: int = 20,
) -> dict:
    """The JSON body of a POST /completions for each kind of request. Sampling knobs that servers
    default differently (llama.cpp's top_k 40, min_p 0.05, repeat penalty 1.1) are set to the
    plain distribution's values, so every server samples what the hf engine samples."""
    plain = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    body = {"model": model, "prompt": prompt, "stream": False, **plain}
    if kind == "sample":
        return body | {
            "max_tokens": max_new_tokens,
            "temperature": temperature,
            "top_p": top_p,
            "seed": seed,
            "logprobs": 1,
        }
    if kind == "greedy":
        return body | {"max_tokens": max_new_tokens, "temperature": 0.0, "logprobs": 1}
    if kind == "next_token":
        return body | {"max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs}
    if kind == "verdict_draw":
        return body | {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "seed": seed}
    raise ValueError(f"unknown request kind {kind!r}")


def draws_mass(draws: Sequence[str], labels: Sequence[str]) -> NextToken:
    """k sampled verdict tokens → each label's share of the draws and the most frequent draw."""
    counts = Counter(d.strip() for d in draws)
    mass = {label: counts.get(label, 0) / len(draws) for label in labels}
    top = max(counts, key=lambda t: (counts[t], t in mass)) if counts else ""
    return NextToken(mass, top)


RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504})


class _Stopped(Exception):
    """Another request of the same batch failed for good: this one gives up without another try."""


class OpenAIEngine(Engine):
    """An OpenAI-compatible server. Every request is a POST /completions with a prompt rendered by
    the model's chat template (the rubric's cue is pre-filled, which /chat/completions cannot do).
    At most `max_concurrency` requests are in flight; a 429, a 5xx, a lost connection or a timeout
    is retried with exponential backoff (a server's Retry-After is honoured), then fails with one
    line that names the endpoint, credentials masked. The API key is read from the environment
    variable `api_key_env` names and sent only as the Authorization header."""

    name = "openai"

    def __init__(self, model_cfg) -> None:
        import httpx  # imported when an endpoint opens: listing or validating engines stays light

        super().__init__(model_cfg.name)
        self.cfg = model_cfg.openai
        self.url = self.cfg.base_url.rstrip("/")
        self.endpoint = mask_credentials(self.url)
        headers = {}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise EngineError(
                    f"endpoint {self.endpoint}: environment variable {self.cfg.api_key_env} "
                    "(openai.api_key_env) is not set"
                )
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(
            headers=headers, timeout=self.cfg.timeout_s, limits=httpx.Limits(max_connections=self.cfg.max_concurrency)
        )
        self._tokenizer = None
        self._lock = threading.Lock()
        self.verdict_method = f"top_logprobs_{self.cfg.top_logprobs}"

    def describe(self) -> str:
        return f"openai:{self.endpoint}#{self.ref}"

    @property
    def tokenizer(self):
        with self._lock:
            if self._tokenizer is None:
                from transformers import AutoTokenizer

                from flywheel.models import loading  # torch loads with the tokenizer's first use

                self._tokenizer = AutoTokenizer.from_pretrained(loading.resolve(self.cfg.tokenizer or self.ref))
        return self._tokenizer

    def post(self, body: dict, stop: threading.Event | None = None) -> dict:
        """The answer to one POST /completions, retried with backoff. Once `stop` is set (another
        request failed for good) no further try starts and a backoff wait ends: _Stopped."""
        stop = stop or threading.Event()
        delay, last = self.cfg.backoff_s, ""
        for attempt in range(self.cfg.retries + 1):
            if attempt:
                stop.wait(delay)
                delay *= 2
            if stop.is_set():
                raise _Stopped
            answer, last, retry_after = self._try(body)
            if answer is not None:
                return answer
            if retry_after is not None:
                delay = max(delay, retry_after)
        raise EngineError(
            mask_credentials(f"endpoint {self.endpoint} failed after {self.cfg.retries + 1} tries: {last}")
        )

    def _try(self, body: dict) -> tuple[dict | None, str, float | None]:
        """One POST: (the answer, "", None), or for a failure worth retrying (None, what failed, the
        server's Retry-After in seconds); a failure no retry can mend raises."""
        import httpx

        try:
            r = self.client.post(f"{self.url}/completions", json=body)
        except httpx.TimeoutException:
            return None, f"no answer within {self.cfg.timeout_s:g} s (openai.timeout_s)", None
        except httpx.TransportError as e:
            return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'connection failed'}", None
        if r.status_code == 200:
            try:
                answer = r.json()
            except json.JSONDecodeError:
                answer = None
            if not isinstance(answer, dict):
                raise EngineError(f"endpoint {self.endpoint} answered 200 with a body that is not a JSON object")
            return answer, "", None
        if r.status_code not in RETRY_STATUS:
            raise EngineError(f"endpoint {self.endpoint} refused the request: HTTP {r.status_code} {_short(r.text)}")
        return None, f"HTTP {r.status_code} {_short(r.text)}", _retry_after(r.headers.get("retry-after"))

    def _map(self, bodies: Sequence[dict], progress: Progress, weight: int = 1) -> list[dict]:
        """Every body POSTed, at most max_concurrency at once; answers in the order of `bodies`.
        The first request to fail for good stops the others: none starts or retries after it, those
        in flight end with their current try (within timeout_s), and its error is raised."""
        out: list[dict | None] = [None] * len(bodies)
        stop, failed = threading.Event(), []

        def one(i: int) -> None:
            try:
                out[i] = self.post(bodies[i], stop)
                if progress and (i + 1) % weight == 0:
                    progress(1)
            except _Stopped:
                pass
            except BaseException as e:
                failed.append(e)
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=self.cfg.max_concurrency) as pool:
            futures = [pool.submit(one, i) for i in range(len(bodies))]
            try:
                wait(futures, return_when=FIRST_EXCEPTION)
            finally:  # a failure, or the caller interrupted: nothing starts or retries any more
                stop.set()
                for f in futures:
                    f.cancel()
        if failed:
            raise failed[0]
        return out  # type: ignore[return-value]

    def _texts(self, prompts: Sequence[str]) -> list[str]:
        return chat_texts(self.tokenizer, prompts)

    def _generations(self, answers: Sequence[dict]) -> list[Generation]:
        out = []
        for a in answers:
            choice = a["choices"][0]
            lps = [lp for lp in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if lp is not None]
            usage = a.get("usage") or {}
            n_tokens = usage.get("completion_tokens") or len(lps)
            out.append(
                Generation(
                    response=choice.get("text", "").strip(),
                    n_tokens=int(n_tokens),
                    finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                    mean_logprob=sum(lps) / len(lps) if lps else None,
                    self_certainty=None,
                )
            )
        return out

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size=0, progress=None):
        texts = self._texts(prompts)
        bodies = [
            openai_completion(
                "sample",
                self.ref,
                t,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                seed=seeds.row(seed, p, k),
            )
            for p, t in zip(prompts, texts)
            for k in range(n)
        ]
        return self._generations(self._map(bodies, progress))

    def greedy(self, prompts, *, max_new_tokens, batch_size=0, progress=None):
        bodies = [openai_completion("greedy", self.ref, t, max_new_tokens=max_new_tokens) for t in self._texts(prompts)]
        return self._generations(self._map(bodies, progress))

    def next_token(self, rubric, renders, labels, *, batch_size=0, max_prompt_tokens, by_question=True, progress=None):
        tok = self.tokenizer
        texts = [tok.decode(ids) for ids in rendered_prompts(tok, rubric, renders, max_prompt_tokens)]
        if not texts:
            return []
        # The first answer says whether this server returns log-probs; without them, each verdict
        # is read from k sampled verdict tokens instead (the mean of k sampled verdicts).
        first = self.post(openai_completion("next_token", self.ref, texts[0], top_logprobs=self.cfg.top_logprobs))
        if _top_logprobs(first) is not None:
            self.verdict_method = f"top_logprobs_{self.cfg.top_logprobs}"
            answers = [first] + self._map(
                [openai_completion("next_token", self.ref, t, top_logprobs=self.cfg.top_logprobs) for t in texts[1:]],
                progress,
            )
            if progress:
                progress(1)
            return [label_mass(_top_logprobs(a) or {}, labels) for a in answers]
        k = self.cfg.verdict_samples
        self.verdict_method = f"sampled_{k}"
        bodies = [
            openai_completion("verdict_draw", self.ref, t, seed=seeds.row(0, t, j)) for t in texts for j in range(k)
        ]
        answers = self._map(bodies, progress, weight=k)
        draws = [a["choices"][0].get("text", "") for a in answers]
        return [draws_mass(draws[i * k : (i + 1) * k], labels) for i in range(len(texts))]

    def close(self) -> None:
        self.client.close()


def _top_logprobs(answer: dict) -> dict[str, float] | None:
    """The first generated position's {token: log-prob}, from a /completions answer; None when the
    server sent none."""
    lp = answer["choices"][0].get("logprobs") or {}
    top = lp.get("top_logprobs")
    if top and isinstance(top[0], dict) and top[0]:
        return top[0]
    content = lp.get("content")  # chat-style shape, which some servers use on /completions too
    if content and content[0].get("top_logprobs"):
        return {t["token"]: t["logprob"] for t in content[0]["top_logprobs"]}
    return None


def _retry_after(value: str | None, cap: float = 60.0) -> float | None:
    """A Retry-After header in seconds, at most `cap`: delay-seconds ("120") or an HTTP date (RFC 7231:
    "Wed, 21 Oct 2026 07:28:00 GMT"); None when absent or unreadable."""
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        # a date without a zone ("-0000") is UTC, by RFC 5322
        seconds = (when.timestamp() if when.tzinfo else calendar.timegm(when.timetuple())) - time.time()
    return None if math.isnan(seconds) else min(max(seconds, 0.0), cap)


def _short(text: str, limit: int = 200) -> str:
    line = " ".join(text.split())
    return line[:limit] + ("…" if len(line) > limit else "")


def open_openai(model_cfg, ref: str) -> OpenAIEngine:
    return OpenAIEngine(model_cfg.model_copy(update={"name": ref}))


def served_name(model_cfg) -> str:
    """An endpoint's model is the name the server serves it under: nothing to resolve."""
    return model_cfg.name


def check(model_cfg) -> None:
    if model_cfg.workers > 1:
        raise ValueError("workers: an openai server is one endpoint; its requests in flight are openai.max_concurrency")


def preflight(model_cfg, *, policy: bool) -> None:
    """A judge's endpoint: its key variable is set and its chat template can be loaded."""
    if policy:
        return
    m = model_cfg
    if m.openai.api_key_env and not os.environ.get(m.openai.api_key_env):
        raise EngineError(
            f"endpoint {mask_credentials(m.openai.base_url)}: environment variable "
            f"{m.openai.api_key_env} (openai.api_key_env) is not set"
        )
    from flywheel.models import loading  # torch loads here, when the tokenizer is resolved, not on import

    loading.resolve(m.openai.tokenizer or m.name)
