"""Speed of each reward source: candidates judged per second, on real samples of the embedded model.

    .venv/bin/python benchmarks/judge.py [--prompts 32] [--samples 8]

Samples N responses per prompt from the default task, then times every source on the same
candidates. For the LLM judge it also times the baseline without the shared-prefix KV cache
and without the merging of identical responses, and prints the ratios (measured in this run).
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=8)
    args = ap.parse_args()

    from flywheel import config as C
    from flywheel.models import loading, rewards
    from flywheel.models.hf import reference, sampling
    from flywheel.models.rewards.rubric import load_rubric
    from flywheel.models.tasks.splits import make_source, train_items

    cfg = C.FlywheelConfig()
    base = loading.resolve(cfg.model.name)
    task = make_source(cfg.task)
    items = train_items(task, 1, args.prompts, 0, None)[0]
    model, tok = loading.load(base)
    gens = sampling.generate(
        model,
        tok,
        [it.prompt for it in items],
        n=args.samples,
        max_new_tokens=cfg.sampling.max_new_tokens,
        batch_size=cfg.sampling.batch_size,
        do_sample=True,
        seed=0,
    )
    prompts = {it.id: dict(prompt_id=it.id, prompt=it.prompt, answer=it.answer, metadata="{}") for it in items}
    cands = [
        dict(
            candidate_id=f"c{i}",
            prompt_id=items[i // args.samples].id,
            sample_index=i % args.samples,
            response=g.response,
            n_tokens=g.n_tokens,
            self_certainty=g.self_certainty,
        )
        for i, g in enumerate(gens)
    ]
    batch = rewards.Batch(prompts, cands)
    n, unique = len(cands), len(batch.unique()[0])
    print(
        f"{n} candidates ({args.prompts} prompts × {args.samples}), {unique} distinct responses; "
        f"judge batch size {cfg.judge.batch_size}"
    )

    # A reference distinct from the policy, so that the implicit reward runs both models.
    ref_dir = tempfile.mkdtemp(prefix="ref-")
    shutil.copytree(base, ref_dir, dirs_exist_ok=True)
    models = rewards.Models(base, previous=ref_dir, reference=ref_dir, batch_size=cfg.judge.batch_size)
    specs = [
        ("verifier", C.VerifierSource()),
        ("majority_vote", C.MajorityVoteSource()),
        ("self_certainty", C.SelfCertaintySource()),
        ("llm_judge", C.LLMJudgeSource()),
        ("llm_judge k=8", C.LLMJudgeSource(samples=8)),
        ("pairwise_judge (1 opponent)", C.PairwiseJudgeSource(opponents=1)),
        ("implicit_reward", C.ImplicitRewardSource()),
    ]
    rates = {}
    for label, spec in specs:
        source = rewards.build(C.JudgeConfig(sources=[spec]), task)[0]
        loading.load(base)  # warm: model load time is not judging time
        t0 = time.perf_counter()
        source.judge(batch, models)
        seconds = time.perf_counter() - t0
        rates[label] = n / seconds
        print(f"  {label:<28}: {rates[label]:9.1f} candidates/s  ({seconds:.2f} s)")

    rubric = load_rubric()
    qs, rs = [prompts[c["prompt_id"]]["prompt"] for c in cands], [c["response"] for c in cands]
    model, tok = loading.load(base)
    t0 = time.perf_counter()
    reference.llm_judge(
        model, tok, rubric, qs, rs, batch_size=cfg.judge.batch_size, max_prompt_tokens=1024, reuse_prefix=False
    )
    plain = n / (time.perf_counter() - t0)
    t0 = time.perf_counter()
    reference.llm_judge(model, tok, rubric, qs, rs, batch_size=cfg.judge.batch_size, max_prompt_tokens=1024)
    prefix = n / (time.perf_counter() - t0)
    print("LLM judge, every candidate (no merging of identical responses):")
    print(f"  full prompts (baseline)     : {plain:9.1f} candidates/s")
    print(f"  shared-prefix KV cache      : {prefix:9.1f} candidates/s  ({prefix / plain:.2f}x)")
    print(
        f"  + identical responses once  : {rates['llm_judge']:9.1f} candidates/s  "
        f"({rates['llm_judge'] / plain:.2f}x the baseline)"
    )
    shutil.rmtree(ref_dir, ignore_errors=True)


if __name__ == "__main__":
    import os

    from flywheel.flows.cli import quiet_libraries

    quiet_libraries()
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    main()
