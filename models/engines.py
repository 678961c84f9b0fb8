"""One interface for every model call a stage makes, with three backends.

    sample(prompts, n, …)        n completions per prompt, prompt-major, per-sample seeds   (generate)
    greedy(prompts, …)           one greedy completion per prompt                            (benchmark)
    next_token(rubric, renders)  next-token probability of each label after the rubric's cue (LLM / pairwise judge)
    sequence_logprobs(p, r)      log π(r | p), teacher-forced                                (implicit reward)

Backends, chosen per model by `engine:` in its config:

    hf      transformers in this process (models/decode.py's continuous batching): CPU or one GPU
    vllm    vLLM's offline engine: tensor parallelism, prefix caching, the GPU released on close()
    openai  any OpenAI-compatible server over HTTP: bounded concurrency, retries with backoff

One engine is open at a time (`open_engine` closes the previous one), so stages take turns on
the GPUs, and `release()` frees it before training. Prompts are rendered with the model's own
chat template here, by every backend, so the same prompt reaches every engine as the same text.
"""

from __future__ import annotations

import calendar
import email.utils
import json
import math
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass

from flywheel.errors import EngineError, mask_credentials

Progress = Callable[[int], None] | None


@dataclass
class Generation:
    response: str
    n_tokens: int
    finish_reason: str  # "stop" (EOS) or "length" (hit max_new_tokens)
    mean_logprob: float | None
    self_certainty: float | None


@dataclass
class NextToken:
    mass: dict[str, float]  # probability of each label's tokens at the verdict position
    top: str  # the most likely token over the whole vocabulary (or the most frequent draw), decoded


class Engine:
    """What a stage may ask of a model. `describe` names the model as judge health records it."""
    name = "engine"
    # how next_token reads a verdict: "distribution" (the full softmax), "top_logprobs" (the
    # server's top-k log-probs: a label outside the top k counts 0), or "sampled_<k>" (k sampled verdicts)
    verdict_method = "distribution"

    def __init__(self, ref: str) -> None:
        self.ref = ref

    def describe(self) -> str:
        return f"{self.name}:{self.ref}"

    def sample(self, prompts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float,
               seed: int, batch_size: int, progress: Progress = None) -> list[Generation]:
        raise NotImplementedError

    def greedy(self, prompts: Sequence[str], *, max_new_tokens: int, batch_size: int,
               progress: Progress = None) -> list[Generation]:
        raise NotImplementedError

    def next_token(self, rubric, renders: Sequence[dict[str, str]], labels: Sequence[str], *, batch_size: int,
                   max_prompt_tokens: int, by_question: bool = True, progress: Progress = None) -> list[NextToken]:
        raise NotImplementedError

    def sequence_logprobs(self, prompts: Sequence[str], responses: Sequence[str], *, batch_size: int,
                          progress: Progress = None) -> list[float]:
        raise EngineError(f"engine {self.name} cannot score given responses (sequence log-probs); use hf or vllm")

    def close(self) -> None:
        pass


def row_seed(seed: int, prompt: str, k: int) -> int:
    """Sample k of a prompt: its seed depends on nothing else (not the batch, not other prompts)."""
    from flywheel.models import decode

    return decode.row_seed(seed, prompt, k)


# ---------------------------------------------------------------------------------------------- hf

class HFEngine(Engine):
    name = "hf"

    def __init__(self, ref: str, dtype: str = "auto") -> None:
        super().__init__(ref)
        from flywheel.models import loading

        self.model, self.tokenizer = loading.load(ref, dtype)

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size, progress=None):
        from flywheel.models import loading, sampling

        with loading.attention_backends():
            return sampling.generate(self.model, self.tokenizer, prompts, n=n, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, do_sample=True, temperature=temperature, top_p=top_p,
                                     seed=seed, progress=progress)

    def greedy(self, prompts, *, max_new_tokens, batch_size, progress=None):
        from flywheel.models import loading, sampling

        with loading.attention_backends():
            return sampling.generate(self.model, self.tokenizer, prompts, max_new_tokens=max_new_tokens,
                                     batch_size=batch_size, do_sample=False, progress=progress)

    def next_token(self, rubric, renders, labels, *, batch_size, max_prompt_tokens, by_question=True,
                   progress=None):
        from flywheel.models import judges, loading

        with loading.attention_backends():
            return judges.next_token(self.model, self.tokenizer, rubric, renders, labels, batch_size=batch_size,
                                     max_prompt_tokens=max_prompt_tokens, by_question=by_question, progress=progress)

    def sequence_logprobs(self, prompts, responses, *, batch_size, progress=None):
        from flywheel.models import judges, loading

        with loading.attention_backends():
            return judges.sequence_logprobs(self.model, self.tokenizer, prompts, responses, batch_size=batch_size,
                                            progress=progress)

    def close(self) -> None:
        import gc

        import torch

        from flywheel.models import loading

        self.model = self.tokenizer = None
        loading.load.cache_clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# -------------------------------------------------------------------------------------- requests
# What each backend is asked, as plain data: built and tested without the engine installed.

def rendered_prompts(tokenizer, rubric, renders: Sequence[dict[str, str]], max_prompt_tokens: int) -> list[list[int]]:
    """Each rubric prompt as token ids: chat template, the judge's turn pre-filled up to the verdict
    cue; an over-long prompt loses its start, never the cue at its end."""
    from flywheel.models.sampling import chat_texts

    rendered = [rubric.render(**r) for r in renders]
    texts = [t + prefill for t, (_, prefill) in zip(chat_texts(tokenizer, [u for u, _ in rendered]), rendered)]
    return [ids[-max_prompt_tokens:] for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def vllm_sampling_params(kind: str, *, max_new_tokens: int = 1, temperature: float = 1.0, top_p: float = 1.0,
                         seed: int | None = None, top_logprobs: int = 20) -> dict:
    """vllm.SamplingParams fields for each kind of request."""
    if kind == "sample":
        return {"n": 1, "temperature": temperature, "top_p": top_p, "top_k": 0, "max_tokens": max_new_tokens,
                "seed": seed, "logprobs": 0, "skip_special_tokens": True}
    if kind == "greedy":
        return {"n": 1, "temperature": 0.0, "max_tokens": max_new_tokens, "logprobs": 0, "skip_special_tokens": True}
    if kind == "next_token":
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "logprobs": top_logprobs}
    if kind == "prompt_logprobs":
        return {"n": 1, "temperature": 0.0, "max_tokens": 1, "prompt_logprobs": 0}
    raise ValueError(f"unknown request kind {kind!r}")


def openai_completion(kind: str, model: str, prompt: str, *, max_new_tokens: int = 1, temperature: float = 1.0,
                      top_p: float = 1.0, seed: int | None = None, top_logprobs: int = 20) -> dict:
    """The JSON body of a POST /completions for each kind of request. Sampling knobs that servers
    default differently (llama.cpp's top_k 40, min_p 0.05, repeat penalty 1.1) are set to the
    plain distribution's values, so every server samples what the hf engine samples."""
    plain = {"top_k": 0, "min_p": 0.0, "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0}
    body = {"model": model, "prompt": prompt, "stream": False, **plain}
    if kind == "sample":
        return body | {"max_tokens": max_new_tokens, "temperature": temperature, "top_p": top_p, "seed": seed,
                       "logprobs": 1}
    if kind == "greedy":
        return body | {"max_tokens": max_new_tokens, "temperature": 0.0, "logprobs": 1}
    if kind == "next_token":
        return body | {"max_tokens": 1, "temperature": 0.0, "logprobs": top_logprobs}
    if kind == "verdict_draw":
        return body | {"max_tokens": 1, "temperature": 1.0, "top_p": 1.0, "seed": seed}
    raise ValueError(f"unknown request kind {kind!r}")


def label_mass(top: dict[str, float], labels: Sequence[str]) -> NextToken:
    """Top-k {token text: log-prob} → each label's probability ("3" and " 3" both count as "3")
    and the most likely token."""
    mass = {label: 0.0 for label in labels}
    for text, lp in top.items():
        key = text.strip()
        if key in mass and lp is not None and math.isfinite(lp):
            mass[key] += math.exp(lp)
    best = max(top, key=lambda t: top[t]) if top else ""
    return NextToken(mass, best)


def draws_mass(draws: Sequence[str], labels: Sequence[str]) -> NextToken:
    """k sampled verdict tokens → each label's share of the draws and the most frequent draw."""
    counts = Counter(d.strip() for d in draws)
    mass = {label: counts.get(label, 0) / len(draws) for label in labels}
    top = max(counts, key=lambda t: (counts[t], t in mass)) if counts else ""
    return NextToken(mass, top)


# ---------------------------------------------------------------------------------------- openai

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
        import os

        import httpx

        super().__init__(model_cfg.name)
        self.cfg = model_cfg.openai
        self.url = self.cfg.base_url.rstrip("/")
        self.endpoint = mask_credentials(self.url)
        headers = {}
        if self.cfg.api_key_env:
            key = os.environ.get(self.cfg.api_key_env)
            if not key:
                raise EngineError(f"endpoint {self.endpoint}: environment variable {self.cfg.api_key_env} "
                                  "(openai.api_key_env) is not set")
            headers["Authorization"] = f"Bearer {key}"
        self.client = httpx.Client(headers=headers, timeout=self.cfg.timeout_s,
                                   limits=httpx.Limits(max_connections=self.cfg.max_concurrency))
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

                from flywheel.models import loading

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
        raise EngineError(mask_credentials(
            f"endpoint {self.endpoint} failed after {self.cfg.retries + 1} tries: {last}"))

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
        from flywheel.models.sampling import chat_texts

        return chat_texts(self.tokenizer, prompts)

    def _generations(self, answers: Sequence[dict]) -> list[Generation]:
        out = []
        for a in answers:
            choice = a["choices"][0]
            lps = [lp for lp in ((choice.get("logprobs") or {}).get("token_logprobs") or []) if lp is not None]
            usage = a.get("usage") or {}
            n_tokens = usage.get("completion_tokens") or len(lps)
            out.append(Generation(response=choice.get("text", "").strip(), n_tokens=int(n_tokens),
                                  finish_reason="length" if choice.get("finish_reason") == "length" else "stop",
                                  mean_logprob=sum(lps) / len(lps) if lps else None, self_certainty=None))
        return out

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size=0, progress=None):
        texts = self._texts(prompts)
        bodies = [openai_completion("sample", self.ref, t, max_new_tokens=max_new_tokens, temperature=temperature,
                                    top_p=top_p, seed=row_seed(seed, p, k))
                  for p, t in zip(prompts, texts) for k in range(n)]
        return self._generations(self._map(bodies, progress))

    def greedy(self, prompts, *, max_new_tokens, batch_size=0, progress=None):
        bodies = [openai_completion("greedy", self.ref, t, max_new_tokens=max_new_tokens)
                  for t in self._texts(prompts)]
        return self._generations(self._map(bodies, progress))

    def next_token(self, rubric, renders, labels, *, batch_size=0, max_prompt_tokens, by_question=True,
                   progress=None):
        tok = self.tokenizer
        texts = [tok.decode(ids) for ids in rendered_prompts(tok, rubric, renders, max_prompt_tokens)]
        if not texts:
            return []
        # The first answer says whether this server returns log-probs; without them, each verdict
        # is read from k sampled verdict tokens instead (the mean of k sampled verdicts).
        first = self.post(openai_completion("next_token", self.ref, texts[0], top_logprobs=self.cfg.top_logprobs))
        if _top_logprobs(first) is not None:
            self.verdict_method = f"top_logprobs_{self.cfg.top_logprobs}"
            answers = [first] + self._map([openai_completion("next_token", self.ref, t,
                                                             top_logprobs=self.cfg.top_logprobs)
                                           for t in texts[1:]], progress)
            if progress:
                progress(1)
            return [label_mass(_top_logprobs(a) or {}, labels) for a in answers]
        k = self.cfg.verdict_samples
        self.verdict_method = f"sampled_{k}"
        bodies = [openai_completion("verdict_draw", self.ref, t, seed=row_seed(0, t, j)) for t in texts for j in range(k)]
        answers = self._map(bodies, progress, weight=k)
        draws = [a["choices"][0].get("text", "") for a in answers]
        return [draws_mass(draws[i * k:(i + 1) * k], labels) for i in range(len(texts))]

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


# ------------------------------------------------------------------------------------------ vllm

class VLLMEngine(Engine):
    """vLLM's offline engine on the round's checkpoint (flywheel saves merged checkpoints, so a
    round's policy is a plain model directory). Requests go in as token ids, rendered with the
    model's own chat template, so vLLM and hf see the same prompts."""
    name = "vllm"

    def __init__(self, ref: str, model_cfg) -> None:
        super().__init__(ref)
        try:
            import vllm
        except ImportError:
            raise EngineError("engine vllm needs vLLM: pip install 'flywheel[vllm]' (a CUDA GPU)") from None
        s = model_cfg.vllm
        dtype = "auto" if model_cfg.dtype == "auto" else model_cfg.dtype
        self.llm = vllm.LLM(model=ref, tokenizer=ref, dtype=dtype, seed=0,
                            tensor_parallel_size=s.tensor_parallel_size,
                            gpu_memory_utilization=s.gpu_memory_utilization, max_model_len=s.max_model_len,
                            enable_prefix_caching=s.enable_prefix_caching, enforce_eager=s.enforce_eager,
                            max_logprobs=s.max_logprobs)
        self.tokenizer = self.llm.get_tokenizer()
        self.top_logprobs = s.max_logprobs
        self.verdict_method = f"top_logprobs_{s.max_logprobs}"

    def _run(self, token_ids: Sequence[list[int]], params: Sequence[dict], progress: Progress, chunk: int = 2048):
        from vllm import SamplingParams

        out = []
        for start in range(0, len(token_ids), chunk):
            reqs = [{"prompt_token_ids": ids} for ids in token_ids[start:start + chunk]]
            sps = [SamplingParams(**p) for p in params[start:start + chunk]]
            out += self.llm.generate(reqs, sps, use_tqdm=False)
            if progress:
                progress(len(reqs))
        return out

    def _ids(self, prompts: Sequence[str]) -> list[list[int]]:
        from flywheel.models.sampling import chat_texts

        return self.tokenizer(chat_texts(self.tokenizer, prompts), add_special_tokens=False)["input_ids"]

    @staticmethod
    def _generation(completion) -> Generation:
        lps = [next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
               for t, d in zip(completion.token_ids, completion.logprobs or [])]
        k = len(completion.token_ids)
        return Generation(response=completion.text.strip(), n_tokens=k,
                          finish_reason="length" if completion.finish_reason == "length" else "stop",
                          mean_logprob=sum(lps) / len(lps) if lps else None, self_certainty=None)

    def sample(self, prompts, *, n, max_new_tokens, temperature, top_p, seed, batch_size=0, progress=None):
        ids = self._ids(prompts)
        token_ids, params = [], []
        for p, pid in zip(prompts, ids):
            for k in range(n):
                token_ids.append(pid)
                params.append(vllm_sampling_params("sample", max_new_tokens=max_new_tokens, temperature=temperature,
                                                   top_p=top_p, seed=row_seed(seed, p, k)))
        return [self._generation(o.outputs[0]) for o in self._run(token_ids, params, progress)]

    def greedy(self, prompts, *, max_new_tokens, batch_size=0, progress=None):
        ids = self._ids(prompts)
        params = [vllm_sampling_params("greedy", max_new_tokens=max_new_tokens)] * len(ids)
        return [self._generation(o.outputs[0]) for o in self._run(ids, params, progress)]

    def next_token(self, rubric, renders, labels, *, batch_size=0, max_prompt_tokens, by_question=True,
                   progress=None):
        ids = rendered_prompts(self.tokenizer, rubric, renders, max_prompt_tokens)
        params = [vllm_sampling_params("next_token", top_logprobs=self.top_logprobs)] * len(ids)
        out = []
        for o in self._run(ids, params, progress):
            top = o.outputs[0].logprobs[0]  # {token id: Logprob(logprob, rank, decoded_token)}
            out.append(label_mass({self.tokenizer.decode([t]): lp.logprob for t, lp in top.items()}, labels))
        return out

    def sequence_logprobs(self, prompts, responses, *, batch_size=0, progress=None):
        heads = self._ids(prompts)
        rows, spans = [], []
        for h, resp in zip(heads, responses):
            r = self.tokenizer(resp, add_special_tokens=False)["input_ids"] + [self.tokenizer.eos_token_id]
            rows.append(h + r)
            spans.append(len(r))
        params = [vllm_sampling_params("prompt_logprobs")] * len(rows)
        out = []
        for o, row, n in zip(self._run(rows, params, progress), rows, spans):
            plp = o.prompt_logprobs  # position i: {token id: Logprob} for the prompt's token i (None at 0)
            out.append(sum(plp[i][row[i]].logprob for i in range(len(row) - n, len(row))))
        return out

    def close(self) -> None:
        """Free the GPU for the next stage (training): shut the engine core down, drop the model."""
        import gc

        import torch

        # vLLM 0.30/0.31 have no LLM.shutdown(): the engine core (a separate process by default) is
        # shut down explicitly, which frees its GPU memory even if a reference to `llm` survives.
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        self.llm = None
        from vllm.distributed.parallel_state import cleanup_dist_env_and_memory

        cleanup_dist_env_and_memory()  # destroys the parallel state, collects garbage, empties the cache
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------- cache

_OPEN: dict[str, Engine] = {}
_OPEN_LOCK = threading.Lock()


def _key(model_cfg, ref: str) -> str:
    return json.dumps([ref, model_cfg.model_dump(mode="json")], sort_keys=True)


def open_engine(model_cfg, ref: str) -> Engine:
    """The engine for `ref` under `model_cfg` (its engine, dtype and settings). One is kept open:
    asking for another closes it first, so two models never share the GPU. `ref` is a resolved
    checkpoint (hf, vllm) or the served model's name (openai)."""
    key = _key(model_cfg, ref)
    with _OPEN_LOCK:
        if key in _OPEN:
            return _OPEN[key]
        _release_locked()
        if model_cfg.engine == "hf":
            engine: Engine = HFEngine(ref, model_cfg.dtype)
        elif model_cfg.engine == "vllm":
            engine = VLLMEngine(ref, model_cfg)
        else:
            engine = OpenAIEngine(model_cfg.model_copy(update={"name": ref}))
        _OPEN[key] = engine
        return engine


def release() -> None:
    """Close the open engine (before training takes the GPUs)."""
    with _OPEN_LOCK:
        _release_locked()


def _release_locked() -> None:
    while _OPEN:
        _, engine = _OPEN.popitem()
        engine.close()


def model_ref(model_cfg) -> str:
    """What a judge's own model config names: a resolved checkpoint (hf, vllm), or the served name."""
    if model_cfg.engine == "openai":
        return model_cfg.name
    from flywheel.models import loading

    return loading.resolve(model_cfg.name)


def preflight(config) -> None:
    """Before any work: every engine the config names can start (vLLM installed), every judge's own
    model exists, and an endpoint's chat template can be loaded."""
    from flywheel.models import loading

    if config.benchmark.lm_eval is not None:
        from flywheel.models import harness

        harness.check(config.benchmark.lm_eval)
    models = [config.model] + [s.model for s in config.judge.sources if getattr(s, "model", None) is not None]
    for m in models:
        if m.engine == "vllm":
            import importlib.util

            if importlib.util.find_spec("vllm") is None:
                raise EngineError("engine vllm needs vLLM: pip install 'flywheel[vllm]' (a CUDA GPU)")
        if m is not config.model:
            if m.engine == "openai":
                import os

                if m.openai.api_key_env and not os.environ.get(m.openai.api_key_env):
                    raise EngineError(f"endpoint {mask_credentials(m.openai.base_url)}: environment variable "
                                      f"{m.openai.api_key_env} (openai.api_key_env) is not set")
                loading.resolve(m.openai.tokenizer or m.name)
            else:
                loading.resolve(m.name)
