"""The GPU path, end to end, on the embedded checkpoint: CUDA, bf16, vLLM, training speed.

    .venv/bin/pip install -e '.[vllm]'       # vLLM 0.30 (pins torch 2.13.0, CUDA build on a GPU box)
    .venv/bin/python benchmarks/gpu_smoke.py [--prompts 64] [--skip-round]

Prints, each measured in this run:
  device     the GPU, its memory, bf16 support
  hf         flywheel's in-process sampling on the GPU (bf16): the default round's requests, tokens/s
  vllm       vLLM alone (vllm.LLM.generate on the same token ids, the same per-sample seeds) vs the
             same requests through flywheel's vllm engine (chat templating, seeds, parsing):
             tokens/s, and the engine's overhead against vLLM alone (the target is ≤ 10%)
  judge      rubric scores through the vllm engine vs in-process hf on the same candidates: largest difference
  release    GPU memory held after the engine is closed (what training gets back)
  round      one full default round with model.engine: vllm (generate, judge, curate, DPO, benchmark):
             each stage's seconds, generate tokens/s, DPO seconds
Exits 2 with one line when there is no CUDA GPU or no vLLM.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--prompts", type=int, default=64)
    ap.add_argument("--skip-round", action="store_true")
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA GPU here (torch.cuda.is_available() is False)", file=sys.stderr)
        return 2
    try:
        import vllm
    except ImportError:
        print("gpu_smoke: vLLM is not installed: pip install -e '.[vllm]'", file=sys.stderr)
        return 2

    from flywheel import config as C
    from flywheel.models import engines, judges, loading
    from flywheel.models.tasksource import make_source, train_items

    props = torch.cuda.get_device_properties(0)
    print(f"device   {props.name}, {props.total_memory / 2**30:.0f} GiB, bf16 {torch.cuda.is_bf16_supported()}, "
          f"torch {torch.__version__}, vllm {vllm.__version__}")
    cfg = C.FlywheelConfig()
    s = cfg.sampling
    ref = loading.resolve(cfg.model.name)
    prompts = [it.prompt for it in train_items(make_source(cfg.task), 1, args.prompts, 0, None)[0]]
    kw = dict(n=s.n, max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=1000,
              batch_size=s.batch_size)

    hf = engines.open_engine(C.ModelConfig(), ref)
    hf.sample(prompts[:2], **dict(kw, n=2))  # warm-up
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    gens = hf.sample(prompts, **kw)
    t_hf = time.perf_counter() - t0
    print(f"hf       {sum(g.n_tokens for g in gens) / t_hf:9.1f} tok/s  ({len(gens)} samples, {t_hf:.1f} s, "
          f"{loading.default_dtype()})")
    rubric = judges.load_rubric()
    renders = [{"question": p, "response": g.response} for p, g in zip([p for p in prompts for _ in range(s.n)], gens)]
    hf_scores = judges.verdicts(hf.next_token(rubric, renders, judges.SCORE_LABELS, batch_size=64,
                                              max_prompt_tokens=1024), 0, 0)
    engines.release()

    engine = engines.open_engine(cfg.model.model_copy(update={"engine": "vllm"}), ref)
    ids = engine._ids(prompts)
    token_ids, params = [], []
    for p, pid in zip(prompts, ids):
        for k in range(s.n):
            token_ids.append(pid)
            params.append(vllm.SamplingParams(**engines.vllm_sampling_params(
                "sample", max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p,
                seed=engines.row_seed(1000, p, k))))
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
    print(f"vllm     alone {tok_alone / t_alone:9.1f} tok/s ({t_alone:.2f} s)   through flywheel "
          f"{tok_through / t_through:9.1f} tok/s ({t_through:.2f} s)   overhead "
          f"{(t_through / t_alone - 1) * 100:+.1f}%   identical samples {same}/{len(through)}")
    v_scores = judges.verdicts(engine.next_token(rubric, renders, judges.SCORE_LABELS, max_prompt_tokens=1024), 0, 0)
    diffs = [abs(a.score - b.score) for a, b in zip(hf_scores, v_scores) if a.score is not None and b.score is not None]
    parse_same = sum(a.parse_ok == b.parse_ok for a, b in zip(hf_scores, v_scores))
    print(f"judge    vllm vs hf on {len(renders)} candidates: parse agrees {parse_same}, max score difference "
          f"{max(diffs, default=float('nan')):.3f}, mean {sum(diffs) / max(len(diffs), 1):.3f}")
    engines.release()
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    print(f"release  GPU memory in use after close: {(total - free) / 2**30:.2f} GiB of {total / 2**30:.0f}")

    if not args.skip_round:
        from flywheel.flows.flywheel import flywheel

        with tempfile.TemporaryDirectory() as ws:
            config = C.load_config(None, {"rounds": 1, "workspace": ws, "model": {"engine": "vllm"}})
            t0 = time.perf_counter()
            result = flywheel(config)
            r1 = result["rounds"][1]
            print(f"round    {time.perf_counter() - t0:.1f} s with round 0's benchmark; round 1 "
                  f"{r1['round_seconds']:.1f} s: " + ", ".join(
                      f"{st} {r1.get(st + '_seconds', 0):.1f} s" for st in ("generate", "judge", "train", "benchmark"))
                  + f"; generate {r1['generate_tokens_per_s']:.0f} tok/s; accuracy "
                  f"{result['rounds'][0]['accuracy']:.3f} → {r1['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
