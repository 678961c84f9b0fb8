"""Does the `openai` engine keep a server busy? Its throughput against a plain concurrent client
on the same server, the same requests and the same concurrency (same run).

    .venv/bin/python benchmarks/openai_throughput.py [--base-url URL --model NAME --tokenizer T]
                                                     [--prompts 32] [--samples 4] [--concurrency 4]

Without --base-url it starts llama.cpp's server (the test extra's llama-cpp-python[server]) on
the embedded GGUF on loopback, and stops it after. Prints, for sampling (prompts × samples,
max 32 new tokens) and for rubric scoring (one request per candidate):
  plain    a thread pool POSTing the exact request bodies the engine sends, nothing else
  engine   flywheel's OpenAIEngine (chat templating, retries, bounded concurrency, parsing)
and the engine's throughput as a fraction of the plain client's (the target is ≥ 0.80).
"""

from __future__ import annotations

import argparse
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager


@contextmanager
def llama_server(threads: int):
    import httpx

    from flywheel.models import loading

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(loading.embedded_gguf("smollm2-135m-instruct")),
            "--model_alias",
            "smollm",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_threads",
            str(threads),
            "--n_threads_batch",
            str(threads),
            "--interrupt_requests",
            "False",
            "--verbose",
            "False",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}/v1"
    try:
        for _ in range(240):
            try:
                if httpx.get(f"{url}/models", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def plain(url: str, bodies: list[dict], concurrency: int) -> float:
    import httpx

    with httpx.Client(timeout=300) as client, ThreadPoolExecutor(concurrency) as pool:
        t0 = time.perf_counter()
        answers = list(pool.map(lambda b: client.post(f"{url}/completions", json=b).json(), bodies))
        seconds = time.perf_counter() - t0
    assert all(a.get("choices") for a in answers)
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-url")
    ap.add_argument("--model", default="smollm")
    ap.add_argument("--tokenizer", default="embedded:smollm2-135m-instruct")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--concurrency", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2, help="the started server's threads")
    args = ap.parse_args()

    from flywheel import config as C
    from flywheel import seeds
    from flywheel.models import engines
    from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric
    from flywheel.models.tasks.splits import make_source, train_items

    items = train_items(make_source(C.TaskConfig()), 1, args.prompts, 0, None)[0]
    prompts = [it.prompt for it in items]

    def run(url: str) -> None:
        cfg = C.ModelConfig(
            name=args.model,
            engine="openai",
            openai={"base_url": url, "tokenizer": args.tokenizer, "max_concurrency": args.concurrency},
        )
        engine = engines.OpenAIEngine(cfg)
        texts = engine._texts(prompts)
        engine.greedy(prompts[:1], max_new_tokens=4)  # warm: tokenizer loaded, connection open
        kw = dict(max_new_tokens=32, temperature=1.0, top_p=1.0)
        bodies = [
            engines.openai_completion("sample", args.model, t, seed=seeds.row(0, p, k), **kw)
            for p, t in zip(prompts, texts)
            for k in range(args.samples)
        ]
        t_plain = plain(url, bodies, args.concurrency)
        t0 = time.perf_counter()
        gens = engine.sample(prompts, n=args.samples, seed=0, **kw)
        t_engine = time.perf_counter() - t0
        tokens = sum(g.n_tokens for g in gens)
        print(f"sampling {len(bodies)} requests, {tokens} tokens, concurrency {args.concurrency}")
        print(f"  plain   {len(bodies) / t_plain:7.2f} req/s  ({t_plain:.1f} s)")
        print(
            f"  engine  {len(bodies) / t_engine:7.2f} req/s  ({t_engine:.1f} s, {tokens / t_engine:.1f} tok/s)"
            f"  {t_plain / t_engine:.2f} of plain"
        )

        rubric = load_rubric()
        renders = [
            {"question": p, "response": g.response}
            for p, g in zip([p for p in prompts for _ in range(args.samples)], gens)
        ]
        tok = engine.tokenizer
        judge_texts = [tok.decode(ids) for ids in engines.rendered_prompts(tok, rubric, renders, 1024)]
        jbodies = [engines.openai_completion("next_token", args.model, t) for t in judge_texts]
        t_plain = plain(url, jbodies, args.concurrency)
        t0 = time.perf_counter()
        engine.next_token(rubric, renders, SCORE_LABELS, max_prompt_tokens=1024)
        t_engine = time.perf_counter() - t0
        print(f"rubric scoring {len(jbodies)} candidates ({engine.verdict_method})")
        print(f"  plain   {len(jbodies) / t_plain:7.2f} cand/s ({t_plain:.1f} s)")
        print(f"  engine  {len(jbodies) / t_engine:7.2f} cand/s ({t_engine:.1f} s)  {t_plain / t_engine:.2f} of plain")
        engine.close()

    if args.base_url:
        run(args.base_url)
    else:
        with llama_server(args.threads) as url:
            print(f"llama.cpp server on the embedded GGUF at {url} ({args.threads} threads)")
            run(url)


if __name__ == "__main__":
    main()
