"""Sampling sharded across worker processes (`model.workers`), one per device.

The round's prompts are cut into `sampling.shards` contiguous shards, and each shard is decoded
as its own continuous-batching stream. Which process decodes a shard does not change its rows:
a sample's seed comes from (seed, prompt, sample index), and a shard's batches are the same in
any process. So `workers: 1` and `workers: 2` give identical rows for the same shards; the
number of shards is part of the config's meaning (a different cut changes which rows share a
batch, and so, rarely, a sampled token), the number of workers is not.

Workers are spawned processes, each with its own copy of the model: on GPUs, worker i sees only
GPU i (CUDA_VISIBLE_DEVICES); on the CPU, each uses as many threads as one process would (so that
reductions split alike and the rows stay identical), so a CPU gains no speed from them. The results
come back in shard order and go into the same candidates table as an unsharded stage's. Workers
are spawned, so a script that runs a flow itself needs the usual `if __name__ == "__main__":` guard
(the `flywheel` command and Prefect's workers have it).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence

from flywheel.models import engines


def cut(n: int, shards: int) -> list[range]:
    """`n` items in `shards` contiguous, near-equal ranges (the first ones one longer), none empty."""
    shards = max(1, min(shards, n))
    size, extra = divmod(n, shards)
    out, start = [], 0
    for i in range(shards):
        stop = start + size + (1 if i < extra else 0)
        out.append(range(start, stop))
        start = stop
    return out


def sample(
    model_cfg, ref: str, prompts: Sequence[str], *, shards: int, workers: int, n: int, progress=None, **kwargs
) -> list[engines.Generation]:
    """engine.sample over `prompts`, shard by shard (in this process when workers is 1, else in a
    pool of `workers` processes); n generations per prompt, prompt-major, as engine.sample."""
    ranges = cut(len(prompts), shards)
    parts = [[prompts[i] for i in r] for r in ranges]
    if workers <= 1 or len(parts) == 1:
        engine = engines.open_engine(model_cfg, ref)
        return [g for part in parts for g in engine.sample(part, n=n, progress=progress, **kwargs)]
    return _in_workers(model_cfg, ref, parts, min(workers, len(parts)), n, kwargs, progress)


def _in_workers(model_cfg, ref, parts, workers: int, n: int, kwargs: dict, progress) -> list[engines.Generation]:
    import multiprocessing as mp
    import threading
    from concurrent.futures import ProcessPoolExecutor

    engines.release()  # this process's model leaves memory: the workers hold their own
    ctx = mp.get_context("spawn")  # never fork a process holding torch's threads (or CUDA)
    devices, done = ctx.Queue(), ctx.Queue()
    for i in range(workers):
        devices.put(i)
    import torch

    # Every worker uses this process's thread count: a reduction over the vocabulary (softmax, the
    # log-prob statistics) splits by thread, and a different split changes the last bits of a
    # float. On a CPU the workers then share its cores, so they add no speed there: they are for
    # machines with one device per worker.
    threads = torch.get_num_threads()
    stop = threading.Event()

    def drain() -> None:  # workers' per-row progress, shown by this process
        import queue

        while not stop.is_set() or not done.empty():
            try:
                k = done.get(timeout=0.2)
            except queue.Empty:
                continue
            if progress is not None:
                progress(k)

    watcher = threading.Thread(target=drain, daemon=True)
    watcher.start()
    try:
        with ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_init_worker, initargs=(devices, done, threads)
        ) as pool:
            futures = [
                pool.submit(_sample_part, model_cfg.model_dump(mode="json"), ref, part, n, kwargs) for part in parts
            ]
            results = [f.result() for f in futures]
    finally:
        stop.set()
        watcher.join()
    return [g for part in results for g in part]


_DONE = None  # in a worker: the queue its progress goes to


def _init_worker(devices, done, threads: int) -> None:
    global _DONE
    _DONE = done
    device = devices.get()
    if os.environ.get("CUDA_VISIBLE_DEVICES") is None or "," in os.environ["CUDA_VISIBLE_DEVICES"]:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else None
        os.environ["CUDA_VISIBLE_DEVICES"] = ids[device % len(ids)] if ids else str(device)
    import torch

    if not torch.cuda.is_available():
        torch.set_num_threads(threads)


def _sample_part(model_json: dict, ref: str, prompts: list[str], n: int, kwargs: dict) -> list[engines.Generation]:
    from flywheel.config import ModelConfig

    engine = engines.open_engine(ModelConfig.model_validate(model_json), ref)  # kept open for the next shard
    report: Callable[[int], None] = _DONE.put if _DONE is not None else (lambda k: None)
    return engine.sample(prompts, n=n, progress=report, **kwargs)
