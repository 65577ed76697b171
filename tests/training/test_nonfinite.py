"""Non-finite losses and gradients from real faults, on 2 ranks: a step is discarded whole or the run stops.

The faults are real, nothing in the code under test is rigged: a copy of the tiny model whose embedding
row of one token (" Answer", which no other record uses) is NaN, so exactly the micro-batch holding the
one record with that word gets a NaN loss; and a learning rate so large that, from step 2 on, the
gradients overflow while the loss stays finite.
"""

from __future__ import annotations

import math
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from moelora_ds.checkpoints.locate import read_run_info
from moelora_ds.config import SchedulerConfig
from moelora_ds.telemetry.metrics import read_metrics
from moelora_ds.training.schedule import lr_multiplier

from conftest import REPO, multiple_choice_records, write_jsonl
from harness import checkpoint_adapters, deepspeed_command, launch, run_config

pytestmark = pytest.mark.distributed

POISON_WORD = " Answer"
POISONED_STEP = 3
"""With shuffling off, 2 ranks x micro-batch 2 x grad_accum 2: record 21 is in step 3, micro-batch 2, on rank 0."""
POISONED_RECORD = 8 * (POISONED_STEP - 1) + 5


@pytest.fixture(scope="module")
def poisoned(tmp_path_factory, tiny_model_dir, tiny_tokenizer) -> dict:
    """The tiny model with a NaN embedding row for POISON_WORD, and data in which one record uses it."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("poisoned")
    model_dir = root / "model"
    shutil.copytree(tiny_model_dir, model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    (token,) = tiny_tokenizer(POISON_WORD, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = float("nan")
    model.save_pretrained(model_dir)
    records = multiple_choice_records(32, seed=3)
    records[POISONED_RECORD]["messages"][0]["content"] += POISON_WORD
    assert all(POISON_WORD not in r["messages"][0]["content"] for i, r in enumerate(records) if i != POISONED_RECORD)
    return {"model": model_dir, "data": {"train": write_jsonl(root / "train.jsonl", records)}}


def poisoned_config(poisoned: dict, output_dir: Path, ds_config: str, nonfinite: str) -> dict:
    config = run_config(poisoned["model"], poisoned["data"], output_dir, deepspeed=f"ds_configs/{ds_config}.json",
                        moelora={"dropout": 0.1},
                        train={"max_steps": 4, "nonfinite": nonfinite, "save_every": 1, "keep_checkpoints": 0,
                               "output_dir": str(output_dir)})
    config["data"]["shuffle"] = False
    return config


def all_finite(output_dir: Path) -> None:
    """Every published checkpoint's adapters are finite."""
    root = output_dir / "checkpoints"
    for tag in sorted(p.name for p in root.iterdir() if p.name.startswith("step_")):
        (root / "latest").write_text(tag)
        assert all(torch.isfinite(t).all() for t in checkpoint_adapters(output_dir).values()), tag


def adapters_at(output_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    (output_dir / "checkpoints" / "latest").write_text(tag)
    return checkpoint_adapters(output_dir)


@pytest.mark.parametrize("ds_config", ["zero3", "zero0"])
def test_skip_discards_the_whole_step(poisoned, ds_config, tmp_path, subprocess_env):
    """ZeRO-3: DeepSpeed's overflow path discards the step; stage 0 fp32: the trainer drops the gradients."""
    out = tmp_path / "out"
    config = poisoned_config(poisoned, out, ds_config, "skip")
    result = launch(config, tmp_path, subprocess_env)
    records = {r["step"]: r for r in read_metrics(out) if "loss" in r}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[POISONED_STEP]["skipped"] == "non-finite loss" and math.isnan(records[POISONED_STEP]["loss"])
    assert all("skipped" not in records[s] and math.isfinite(records[s]["loss"]) for s in (1, 2, 4))
    assert f"step {POISONED_STEP}: non-finite loss; the update was discarded" in result.stdout + result.stderr
    # Nothing of step 3 was applied: not the healthy micro-batch before the poisoned one, not the other rank's.
    before, skipped, after = (adapters_at(out, f"step_{s}") for s in (2, 3, 4))
    assert all(torch.equal(before[k], skipped[k]) for k in before)
    assert any(not torch.equal(skipped[k], after[k]) for k in before)
    # The skipped step kept its place in the learning-rate schedule.
    schedule = lr_multiplier(SchedulerConfig(**config["scheduler"]), config["train"]["max_steps"])
    assert records[4]["lr"] == pytest.approx(config["optimizer"]["lr"] * schedule(3))
    all_finite(out)
    assert read_run_info(out / "checkpoints" / "step_4")["step"] == 4


def test_stop_names_the_step_on_every_rank(poisoned, tmp_path, subprocess_env):
    out = tmp_path / "out"
    result = launch(poisoned_config(poisoned, out, "zero3", "stop"), tmp_path, subprocess_env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    message = (f"moelora-train: stopped: non-finite loss at step {POISONED_STEP} (micro-batch 2 of 2) on 1 of 2 "
               f"rank(s); nothing of this step was applied")
    assert output.count(message) == 2, output[-3000:]
    assert "Traceback" not in output
    assert (out / "checkpoints" / "latest").read_text() == f"step_{POISONED_STEP - 1}"
    all_finite(out)


def test_nonfinite_gradient_with_finite_loss_stops(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """lr=1e4: step 1 makes the experts huge, and from step 2 the gradients overflow though the loss is finite."""
    out = tmp_path / "out"
    config = run_config(tiny_model_dir, tiny_mc_data, out, optimizer={"lr": 1e4},
                        scheduler={"name": "constant", "warmup_steps": 0},
                        train={"max_steps": 4, "grad_accum": 1, "save_every": 1, "output_dir": str(out)})
    result = launch(config, tmp_path, subprocess_env, check=False)
    output = result.stdout + result.stderr
    assert result.returncode == 3, output[-3000:]
    assert output.count("moelora-train: stopped: non-finite gradient (global norm inf) at step 2; the update was "
                        "discarded") == 2, output[-3000:]
    losses = [r["loss"] for r in read_metrics(out) if "loss" in r]
    assert len(losses) == 1 and math.isfinite(losses[0])
    assert (out / "checkpoints" / "latest").read_text() == "step_1"
    all_finite(out)


SAVE_PROBE = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {repo!r})
from moelora_ds.config import load_config
from moelora_ds.training.trainer import Trainer
from moelora_ds.distributed.process_group import end_rank_process, say
from moelora_ds.training.nonfinite import NonFiniteError
trainer = Trainer(load_config(sys.argv[-1]))
if trainer.rank == 1:  # one rank's share of one adapter goes bad, as a silent overflow would leave it
    param = next(p for n, p in trainer.engine.module.named_parameters() if n.endswith("lora_B"))
    getattr(param, "ds_tensor", param).data.fill_(float("inf"))
try:
    trainer.save()
except NonFiniteError as error:
    say(f"REFUSED rank {{trainer.rank}}: {{error}}")
end_rank_process(0)
"""


def test_a_nonfinite_state_is_never_saved(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    out = tmp_path / "out"
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(run_config(tiny_model_dir, tiny_mc_data, out)))
    (tmp_path / "probe.py").write_text(SAVE_PROBE.format(repo=str(REPO)))
    result = subprocess.run(deepspeed_command(2, str(tmp_path / "probe.py"), str(tmp_path / "config.yaml")),
                            env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    refused = re.findall(r"REFUSED rank \d: [^\n]*", result.stdout)
    assert len(refused) == 2, result.stdout[-3000:]
    assert all("refusing to save checkpoint step_0: the adapters or the optimizer state are not finite on 1 of 2"
               in line for line in refused)
    assert any("lora_B" in line for line in refused)
    assert not (out / "checkpoints").exists() or not any((out / "checkpoints").iterdir())

