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


class CausalLM(mlflow.pyfunc.PythonModel):  # type: ignore[name-defined]  # mlflow.pyfunc exports it untyped
    def load_context(self, context) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        path = context.artifacts["checkpoint"]
        if path.endswith("checkpoint_reference.json"):
            path = _referenced_checkpoint(path)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.tokenizer.padding_side = "left"  # decoder-only: every row ends at the same column
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = AutoModelForCausalLM.from_pretrained(path).to(device).eval()  # type: ignore[arg-type]  # see loading.py

    def predict(self, context, model_input: list[str], params: dict | None = None) -> list[str]:
        import torch

        params = params or {}
        max_new_tokens, batch_size = int(params.get("max_new_tokens", 128)), int(params.get("batch_size", 16))
        tok = self.tokenizer
        texts = [
            tok.apply_chat_template([{"role": "user", "content": str(p)}], tokenize=False, add_generation_prompt=True)
            if tok.chat_template
            else str(p)
            for p in model_input
        ]
        out: list[str] = []
        for start in range(0, len(texts), batch_size):
            enc = tok(
                texts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.model.device)
            with torch.inference_mode():
                seqs = self.model.generate(
                    **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id
                )
            out += [t.strip() for t in tok.batch_decode(seqs[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)]
        return out


def _referenced_checkpoint(pointer: str) -> str:
    """registry.weights: reference. The weights stay where the round wrote them, once; that
    directory can be retrained or edited in place, so its weights must still hash to what was
    registered."""
    import json
    import os

    with open(pointer) as f:
        ref = json.load(f)
    path = ref["checkpoint"]
    if not os.path.isdir(path):
        raise FileNotFoundError(
            f"this registered model references the checkpoint {path}, which is not "
            "here: load it where the flywheel workspace is mounted (or register with "
            "registry.weights: copy)"
        )
    expected, actual = ref.get("weights_sha256"), weights_hash(path)
    if expected and actual != expected:
        raise ValueError(
            f"{_registered_as(pointer)}: the checkpoint {path} now has weights sha256 {actual}, "
            f"not the registered {expected}: it changed after registration; register it again"
        )
    return path


def weights_hash(path: str) -> str | None:
    """sha256 over a checkpoint's weight files (names and bytes, in name order): the same definition
    as flywheel.models.loading.weights_hash, restated because this file imports nothing of flywheel."""
    import hashlib
    import os

    names = sorted(
        n for n in os.listdir(path) if n.endswith((".safetensors", ".bin")) and os.path.isfile(os.path.join(path, n))
    )
    if not names:
        return None
    h = hashlib.sha256()
    for name in names:
        h.update(name.encode() + b"\0")
        with open(os.path.join(path, name), "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


def _registered_as(pointer: str) -> str:
    """How the user named this model: "registered model NAME version N". MLflow notes that beside
    a model loaded as models:/NAME/VERSION; otherwise the registry is asked for the versions of
    the logged model (the pointer was written before any version existed); failing both, the
    MLflow run that logged it."""
    import os

    model_dir = os.path.dirname(os.path.dirname(pointer))
    registered = _yaml(os.path.join(model_dir, "registered_model_meta"))
    if registered.get("model_name"):
        return f"registered model {registered['model_name']} version {registered.get('model_version')}"
    meta = _yaml(os.path.join(model_dir, "MLmodel"))
    named = _versions(meta.get("run_id"), meta.get("model_id")) if mlflow.is_tracking_uri_set() else []
    return ", ".join(named) or f"the model logged by MLflow run {meta.get('run_id')}"


def _yaml(path: str) -> dict:
    import yaml

    try:
        with open(path) as f:
            return yaml.safe_load(f) or {}
    except OSError:
        return {}


def _versions(run_id: str | None, model_id: str | None) -> list[str]:
    try:
        versions = mlflow.MlflowClient().search_model_versions(f"run_id = '{run_id}'")
    except Exception:  # the name only garnishes the error being raised
        return []
    return [f"registered model {v.name} version {v.version}" for v in versions if v.source == f"models:/{model_id}"]


set_model(CausalLM())
