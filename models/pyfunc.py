"""A round's checkpoint as an MLflow model, logged from code: `predict` takes prompts, returns
greedy responses.

MLflow copies this file into the logged model and runs it at load time ("models from code"), so
loading a registered model unpickles nothing, and the file imports nothing of flywheel: a fresh
environment needs only the pinned torch and transformers the model declares (flywheel is not on
PyPI under that name). MLflow's transformers flavor cannot log a local checkpoint with
transformers 5 (it looks up pipeline classes that are now strings), hence a pyfunc.

    model = mlflow.pyfunc.load_model("models:/flywheel@champion")
    model.predict(["What is 2 + 3?"], params={"max_new_tokens": 32})

With registry.weights: reference (the default) the logged artifact is a pointer to the round's
checkpoint in the workspace, which is loaded from there; with copy, the checkpoint itself.
"""

from __future__ import annotations

import mlflow.pyfunc
from mlflow.models import set_model


class CausalLM(mlflow.pyfunc.PythonModel):
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["checkpoint"]
        if path.endswith("checkpoint_reference.json"):
            # registry.weights: reference. The weights stay where the round wrote them, once.
            import json
            import os

            with open(path) as f:
                path = json.load(f)["checkpoint"]
            if not os.path.isdir(path):
                raise FileNotFoundError(f"this registered model references the checkpoint {path}, which is not "
                                        "here: load it where the flywheel workspace is mounted (or register with "
                                        "registry.weights: copy)")
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # decoder-only: every row ends at the same column
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        import torch

        params = params or {}
        max_new_tokens, batch_size = int(params.get("max_new_tokens", 128)), int(params.get("batch_size", 16))
        tok = self.tokenizer
        texts = [tok.apply_chat_template([{"role": "user", "content": str(p)}], tokenize=False,
                                         add_generation_prompt=True) if tok.chat_template else str(p)
                 for p in model_input]
        out: list[str] = []
        for start in range(0, len(texts), batch_size):
            enc = tok(texts[start:start + batch_size], return_tensors="pt", padding=True,
                      add_special_tokens=False).to(self.model.device)
            with torch.inference_mode():
                seqs = self.model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                           pad_token_id=tok.pad_token_id)
            out += [t.strip() for t in tok.batch_decode(seqs[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)]
        return out


set_model(CausalLM())
