"""One process of a launched training job (`accelerate launch -m flywheel.models.training.job JOB`).

Every process reads the job (JSON) and its dataset (saved by the stage), and trains; the main process writes
the merged checkpoint and result.json. Each process records the steps it took in rank-<i>.json,
so that the stage can tell that every rank trained.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def main(job_file: str) -> int:
    import datasets
    from transformers import TrainerCallback

    from flywheel.config import TrainConfig
    from flywheel.models.training import trainer

    job_dir = Path(job_file).parent
    job = json.loads(Path(job_file).read_text())
    # File-backed (not built in memory per process): TRL's processes share cache files beside it.
    data = datasets.load_from_disk(str(job_dir / "dataset"))
    rank = int(os.environ.get("RANK", "0"))

    class RecordSteps(TrainerCallback):
        def on_train_end(self, args, state, control, **kwargs):
            (job_dir / f"rank-{args.process_index}.json").write_text(
                json.dumps({"global_step": state.global_step, "world_size": args.world_size})
            )

    callbacks = [RecordSteps()]
    if rank == 0 and job["mlflow_run_id"]:
        from flywheel.storage import tracking

        callbacks.append(tracking.training_callback(job["mlflow_run_id"]))
    metrics = trainer.train(
        job["policy"],
        [],
        TrainConfig.model_validate(job["cfg"]),
        Path(job["out"]),
        base=job["base"],
        seed=job["seed"],
        callbacks=callbacks,
        dtype=job["dtype"],
        fingerprint=job["fingerprint"],
        checkpoint_steps=job["checkpoint_steps"],
        prepared=True,
        data=data,
    )
    if rank == 0:
        (job_dir / "result.json").write_text(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
