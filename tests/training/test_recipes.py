"""The named GPU recipes in launcher/configs/ pass preflight against the real architecture of the model they name
(its config.json alone, built on the meta device: no weights), and say what they claim."""

from __future__ import annotations

import pytest

from moelora_ds.config import load_config
from moelora_ds.training.deepspeed_config import build_deepspeed_config, zero_stage
from moelora_ds.training.preflight import check_target_modules, preflight

from conftest import REPO

LLAMA_31 = {  # the published shapes of Llama-3.1-8B and -70B
    "llama3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32),
    "llama3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64),
}
ADAPTED_PER_LAYER = {"llama3-8b": 7, "llama3-70b": 4}  # all-linear: q k v o gate up down; attention: q k v o


@pytest.mark.parametrize("recipe", sorted(LLAMA_31))
def test_recipe_passes_preflight_on_its_architecture(recipe, tmp_path):
    from transformers import LlamaConfig

    shape = LLAMA_31[recipe]
    LlamaConfig(vocab_size=128256, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0,
                tie_word_embeddings=False, **shape).save_pretrained(tmp_path / "model")
    path = REPO / "launcher" / "configs" / f"{recipe}.yaml"
    config = load_config(path, [f"--model.name_or_path={tmp_path / 'model'}",
                                f"--train.output_dir={tmp_path / 'out'}"])
    preflight(config)
    assert len(check_target_modules(config)) == shape["num_hidden_layers"] * ADAPTED_PER_LAYER[recipe]
    ds = build_deepspeed_config(config, 8)
    assert zero_stage(ds) == 3 and ds["bf16"]["enabled"] and config.model.dtype == "bfloat16"
    assert 2048 <= config.data.max_length <= 4096 and config.data.packing
    assert config.model.gradient_checkpointing and config.train.save_every > 0 and config.train.resume == "auto"
    assert ds["train_batch_size"] == config.train.micro_batch_size * config.train.grad_accum * 8
