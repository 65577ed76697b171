"""Bad configuration and bad data fail fast and clearly: in-process pre-flight checks, and through the launcher.

A configuration mistake must stop every rank before the process group exists and before any rank
loads the model, with one `moelora-train: configuration error: FILE: KEY ...` line per rank, exit
status 2 and no traceback. A data mistake stops every rank right after the tokenizer is loaded, still
before the model, with a `moelora-train: data error:` line naming the file and line.
"""

from __future__ import annotations

import json
import os
import re
import time

import pytest
import yaml

from moelora_ds.cli import train_main
from moelora_ds.config import ConfigError, load_config
from moelora_ds.training.preflight import check_target_modules, preflight

from harness import launch, run_config

DATA_LOADED = "[moelora-ds] "
"""What a rank prints once it has initialised the process group and read the data (only after pre-flight)."""


def write_config(tmp_path, config: dict):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.parametrize("targets, unmatched", [
    (["q_proj", "qkv_proj"], "['qkv_proj']"),
    ("model\\.layers\\.\\d+\\.attn\\.c_attn", "c_attn"),
])
def test_target_modules_matching_nothing_name_file_key_and_candidates(tiny_model_dir, tiny_mc_data, tmp_path,
                                                                      targets, unmatched):
    path = write_config(tmp_path, run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out",
                                             moelora={"target_modules": targets}))
    with pytest.raises(ConfigError) as error:
        check_target_modules(load_config(path))
    message = str(error.value)
    assert message.startswith(f"{path}: moelora.target_modules:") and unmatched in message
    assert "linear module names available: ['down_proj', 'gate_proj', 'k_proj', 'lm_head'" in message


def test_target_modules_are_read_from_the_architecture_alone(tiny_model_dir, tiny_mc_data, tmp_path):
    """No weights are read: a directory holding only config.json is enough."""
    (tmp_path / "arch").mkdir()
    (tmp_path / "arch" / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    path = write_config(tmp_path, run_config(tmp_path / "arch", tiny_mc_data, tmp_path / "out",
                                             moelora={"target_modules": "all-linear"}))
    assert len(check_target_modules(load_config(path))) == 2 * 7


def test_missing_model_directory_is_a_configuration_error(tiny_mc_data, tmp_path):
    path = write_config(tmp_path, run_config(tmp_path / "nowhere", tiny_mc_data, tmp_path / "out"))
    with pytest.raises(ConfigError, match=rf"{path}: model\.name_or_path: .*nowhere.* is not a local directory"):
        preflight(load_config(path))


def test_cli_reports_a_configuration_error_without_a_traceback(tiny_model_dir, tiny_mc_data, tmp_path, capsys):
    path = write_config(tmp_path, run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out",
                                             moelora={"target_modules": ["qkv_proj"]}))
    assert train_main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"moelora-train: configuration error: {path}: moelora.target_modules: ['qkv_proj']")
    assert err.count("\n") == 1


def _ds_contradiction(tmp_path) -> tuple[dict, str]:
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 3}, "gradient_accumulation_steps": 8}))
    return {"deepspeed": str(ds)}, rf"{ds}: 'gradient_accumulation_steps' is 8 but {{file}}: train\.grad_accum"


def _latest_names_a_missing_checkpoint(tmp_path) -> tuple[dict, str]:
    checkpoints = tmp_path / "out" / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "latest").write_text("step_7")
    return {"train": {"resume": "auto"}}, (r"{file}: train\.resume: auto: .*latest names checkpoint 'step_7' "
                                           r"and .*step_7/moelora_run\.json is missing .*complete checkpoints: none")


LAUNCH_CASES = {
    "unknown key": (lambda tmp_path: ({"train": {"max_step": 3}},
                                      r"{file}: unknown key 'train\.max_step' \(did you mean 'max_steps'\?\)")),
    "wrong type": (lambda tmp_path: ({"train": {"micro_batch_size": "two"}},
                                     r"{file}: train\.micro_batch_size: expected an integer, got 'two'")),
    "non-positive rank": (lambda tmp_path: ({"moelora": {"rank": 0}},
                                            r"{file}: moelora\.rank: expected a positive integer, got 0")),
    "top_k above num_experts": (lambda tmp_path: ({"moelora": {"top_k": 5}},
                                                  r"{file}: moelora\.top_k: expected at most num_experts=4")),
    "target_modules matching nothing": (lambda tmp_path: ({"moelora": {"target_modules": ["qkv_proj"]}},
                                                          r"{file}: moelora\.target_modules: \['qkv_proj'\] match "
                                                          r"no nn\.Linear in LlamaForCausalLM")),
    "DeepSpeed config contradiction": _ds_contradiction,
    "resume from a directory that is no checkpoint": (
        lambda tmp_path: ({"train": {"resume": str(tmp_path / "out" / "checkpoints" / "step_9")}},
                          r"{file}: train\.resume: .*step_9 is not a moelora-ds checkpoint directory")),
    "resume auto when latest names a missing checkpoint": _latest_names_a_missing_checkpoint,
}
"""Case -> (config sections to change, message pattern; `{file}` stands for the configuration file)."""


def case_config(case: str, tiny_model_dir, tiny_mc_data, tmp_path) -> tuple[dict, str]:
    sections, message = LAUNCH_CASES[case](tmp_path)
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out")
    for section, values in sections.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    return config, message


SLOW_RANK_DELAY_S = 3
"""Local rank 1 starts this much later than rank 0 (sitecustomize): longer than the deepspeed launcher's 1 s poll,
so a rank 0 that exited without waiting for its peer would get rank 1 killed before it printed its message."""


@pytest.fixture
def slow_rank_env(tmp_path, subprocess_env) -> dict[str, str]:
    site = tmp_path / "slow-rank-site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(f"import os, time\nif os.environ.get('LOCAL_RANK') == '1':\n"
                                           f"    time.sleep({SLOW_RANK_DELAY_S})\n")
    return {**subprocess_env, "PYTHONPATH": os.pathsep.join([str(site), subprocess_env["PYTHONPATH"]])}


@pytest.mark.distributed
@pytest.mark.parametrize("case", ["unknown key", "DeepSpeed config contradiction"])
def test_launcher_exits_fast_with_one_message_per_rank(case, tiny_model_dir, tiny_mc_data, tmp_path,
                                                       slow_rank_env):
    config, message = case_config(case, tiny_model_dir, tiny_mc_data, tmp_path)
    pattern = message.format(file=re.escape(str(tmp_path / "config.yaml")))
    started = time.monotonic()
    result = launch(config, tmp_path, slow_rank_env, check=False, cli=True)
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("moelora-train: configuration error:")]
    assert len(errors) == 2 and all(re.search(pattern, e) for e in errors), output[-3000:]
    assert "Traceback" not in output and DATA_LOADED not in result.stdout
    assert elapsed < 60, f"took {elapsed:.0f} s"


@pytest.mark.parametrize("case", sorted(LAUNCH_CASES))
def test_every_configuration_mistake_is_caught_by_preflight(case, tiny_model_dir, tiny_mc_data, tmp_path):
    """The in-process counterpart of the launcher test, for every case (each raises before any rank exists)."""
    config, message = case_config(case, tiny_model_dir, tiny_mc_data, tmp_path)
    path = write_config(tmp_path, config)
    with pytest.raises(ConfigError, match=message.format(file=re.escape(str(path)))):
        preflight(load_config(path))


@pytest.mark.distributed
def test_launcher_reports_a_malformed_data_line(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    bad = tmp_path / "bad.jsonl"
    lines = tiny_mc_data["train"].read_text().splitlines()
    bad.write_text("\n".join(lines[:6] + ['{"messages": [unquoted]}'] + lines[6:]) + "\n")
    config = run_config(tiny_model_dir, {"train": bad}, tmp_path / "out")
    result = launch(config, tmp_path, subprocess_env, check=False, cli=True)
    output = result.stdout + result.stderr
    assert result.returncode == 2, output[-3000:]
    expected = f"moelora-train: data error: data.train_path: {bad}:7: line 7 is not valid JSON"
    assert sum(line.startswith(expected) for line in result.stderr.splitlines()) == 2, output[-3000:]
    assert "Traceback" not in output
