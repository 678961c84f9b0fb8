"""An MLflow pyfunc wrapper for a round's checkpoint: `predict` takes prompts, returns responses.

MLflow's transformers flavor cannot log a local checkpoint with transformers 5 (it looks up
pipeline classes that are now strings), so the checkpoint is logged as an artifact of this
small, dependency-light model instead; `mlflow.pyfunc.load_model(uri).predict([...])` works.
"""

from __future__ import annotations

import mlflow.pyfunc


class CausalLMPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        from flywheel.models import loading

        self.model, self.tokenizer = loading.load(context.artifacts["checkpoint"])

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        from flywheel.models.sampling import generate

        prompts = [str(p) for p in model_input]
        params = params or {}
        gens = generate(self.model, self.tokenizer, prompts, max_new_tokens=int(params.get("max_new_tokens", 128)),
                        batch_size=int(params.get("batch_size", 16)), do_sample=False)
        return [g.response for g in gens]
