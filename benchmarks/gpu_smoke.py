"""The GPU path on the embedded checkpoint: CUDA, bf16, sampling, judging, DPO speed, vLLM, a round.

    .venv/bin/pip install -e '.[vllm]'       # vLLM (pins torch 2.13.0, CUDA build on a GPU box)
    .venv/bin/python benchmarks/gpu_smoke.py [--prompts 64] [--skip-round]

    # on a machine without reasoning-gym, the default task's items written beforehand elsewhere:
    .venv/bin/python benchmarks/gpu_smoke.py --dump-items items.json      # (CPU is enough)
    python benchmarks/gpu_smoke.py --items items.json

Prints, each measured in this run (a section whose engine is missing says so in one line and the
others go on):
  device   the GPU, its memory, bf16 support, versions
  sample   flywheel's in-process sampling (models/hf/decode.py, continuous batching) on the default
           round's requests, bf16 and fp32: tokens/s; and the same requests through transformers'
           own generate() (the reference implementation) for comparison
  scale    the same sampling with 8× the prompts (what a GPU is for): tokens/s
  greedy   the test split, greedy, bf16 vs fp32: exact match each, identical responses, tokens/s
  judge    the LLM judge's rubric scores on the sampled candidates: candidates/s, bf16 vs fp32 score
           differences
  train    DPO with the default settings (LoRA) on pairs from the samples, then a full fine-tune:
           seconds per step, tokens/s, and the FLOP estimate against the GPU's bf16 dense peak
  large    (with --only train_large) the same DPO on a ~1B-parameter Llama-style model with random
           weights (--large-layers, --large-hidden) and longer pairs (--large-tokens): where the
           matmuls dominate, the FLOP rate a user's 1B model would see
  profile  (with --only profile) where a greedy decode's time goes, bf16 vs fp32: kernel launches
           per generated token, GPU busy share, the top kernels and host operations
  vllm     vLLM alone vs the same requests through flywheel's vllm engine: overhead (target ≤ 10%),
           identical samples, judge agreement with hf, GPU memory after close
  round    the default run for --rounds rounds (1) with model.engine: vllm, or hf where vLLM is missing
           (needs prefect, mlflow, duckdb, reasoning-gym): each stage's seconds, test exact match
Exits 2 with one line when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import traceback
from pathlib import Path

# Dense bf16 peak (TFLOP/s, no sparsity) by device-name fragment, from NVIDIA's data sheets.
BF16_PEAK = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def items_from_task(prompts: int) -> dict:
    from flywheel import config as C
    from flywheel.models.tasks.splits import eval_items, make_source, train_items

    cfg = C.FlywheelConfig()
    source = make_source(cfg.task)
    _, test = eval_items(source, cfg.benchmark.validation_size, cfg.benchmark.size, cfg.seed)
    train = train_items(source, 1, prompts, cfg.seed, None).items
    return {"train": [it.prompt for it in train], "test": [{"prompt": it.prompt, "answer": it.answer} for it in test]}


def section(name: str, fn) -> None:
    try:
        fn()
    except Exception as e:  # one section's failure is reported and the others go on
        print(f"{name:8s} FAILED: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        traceback.print_exc(limit=4, file=sys.stdout)
    sys.stdout.flush()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-round", action="store_true")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of the default run in the round section")
    ap.add_argument(
        "--round-config", type=Path, default=None, help="a YAML config for the round section (the default's)"
    )
    ap.add_argument("--items", type=Path, default=None, help="train prompts and test items (from --dump-items)")
    ap.add_argument("--dump-items", type=Path, default=None, help="write the default task's items here and exit")
    ap.add_argument("--train-steps", type=int, default=10)
    ap.add_argument("--large-layers", type=int, default=16, help="train_large: layers (16 × hidden 2048 ≈ 1B)")
    ap.add_argument("--large-hidden", type=int, default=2048, help="train_large: hidden size (a multiple of 256)")
    ap.add_argument("--large-tokens", type=int, default=256, help="train_large: words per response")
    ap.add_argument(
        "--large-dpo",
        type=json.loads,
        default={},
        help="train_large: DPO settings, e.g. '{\"activation_checkpointing\": false}'",
    )
    ap.add_argument(
        "--large-lora", choices=["both", "lora", "full"], default="both", help="train_large: which fine-tunes"
    )
    ap.add_argument("--test", type=int, default=None, help="at most this many test items")
    ap.add_argument("--only", nargs="+", default=None, help="run only these sections (sample is always run)")
    ap.add_argument("--allow-cpu", action="store_true", help="a dry run of every section on the CPU")
    args = ap.parse_args()

    if args.dump_items:
        data = items_from_task(args.prompts * 8)
        args.dump_items.write_text(json.dumps(data))
        print(f"wrote {len(data['train'])} train prompts and {len(data['test'])} test items to {args.dump_items}")
        return 0

    import torch

    cuda = torch.cuda.is_available()
    if not cuda and not args.allow_cpu:
        print("gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2

    import transformers

    from flywheel import config as C
    from flywheel import seeds
    from flywheel.models import engines, loading
    from flywheel.models.hf import reference, sampling
    from flywheel.models.rewards.rubric import SCORE_LABELS, load_rubric, verdicts
    from flywheel.models.tasks import extract_answer

    props = torch.cuda.get_device_properties(0) if cuda else None
    name, mem = (props.name, props.total_memory / 2**30) if cuda else ("CPU (dry run)", 0)
    peak = next((v for k, v in BF16_PEAK.items() if k in name), None)
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    print(
        f"device   {name}, {mem:.0f} GiB, bf16 {cuda and torch.cuda.is_bf16_supported()}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}, bf16 dense peak "
        f"{peak or '?'} TFLOP/s"
    )
    cfg = C.FlywheelConfig()
    s = cfg.sampling
    t0 = time.perf_counter()
    ref = loading.resolve(cfg.model.name)
    print(
        f"model    {ref} ({loading.model_bytes(ref) / 2**20:.0f} MiB on disk, resolved in "
        f"{time.perf_counter() - t0:.1f} s)"
    )
    data = json.loads(args.items.read_text()) if args.items else items_from_task(args.prompts * 8)
    prompts, many, test = data["train"][: args.prompts], data["train"][: args.prompts * 8], data["test"][: args.test]
    kw = dict(
        n=s.n,
        max_new_tokens=s.max_new_tokens,
        temperature=s.temperature,
        top_p=s.top_p,
        seed=1000,
        batch_size=s.batch_size,
    )
    state: dict = {}

    def timed(fn):
        sync()
        t = time.perf_counter()
        out = fn()
        sync()
        return out, time.perf_counter() - t

    def sample():
        for dtype in ("bfloat16", "float32"):
            eng = engines.HFEngine(ref, dtype)
            eng.sample(prompts[:2], **dict(kw, n=2))  # warm-up (CUDA context, kernels)
            gens, t = timed(lambda eng=eng: eng.sample(prompts, **kw))
            tok = sum(g.n_tokens for g in gens)
            state[dtype] = gens
            line = (
                f"sample   {dtype:9s} flywheel decode {tok / t:8.0f} tok/s "
                f"({len(gens)} samples, {tok} tokens, {t:.2f} s)"
            )
            rep = [p for p in prompts for _ in range(s.n)]
            ref_gens, t2 = timed(
                lambda eng=eng, rep=rep: reference.generate_reference(
                    eng.model,
                    eng.tokenizer,
                    rep,
                    max_new_tokens=s.max_new_tokens,
                    batch_size=s.batch_size,
                    do_sample=True,
                    temperature=s.temperature,
                    top_p=s.top_p,
                    seed=1000,
                )
            )
            tok2 = sum(g.n_tokens for g in ref_gens)
            print(line + f"; transformers generate() {tok2 / t2:8.0f} tok/s ({t2:.2f} s)")
            if dtype == "bfloat16" and len(many) > len(prompts):
                big, t3 = timed(lambda eng=eng: eng.sample(many, **kw))
                tok3 = sum(g.n_tokens for g in big)
                print(
                    f"scale    bfloat16  {len(many)} prompts × {s.n}: {tok3 / t3:8.0f} tok/s "
                    f"({tok3} tokens, {t3:.2f} s)"
                )
            state[f"engine_{dtype}"] = eng

    def greedy():
        from flywheel.models.tasks.prompts_file import FileSource

        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "test.jsonl"
            path.write_text("".join(json.dumps(t) + "\n" for t in test))
            src = FileSource(path)
            items = src.items(0, len(test))
        res = {}
        for dtype in ("bfloat16", "float32"):
            eng = state[f"engine_{dtype}"]
            gens, t = timed(
                lambda eng=eng: eng.greedy(
                    [it.prompt for it in items],
                    max_new_tokens=cfg.benchmark.max_new_tokens,
                    batch_size=cfg.benchmark.batch_size,
                )
            )
            exact = [
                src.score(extract_answer(g.response, it.answer), it.answer, it.metadata) == 1.0
                for g, it in zip(gens, items)
            ]
            res[dtype] = gens
            print(
                f"greedy   {dtype:9s} exact match {sum(exact)}/{len(items)} = {sum(exact) / len(items):.1%}, "
                f"{sum(g.n_tokens for g in gens) / t:8.0f} tok/s ({t:.2f} s)"
            )
        same = sum(a.response == b.response for a, b in zip(res["bfloat16"], res["float32"]))
        print(f"greedy   bf16 vs fp32: identical responses {same}/{len(items)}")

    def judge():
        rubric = load_rubric()
        gens = state["float32"]
        rep = [p for p in prompts for _ in range(s.n)]
        renders = [{"question": p, "response": g.response} for p, g in zip(rep, gens)]
        scores = {}
        for dtype in ("bfloat16", "float32"):
            eng = state[f"engine_{dtype}"]
            eng.next_token(rubric, renders[:8], SCORE_LABELS, batch_size=64, max_prompt_tokens=1024)
            nts, t = timed(
                lambda eng=eng: eng.next_token(rubric, renders, SCORE_LABELS, batch_size=64, max_prompt_tokens=1024)
            )
            scores[dtype] = verdicts(nts, 0, 0)
            print(f"judge    {dtype:9s} {len(renders) / t:8.1f} candidates/s ({len(renders)} candidates, {t:.2f} s)")
        d = [
            abs(a.score - b.score)
            for a, b in zip(scores["bfloat16"], scores["float32"])
            if a.score is not None and b.score is not None
        ]
        print(
            f"judge    bf16 vs fp32 expected score: max difference {max(d, default=float('nan')):.3f}, "
            f"mean {sum(d) / max(len(d), 1):.3f} (scores 1-5)"
        )

    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        """Wall time of the steps after the first (kernels compiled, caches warm)."""

        def __init__(self):
            self.marks = []

        def on_step_end(self, *a, **k):
            sync()
            self.marks.append(time.perf_counter())

    def dpo_speed(label: str, model_ref: str, rows: list[dict], n_params: int, lora: bool, dpo: dict) -> None:
        """flywheel's DPO (trainer.train: TRL, precomputed reference log-probs) on `rows` for
        --train-steps steps: the wall time in all, a steady step's time, tokens/s and FLOP rate."""
        from transformers import AutoTokenizer

        from flywheel.models.training import trainer

        tok = AutoTokenizer.from_pretrained(model_ref)

        def tokens(r):
            msgs = [{"role": "user", "content": r["prompt"]}]
            return sum(
                min(
                    len(
                        tok(
                            tok.apply_chat_template(msgs + [{"role": "assistant", "content": r[k]}], tokenize=False),
                            add_special_tokens=False,
                        )["input_ids"]
                    ),
                    dpo.get("max_length") or 10**9,
                )
                for k in ("chosen", "rejected")
            )

        tc = C.TrainConfig(lora=lora, dpo={**dpo, "max_steps": args.train_steps, "logging_steps": 1})
        bs = tc.dpo.get("per_device_train_batch_size", 8) * tc.dpo.get("gradient_accumulation_steps", 1)
        steps = args.train_steps
        used = [rows[i % len(rows)] for i in range(steps * bs)]
        toks = sum(tokens(r) for r in used)
        clock = StepClock()
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        with tempfile.TemporaryDirectory() as d:
            t = time.perf_counter()
            m = trainer.train(
                model_ref,
                rows,
                tc,
                Path(d) / "out",
                base=model_ref,
                seed=0,
                fingerprint=f"gpu-{lora}",
                checkpoint_steps=10**6,
                callbacks=[clock],
            )
            wall = time.perf_counter() - t
        steady = (clock.marks[-1] - clock.marks[0]) / max(len(clock.marks) - 1, 1)
        # policy forward+backward 6·N·T (a LoRA backward skips the frozen weights' gradients: ≈ 4·N·T),
        # activation checkpointing one more forward (2·N·T); the reference's forward is precomputed
        # before the steps, so it is not in a step's FLOP.
        step_flop = ((4 if lora else 6) * n_params * toks + 2 * n_params * toks) / steps
        achieved = step_flop / steady / 1e12
        mem = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB" if cuda else ""
        print(
            f"{label:8s} {'LoRA' if lora else 'full'} DPO {steps} steps × batch {bs} ({toks / steps:.0f} tokens a "
            f"step): {wall:.1f} s in all (load, precompute, steps, merge, save); a step after the first "
            f"{steady * 1000:.0f} ms = {toks / steps / steady:.0f} tokens/s ≈ {achieved:.3f} TFLOP/s"
            + (f" = {achieved / peak:.2%} of the bf16 dense peak" if peak else "")
            + f"; loss {m['train_loss']:.4f}{mem}"
        )

    def free_engines():
        """Close the sections' engines and free their GPU memory before training."""
        for key in [k for k in state if k.startswith("engine_")]:
            state.pop(key).close()
        engines.release()

    def train():
        free_engines()
        gens = state["float32"]
        rows = []
        for i, p in enumerate(prompts):
            g = gens[i * s.n : (i + 1) * s.n]
            rows.append({"prompt": p, "chosen": g[0].response or "0", "rejected": g[1].response or "1"})
        n_params = sum(
            p.numel()
            for p in __import__("safetensors.torch", fromlist=["x"])
            .load_file(str(next(Path(ref).glob("*.safetensors"))))
            .values()
        )
        for lora in (True, False):
            dpo_speed("train", ref, rows, n_params, lora, {})

    def train_large():
        """The same DPO on a model of the size users train (--large-layers × --large-hidden, Llama-style,
        the embedded model's tokenizer and chat template), randomly initialised: speed does not depend
        on what the weights have learned. Pairs of --large-tokens words a side."""
        import random

        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        free_engines()
        h = args.large_hidden
        mc = AutoConfig.from_pretrained(ref)
        mc.update(
            {
                "hidden_size": h,
                "intermediate_size": 4 * h,
                "num_hidden_layers": args.large_layers,
                "num_attention_heads": h // 64,
                "num_key_value_heads": max(h // 256, 1),
                "head_dim": 64,
                "max_position_embeddings": 4096,
            }
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(mc, dtype=torch.bfloat16 if cuda else torch.float32)
        n_params = sum(p.numel() for p in model.parameters())
        rng = random.Random(0)
        words = (  # noqa: SIM905 - one sentence reads better than a list of its words
            "the model answers each question with a short sum of two numbers and then explains "
            "why that sum is right in one or two plain sentences"
        ).split()

        def text(n):
            return " ".join(rng.choice(words) for _ in range(n))

        n = args.large_tokens
        rows = [{"prompt": text(n // 4), "chosen": text(n), "rejected": text(n)} for _ in range(32)]
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            AutoTokenizer.from_pretrained(ref).save_pretrained(d)
            del model
            print(
                f"large    {n_params / 1e9:.2f}B parameters ({args.large_layers} layers × hidden {h}), random "
                f"weights in {'bf16' if cuda else 'fp32'}; pairs of ~{n} words a side"
            )
            for lora in {"both": (True, False), "lora": (True,), "full": (False,)}[args.large_lora]:
                dpo_speed("large", d, rows, n_params, lora, {"max_length": 2 * n + n // 2, **args.large_dpo})

    def profile():
        """Where a greedy decode's time goes, bf16 vs fp32: kernel launches, GPU busy time, host time."""
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        batch = [t["prompt"] for t in test[:64]]
        for dtype in ("bfloat16", "float32"):
            eng = state.get(f"engine_{dtype}") or engines.HFEngine(ref, dtype)
            eng.greedy(batch[:4], max_new_tokens=8, batch_size=64)  # warm-up
            sync()
            if dtype == "bfloat16":  # torch's own choice of attention kernel (cuDNN's on Hopper), for comparison
                gens, t = timed(
                    lambda eng=eng: sampling.generate(
                        eng.model,
                        eng.tokenizer,
                        batch,
                        do_sample=False,
                        max_new_tokens=cfg.benchmark.max_new_tokens,
                        batch_size=64,
                    )
                )
                print(
                    f"profile  {dtype:9s} greedy {len(batch)} items with torch's default attention backends: "
                    f"{t:.2f} s, {sum(g.n_tokens for g in gens) / t:.0f} tok/s"
                )
            with torch_profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                gens, t = timed(
                    lambda eng=eng: eng.greedy(batch, max_new_tokens=cfg.benchmark.max_new_tokens, batch_size=64)
                )
            events = prof.key_averages()
            kernels = [e for e in events if e.device_type == torch.autograd.DeviceType.CUDA]
            launches = sum(e.count for e in kernels)
            gpu_us = sum(e.self_device_time_total for e in kernels)
            tokens = sum(g.n_tokens for g in gens)
            print(
                f"profile  {dtype:9s} greedy {len(batch)} items, flywheel's backends: {t:.2f} s wall, "
                f"GPU busy {gpu_us / 1e6:.2f} s "
                f"({gpu_us / 1e6 / t:.0%}), {launches} kernel launches ({launches / max(tokens, 1):.0f} per token "
                f"generated), {tokens} tokens"
            )
            top = sorted(kernels, key=lambda e: -e.self_device_time_total)[:6]
            for e in top:
                print(f"profile  {dtype:9s}   {e.self_device_time_total / 1e3:8.1f} ms  {e.count:6d}×  {e.key[:90]}")
            cpu = sorted(
                [e for e in events if e.device_type == torch.autograd.DeviceType.CPU],
                key=lambda e: -e.self_cpu_time_total,
            )[:6]
            for e in cpu:
                print(f"profile  {dtype:9s}   host {e.self_cpu_time_total / 1e3:8.1f} ms  {e.count:6d}×  {e.key[:80]}")

    def vllm_section():
        try:
            import vllm
        except ImportError:
            print("vllm     not installed here: skipped (pip install -e '.[vllm]')")
            return
        engines.release()
        engine = engines.open_engine(cfg.model.model_copy(update={"engine": "vllm"}), ref)
        ids = engine._ids(prompts)
        token_ids, params = [], []
        for p, pid in zip(prompts, ids):
            for k in range(s.n):
                token_ids.append(pid)
                params.append(
                    vllm.SamplingParams(
                        **engines.vllm_sampling_params(
                            "sample",
                            max_new_tokens=s.max_new_tokens,
                            temperature=s.temperature,
                            top_p=s.top_p,
                            seed=seeds.row(1000, p, k),
                        )
                    )
                )
        engine.llm.generate([{"prompt_token_ids": ids[0]}], params[:1], use_tqdm=False)  # warm-up
        t0 = time.perf_counter()
        alone = engine.llm.generate([{"prompt_token_ids": t} for t in token_ids], params, use_tqdm=False)
        t_alone = time.perf_counter() - t0
        tok_alone = sum(len(o.outputs[0].token_ids) for o in alone)
        t0 = time.perf_counter()
        through = engine.sample(prompts, **kw)
        t_through = time.perf_counter() - t0
        tok_through = sum(g.n_tokens for g in through)
        same = sum(o.outputs[0].text.strip() == g.response for o, g in zip(alone, through))
        print(
            f"vllm     {vllm.__version__}: alone {tok_alone / t_alone:9.1f} tok/s ({t_alone:.2f} s)   through "
            f"flywheel {tok_through / t_through:9.1f} tok/s ({t_through:.2f} s)   overhead "
            f"{(t_through / t_alone - 1) * 100:+.1f}%   identical samples {same}/{len(through)}"
        )
        engines.release()
        torch.cuda.synchronize()
        free, total = torch.cuda.mem_get_info()
        print(f"release  GPU memory in use after close: {(total - free) / 2**30:.2f} GiB of {total / 2**30:.0f}")

    def round_section():
        try:
            import duckdb  # noqa: F401
            import mlflow  # noqa: F401
            import prefect  # noqa: F401
        except ImportError as e:
            print(f"round    skipped: {e.name} is not installed here")
            return
        try:
            import vllm  # noqa: F401

            engine = "vllm"
        except ImportError:
            engine = "hf"  # the in-process engine on the GPU: the round's other stages are the same
        from flywheel.flows.flywheel import flywheel

        with tempfile.TemporaryDirectory() as ws:
            config = C.load_config(
                args.round_config, {"rounds": args.rounds, "workspace": ws, "model": {"engine": engine}}
            )
            t0 = time.perf_counter()
            result = flywheel(config)
            rounds = result["rounds"]
            print(
                f"round    engine {engine}, {args.rounds} round(s): {time.perf_counter() - t0:.1f} s with round "
                f"0's benchmark; test exact match " + " → ".join(f"{r['exact_match']:.3f}" for r in rounds)
            )
            for k, r in enumerate(rounds[1:], 1):
                print(
                    f"round    {k}: {r['round_seconds']:.1f} s: "
                    + ", ".join(
                        f"{st} {r.get(st + '_seconds', 0):.1f} s" for st in ("generate", "judge", "train", "benchmark")
                    )
                    + f"; pairs {r.get('pairs')}; promoted {r.get('promoted')}"
                )

    want = set(args.only or ["greedy", "judge", "train", "vllm", "round"])  # profile, train_large: when named
    section("sample", sample)
    for name, fn in (
        ("greedy", greedy),
        ("profile", profile),
        ("judge", judge),
        ("train", train),
        ("train_large", train_large),
        ("vllm", vllm_section),
        ("round", round_section),
    ):
        if name in want and not (name == "round" and args.skip_round):
            section(name, fn)
    return 0


if __name__ == "__main__":
    sys.exit(main())
