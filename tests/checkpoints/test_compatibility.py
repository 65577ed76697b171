"""Resume compatibility: the configuration stored with a checkpoint against the new one, each class of change; and
the new optimizer hyperparameters and learning rates really taking effect after a checkpoint is loaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from moelora_ds.checkpoints.compatibility import check_resume_allow, check_resume_compatible, data_fingerprint
from moelora_ds.config import ConfigError, config_to_dict, load_config
from moelora_ds.telemetry.metrics import read_metrics
from moelora_ds.training.optimizers import configured_hyperparameters, reapply_hyperparameters
from moelora_ds.training.schedule import lr_multiplier

from harness import launch, load_config_from_dict, run_config

WORLD_SIZE = 2


@pytest.fixture
def saved(tmp_path) -> tuple[dict, Path]:
    """The run info a 2-rank run of the default configuration on a small data file stores, and that file."""
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "hello"}\n')
    config = load_config(None, [f"--data.train_path={data}"])
    info = {"world_size": WORLD_SIZE, "config": config_to_dict(config), "data_fingerprint": data_fingerprint(str(data))}
    return info, data


def resume_with(saved, *overrides: str, world_size: int = WORLD_SIZE) -> list[str]:
    info, data = saved
    config = load_config(None, [f"--data.train_path={data}", *overrides])
    return check_resume_compatible(config, info, world_size, data_fingerprint(config.data.train_path), Path("ckpt"))


@pytest.mark.parametrize("overrides,keys", [
    (["--model.dtype=bfloat16"], ["model.dtype"]),
    (["--moelora.rank=4", "--moelora.num_experts=2"], ["moelora.num_experts", "moelora.rank"]),
    (["--data.max_length=128"], ["data.max_length"]),
    (["--data.train_on_eos=false"], ["data.train_on_eos"]),
    (["--optimizer.name=adamw"], ["optimizer.name"]),
    (["--train.seed=1"], ["train.seed"]),
    (["--train.loss_normalization=sequences"], ["train.loss_normalization"]),
    (["--train.grad_accum=2"], ["train.grad_accum"]),
], ids=["model", "adapters", "tokenization", "labels", "optimizer-kind", "seed", "normalization", "global-batch"])
def test_another_experiment_is_refused_naming_every_key_and_the_ways_out(saved, overrides, keys):
    with pytest.raises(ConfigError) as caught:
        resume_with(saved, *overrides)
    message = str(caught.value)
    assert all(f"{key}: " in message for key in keys), message
    assert "--train.resume=never" in message and "train.output_dir" in message
    assert f"--train.resume_allow={','.join(keys)}" in message
    resume_with(saved, *overrides, f"--train.resume_allow={','.join(keys)}")  # the way out, taken


def test_changed_data_file_is_refused_and_allowed_by_its_key(saved):
    info, data = saved
    data.write_text('{"text": "hello"}\n{"text": "another record"}\n')
    with pytest.raises(ConfigError, match=r"data\.train_path: .*another size or modification time.*"
                                          r"--train\.resume_allow=data\.train_path"):
        resume_with(saved)
    os.utime(data, ns=(0, 0))
    assert resume_with(saved, "--train.resume_allow=data") == [
        f"data.train_path: '{data} (as saved)' -> 'the same path, with files of another size or modification time'"]


def test_same_global_batch_on_other_ranks_and_harmless_changes_are_allowed_and_listed(saved):
    changes = resume_with(saved, "--train.max_steps=400", "--train.eval_every=50", "--train.log_every=10",
                          "--train.save_every=100", "--train.save_every_minutes=5", "--optimizer.lr=0.001",
                          "--train.grad_accum=2", "--train.output_dir=elsewhere", world_size=1)
    assert changes == ["optimizer.lr: 0.002 -> 0.001", "train.eval_every: 0 -> 50", "train.grad_accum: 1 -> 2",
                       "train.log_every: 1 -> 10", "train.max_steps: 200 -> 400", "train.save_every: 500 -> 100",
                       "train.save_every_minutes: 60.0 -> 5.0"]
    assert resume_with(saved) == []


def test_keys_newer_than_the_checkpoint_are_listed_not_refused(saved):
    info, _ = saved
    del info["config"]["train"]["loss_normalization"]
    assert resume_with(saved) == ["train.loss_normalization: '<unset>' -> 'tokens'"]


def test_resume_allow_must_name_configuration_keys():
    check_resume_allow(load_config(None, ["--train.resume_allow=data.train_path,moelora"]))
    with pytest.raises(ConfigError, match=r"train\.resume_allow: \['data\.trian_path'\] are not configuration keys"):
        check_resume_allow(load_config(None, ["--train.resume_allow=data.trian_path"]))


@pytest.mark.parametrize("optimizer_class", [torch.optim.AdamW, torch.optim.SGD])
def test_new_learning_rate_and_hyperparameters_take_effect_after_a_load(optimizer_class):
    """A checkpoint of 3 steps at lr 0.1 (weight decay 0.01) is loaded by a run configured with lr 0.05 (weight decay
    0.02): from the restored step on, the groups carry the new values and the new peak times the schedule."""
    schedule = lr_multiplier(load_config(None, ["--scheduler.warmup_steps=2"]).scheduler, total_steps=10)

    def build(lr: float, weight_decay: float):
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = optimizer_class([{"params": [param], "lr": lr}], lr=lr, weight_decay=weight_decay)
        return param, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    param, optimizer, scheduler = build(0.1, 0.01)
    for _ in range(3):
        param.grad = torch.ones(3)
        optimizer.step()
        scheduler.step()
    checkpoint = optimizer.state_dict(), scheduler.state_dict()

    _, resumed, resumed_scheduler = build(0.05, 0.02)
    configured = configured_hyperparameters(resumed)
    resumed.load_state_dict(checkpoint[0])
    resumed_scheduler.load_state_dict(checkpoint[1])
    assert resumed.param_groups[0]["lr"] == pytest.approx(0.1 * schedule(3))  # what a plain load would train with
    reapply_hyperparameters(resumed_scheduler, configured)
    group = resumed.param_groups[0]
    assert (group["lr"], group["weight_decay"]) == (0.05 * schedule(3), 0.02)
    assert resumed_scheduler.get_last_lr() == [0.05 * schedule(3)]
    resumed_scheduler.step()
    assert group["lr"] == pytest.approx(0.05 * schedule(4))

    _, same, same_scheduler = build(0.1, 0.01)  # nothing changed: exactly what was loaded
    configured = configured_hyperparameters(same)
    same.load_state_dict(checkpoint[0])
    same_scheduler.load_state_dict(checkpoint[1])
    loaded = dict(same.param_groups[0])
    reapply_hyperparameters(same_scheduler, configured)
    assert same.param_groups[0] == loaded


@pytest.mark.distributed
def test_resuming_refuses_another_experiment_and_applies_a_new_learning_rate(tiny_model_dir, tiny_mc_data, tmp_path,
                                                                             subprocess_env):
    """On 2 real ranks: a run stopped at step 3 is not resumed with another data.max_length (exit 2, the key and the
    ways out named, nothing trained); resumed with another optimizer.lr and max_steps, it says so and trains at the
    new learning rate of the new schedule from step 4 on."""
    out = tmp_path / "out"
    config = run_config(tiny_model_dir, tiny_mc_data, out, train={"max_steps": 6, "stop_at": 3, "resume": "auto"},
                        optimizer={"name": "riemannian_adamw", "lr": 1e-2})
    launch(config, tmp_path, subprocess_env)
    refused = launch({**config, "data": {**config["data"], "max_length": 48}}, tmp_path, subprocess_env, check=False)
    assert refused.returncode == 2, refused.stderr[-3000:]
    assert "data.max_length: 64 -> 48" in refused.stderr and "--train.resume_allow=data.max_length" in refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr

    changed = {**config, "optimizer": {**config["optimizer"], "lr": 5e-3},
               "train": {**config["train"], "stop_at": None, "max_steps": 8}}
    result = launch(changed, tmp_path, subprocess_env)
    assert "optimizer.lr: 0.01 -> 0.005" in result.stdout and "train.max_steps: 6 -> 8" in result.stdout
    schedule = lr_multiplier(load_config_from_dict(changed).scheduler, total_steps=8)
    logged = {r["step"]: r["lr"] for r in read_metrics(out) if "loss" in r}
    assert sorted(logged) == list(range(1, 9))
    for step in range(4, 9):
        assert logged[step] == pytest.approx(5e-3 * schedule(step - 1), rel=1e-12), step
