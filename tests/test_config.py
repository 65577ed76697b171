"""Configuration loading: files, overrides, validation messages, DeepSpeed config filling, README sync."""

from __future__ import annotations

import json

import pytest

from moelora_ds.config import ConfigError, advisories, load_config, parse_overrides
from moelora_ds.training.deepspeed_config import build_deepspeed_config

from conftest import REPO


def write(tmp_path, text: str, name: str = "run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_file_and_overrides_merge(tmp_path):
    path = write(tmp_path, "moelora:\n  num_experts: 8\n  top_k: 2\noptimizer:\n  lr: 0.001\n")
    config = load_config(path, ["--optimizer.lr=3e-4", "--optimizer.betas=[0.8,0.9]", "--data.eval_path=null"])
    assert config.moelora.num_experts == 8 and config.moelora.top_k == 2
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.optimizer.betas == (0.8, 0.9)
    assert config.data.eval_path is None


def test_unknown_key_suggests_the_close_one(tmp_path):
    path = write(tmp_path, "train:\n  micro_batch_sise: 4\n")
    message = r"run\.yaml: unknown key 'train\.micro_batch_sise' \(did you mean 'micro_batch_size'\?\)"
    with pytest.raises(ConfigError, match=message):
        load_config(path)


def test_wrong_type_names_file_and_key(tmp_path):
    path = write(tmp_path, "train:\n  grad_accum: two\n")
    with pytest.raises(ConfigError, match=r"run\.yaml: train\.grad_accum: expected an integer, got 'two'"):
        load_config(path)


@pytest.mark.parametrize("override, message", [
    ("--moelora.top_k=5", r"moelora\.top_k: expected at most num_experts=4"),
    ("--moelora.rank=0", r"moelora\.rank: expected a positive integer"),
    ("--moelora.gate_rescale=cube", r"moelora\.gate_rescale: expected one of"),
    ("--train.epochs=2", r"set exactly one of max_steps and epochs"),
    ("--optimizer.reg=0", r"optimizer\.reg: expected a positive value"),
    ("--optimizer.router_clip=-1", r"optimizer\.router_clip: expected 0 \(off\) or a positive norm"),
    ("--optimizer.bias_correction=maybe", r"optimizer\.bias_correction: expected true or false"),
    ("--moelora.dropout_per_expert=1", r"moelora\.dropout_per_expert: expected true or false"),
    ("--health.dead_share=1", r"health\.dead_share: expected a value in \[0, 1\)"),
    ("--health.max_share=0", r"health\.max_share: expected a value in \(0, 1\]"),
    ("--health.patience=0", r"health\.patience: expected a positive number of intervals"),
])
def test_invalid_values_are_rejected(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_paper_preset_is_the_papers_recipe():
    """launcher/configs/paper.yaml: THUDM/MoELoRA_Riemannian's train_llama.py settings (docs/METHOD.md section 4)."""
    from moelora_ds.adapters.adamw import AdamWNoBiasCorrection
    from moelora_ds.training.optimizers import optimizer_class

    config = load_config(REPO / "launcher" / "configs" / "paper.yaml")
    m, opt, sched = config.moelora, config.optimizer, config.scheduler
    assert (m.num_experts, m.rank, m.alpha, m.top_k, m.dropout, m.dropout_per_expert, m.gate_rescale) == \
        (20, 4, 16.0, 10, 0.05, True, "sqrt")
    assert m.target_modules == ["q_proj", "k_proj", "v_proj", "o_proj"]
    assert (opt.name, opt.lr, opt.reg, opt.bias_correction, opt.betas, opt.eps, opt.weight_decay) == \
        ("riemannian_adamw", 1e-5, 1e-6, False, (0.9, 0.999), 1e-6, 0.0)
    assert (opt.router_lr, opt.router_clip, config.train.grad_clip) == (3e-8, 1.0, 0.0)
    assert (sched.name, sched.warmup_steps, sched.min_lr_ratio, config.train.max_steps) == ("linear", 0, 0.1, 2000)
    assert config.train.micro_batch_size * config.train.grad_accum == 80
    assert optimizer_class(opt.name, offload=False, bias_correction=opt.bias_correction)[0] is AdamWNoBiasCorrection
    assert optimizer_class(opt.name, offload=True, bias_correction=opt.bias_correction)[1]["bias_correction"] is False
    assert advisories(config) == []


def test_malformed_override_is_an_error():
    with pytest.raises(ConfigError, match="expected --section.key=value"):
        parse_overrides(["--train.max_steps"])


def test_riemannian_sgd_with_clipping_is_advised_against():
    clipped = load_config(None, ["--optimizer.name=riemannian_sgd", "--train.grad_clip=1.0"])
    assert [note for note in advisories(clipped) if "train.grad_clip=1 with optimizer.name=riemannian_sgd" in note]
    assert advisories(load_config(None, ["--optimizer.name=riemannian_sgd", "--train.grad_clip=0"])) == []
    assert advisories(load_config(None, ["--optimizer.name=riemannian_adamw", "--train.grad_clip=1.0"])) == []


def test_deepspeed_values_are_filled_from_the_training_config():
    config = load_config(None, ["--train.micro_batch_size=3", "--train.grad_accum=2", "--model.dtype=float32"])
    ds = build_deepspeed_config(config, world_size=4)
    assert ds["train_micro_batch_size_per_gpu"] == 3 and ds["gradient_accumulation_steps"] == 2
    assert ds["train_batch_size"] == 24
    assert ds["bf16"]["enabled"] is False and ds["zero_optimization"]["stage"] == 3


def test_contradicting_deepspeed_config_names_both_sides(tmp_path):
    ds_file = write(tmp_path, json.dumps({"train_micro_batch_size_per_gpu": 16, "zero_optimization": {"stage": 2}}),
                    "ds.json")
    config = load_config(None, [f"--deepspeed={ds_file}", "--train.micro_batch_size=4"])
    message = r"ds\.json: 'train_micro_batch_size_per_gpu' is 16 but .*train\.micro_batch_size"
    with pytest.raises(ConfigError, match=message):
        build_deepspeed_config(config)


def test_shipped_deepspeed_configs_are_valid():
    for path in sorted((REPO / "ds_configs").glob("*.json")):
        config = load_config(None, [f"--deepspeed={path}"])
        assert build_deepspeed_config(config, world_size=2)["train_batch_size"] == 16, path


def test_readme_configuration_reference_is_current():
    import sys

    sys.path.insert(0, str(REPO / "scripts"))
    from config_docs import render

    text = (REPO / "README.md").read_text()
    assert render(text) == text, "README config table is stale: run python scripts/config_docs.py --write"
