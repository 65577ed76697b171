"""moelora-export: merged Hugging Face directories and adapter exports, from real multi-rank checkpoints."""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from torch import nn

from moelora_ds import MoELoRAConfig, inject_moelora, load_adapter
from moelora_ds.adapters.inject import adapter_parameters
from moelora_ds.adapters.io import AdapterError, save_adapter
from moelora_ds.adapters.layer import MoELoRALinear
from moelora_ds.adapters.merge import fold, merge
from moelora_ds.cli import export_main
from moelora_ds.export.exporter import REMOTE_CODE, export_merged
from moelora_ds.export.safetensors_stream import INDEX_FILE, ShardedSafetensorsWriter, iter_safetensors, parse_size

from conftest import REPO, build_tiny_model, tiny_model_config
from harness import deepspeed_command, load_in_plain_transformers

ROUTED = {"num_experts": 4, "rank": 4, "alpha": 8.0, "top_k": 2, "dropout": 0.1, "dropout_per_expert": True}
SINGLE = {"num_experts": 1, "rank": 4, "alpha": 8.0, "top_k": None, "dropout": 0.1}
BATCH = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))

# ---------------------------------------------------------------- helpers


def randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-zero B and random routers, so that every expert contributes."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            if name.endswith(".lora_B"):
                param.normal_(0.0, 0.2)
    return model.eval()


def injected(model_dir: Path, adapter: dict) -> nn.Module:
    from transformers import AutoModelForCausalLM

    return randomized(inject_moelora(AutoModelForCausalLM.from_pretrained(model_dir), MoELoRAConfig(**adapter)))


def logits_of(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(BATCH).logits


def adapters_of(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: param.detach().clone() for name, param in adapter_parameters(model).items()}


def load_isolated(model_dir: Path, tmp_path: Path, remote: bool) -> dict:
    """Load `model_dir` where moelora_ds cannot be imported: logits on BATCH and a generation."""
    return load_in_plain_transformers(model_dir, BATCH, tmp_path / "plain", remote)


def save_base(model: nn.Module, path: Path, tokenizer, dtype: torch.dtype = torch.float32) -> Path:
    model.to(dtype).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


# ---------------------------------------------------------------- streaming writer, merge, remote code


def test_parse_size():
    assert parse_size("2GB") == 2 * 10**9 and parse_size("64MiB") == 64 * 2**20 and parse_size("1.5kb") == 1500
    assert parse_size("1000") == 1000 and parse_size(7) == 7
    for bad in ("", "2 GBs", "-1MB", "0"):
        with pytest.raises(ValueError):
            parse_size(bad)


def test_sharded_writer_fills_shards_in_order_and_indexes_them(tmp_path):
    tensors = {f"t{i}": torch.randn(10 * (i + 1), dtype=dtype)
               for i, dtype in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 3)}
    tensors.update(scalar=torch.tensor(3.5), mask=torch.tensor([True, False, True]), ids=torch.arange(5),
                   empty=torch.empty(0, 4))
    tensors["huge"] = torch.randn(400)  # 1600 bytes: larger than a shard, gets one of its own
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=600)
    for name, tensor in tensors.items():
        writer.add(name, tensor)
    with pytest.raises(ValueError, match="twice"):
        writer.add("t0", tensors["t0"])
    shards = writer.close()
    index = json.loads((tmp_path / INDEX_FILE).read_text())
    assert [p.name for p in shards] == sorted(set(index["weight_map"].values()))
    assert shards[0].name == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for shard in shards:
        with safe_open(str(shard), "pt") as handle:
            size = sum(handle.get_tensor(k).numel() * handle.get_tensor(k).element_size() for k in handle.keys())
            assert size <= 600 or list(handle.keys()) == ["huge"]
            assert handle.metadata() == {"format": "pt"}
    read = dict(iter_safetensors(tmp_path))
    assert read.keys() == tensors.keys()
    assert all(torch.equal(read[name], tensor) and read[name].dtype == tensor.dtype for name, tensor in tensors.items())


def test_streaming_reader_agrees_with_safetensors(tiny_model_dir, tmp_path):
    with safe_open(str(tiny_model_dir / "model.safetensors"), "pt") as handle:
        expected = {name: handle.get_tensor(name) for name in handle.keys()}
    read = dict(iter_safetensors(tiny_model_dir))
    assert read.keys() == expected.keys() and all(torch.equal(read[k], v) for k, v in expected.items())
    truncated = tmp_path / "model.safetensors"
    truncated.write_bytes((tiny_model_dir / "model.safetensors").read_bytes()[:-100])
    with pytest.raises(ValueError, match="is truncated or inconsistent with its header"):
        dict(iter_safetensors(tmp_path))


def test_single_shard_has_no_index(tmp_path):
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=10**9)
    writer.add("a", torch.ones(3))
    assert [p.name for p in writer.close()] == ["model.safetensors"]
    assert not (tmp_path / INDEX_FILE).exists()


def test_fold_reproduces_a_single_expert_layer_exactly():
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(12, 10, dtype=torch.float64), MoELoRAConfig(num_experts=1, rank=3, dropout=0.2))
    with torch.no_grad():
        layer.lora_B.normal_()
    x = torch.randn(5, 12, dtype=torch.float64)
    folded = fold(layer.weight, layer.lora_A, layer.lora_B, layer.scaling)
    torch.testing.assert_close(nn.functional.linear(x, folded, layer.bias), layer.eval()(x), rtol=0, atol=1e-12)


def test_merge_folds_single_experts_and_attaches_routed_ones():
    torch.manual_seed(0)
    base = {"a.weight": torch.randn(6, 4), "a.bias": torch.randn(6), "b.weight": torch.randn(5, 4),
            "norm.weight": torch.ones(4)}
    single = {"a.lora_A": torch.randn(1, 2, 4), "a.lora_B": torch.randn(1, 6, 2), "a.router.weight": torch.randn(1, 4)}
    routed = {"b.lora_A": torch.randn(3, 2, 4), "b.lora_B": torch.randn(3, 5, 2), "b.router.weight": torch.randn(3, 4)}
    before = {k: v.clone() for k, v in {**base, **single, **routed}.items()}
    merged = merge(base, {**single, **routed}, scaling=2.0)
    assert list(merged) == ["a.weight", "a.bias", "b.weight", "b.lora_A", "b.lora_B", "b.router.weight",
                            "norm.weight"]
    folded = base["a.weight"] + 2.0 * single["a.lora_B"][0] @ single["a.lora_A"][0]
    torch.testing.assert_close(merged["a.weight"], folded)
    assert merged["b.weight"] is base["b.weight"] and merged["b.lora_A"] is routed["b.lora_A"]
    assert all(torch.equal(v, before[k]) for k, v in {**base, **single, **routed}.items())
    with pytest.raises(ValueError, match="without a base weight: c"):
        merge(base, {k.replace("b.", "c."): v for k, v in routed.items()}, 2.0)
    with pytest.raises(ValueError, match=r"incomplete adapter layers: b \(has \['lora_A', 'lora_B'\]\)"):
        merge(base, {k: v for k, v in routed.items() if "router" not in k}, 2.0)
    with pytest.raises(ValueError, match="do not fit the base weight"):
        merge(base, {k.replace("b.", "a."): v for k, v in routed.items()}, 2.0)


@pytest.mark.parametrize("top_k, bias, dtype", [(2, True, torch.float32), (None, False, torch.float32),
                                                (3, True, torch.bfloat16)])
def test_remote_code_layer_matches_training_layer(top_k, bias, dtype):
    spec = importlib.util.spec_from_file_location("modeling_moelora_under_test", REMOTE_CODE)
    remote = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(remote)
    torch.manual_seed(0)
    config = MoELoRAConfig(num_experts=4, rank=3, alpha=6.0, top_k=top_k, dropout=0.3)
    layer = MoELoRALinear(nn.Linear(16, 8, bias=bias, dtype=dtype), config)
    with torch.no_grad():
        layer.lora_B.normal_()
    inference = remote.MoELoRALinear(nn.Linear(16, 8, bias=bias, dtype=dtype), 4, 3, 6.0, top_k)
    inference.load_state_dict(layer.state_dict())
    x = torch.randn(2, 5, 16, dtype=dtype)
    with torch.no_grad():
        torch.testing.assert_close(inference(x), layer.eval()(x), rtol=0, atol=1e-6 if dtype == torch.float32 else 4e-2)


# ---------------------------------------------------------------- merged and adapter exports without training


@pytest.mark.parametrize("tied", [False, True])
def test_merged_export_with_routed_experts_loads_with_remote_code(tmp_path, tiny_tokenizer, tied):
    config = tiny_model_config("llama")
    config.tie_word_embeddings = tied
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    base_dir = save_base(AutoModelForCausalLM.from_config(config), tmp_path / "base", tiny_tokenizer)
    model = injected(base_dir, {**ROUTED, "target_modules": "all-linear"})
    out = export_merged(base_dir, adapters_of(model), model.moelora_config, tmp_path / "merged", max_shard_bytes=20_000)
    saved = json.loads((out / "config.json").read_text())
    assert saved["auto_map"]["AutoModelForCausalLM"] == "modeling_moelora.MoELoRAForCausalLM"
    assert saved["base_config"]["model_type"] == "llama" and len(saved["moelora"]["modules"]) == 14
    assert (out / "modeling_moelora.py").is_file() and (out / "tokenizer.json").is_file()
    assert len(json.loads((out / INDEX_FILE).read_text())["weight_map"]) > 0
    loaded, info = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, output_loading_info=True)
    assert not any(info.values()), info
    torch.testing.assert_close(logits_of(loaded), logits_of(model), rtol=0, atol=1e-5)
    if tied:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight


def test_merged_export_keeps_base_dtype_and_plain_architecture_when_all_fold(tmp_path, tiny_tokenizer):
    base_dir = save_base(build_tiny_model("llama"), tmp_path / "base", tiny_tokenizer, dtype=torch.bfloat16)
    for name, adapter in (("routed", ROUTED), ("single", SINGLE)):
        model = injected(base_dir, adapter)  # bf16, like its base; checkpoints hold fp32 adapters
        adapters = {key: value.float() for key, value in adapters_of(model).items()}
        export_merged(base_dir, adapters, model.moelora_config, tmp_path / name, max_shard_bytes=10**9)
        dtypes = {name: tensor.dtype for name, tensor in iter_safetensors(tmp_path / name)}
        adapter_names = {n for n in dtypes if ".lora_" in n or ".router." in n}
        assert {dtypes[n] for n in dtypes.keys() - adapter_names} == {torch.bfloat16}
        assert {dtypes[n] for n in adapter_names} == ({torch.float32} if name == "routed" else set())
    plain = json.loads((tmp_path / "single" / "config.json").read_text())
    assert plain == json.loads((base_dir / "config.json").read_text())
    assert not list((tmp_path / "single").glob("*.py"))


def test_adapter_save_and_load(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    model = injected(tiny_model_dir, ROUTED)
    save_adapter(tmp_path, adapters_of(model), model.moelora_config, {"model_type": "llama"})
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    assert torch.equal(logits_of(reloaded), logits_of(model))
    assert reloaded.moelora_config.dropout_per_expert
    assert load_adapter(reloaded, tmp_path) is reloaded  # already injected: weights loaded again

    other_rank = inject_moelora(AutoModelForCausalLM.from_pretrained(tiny_model_dir), MoELoRAConfig(rank=2))
    with pytest.raises(AdapterError, match="rank"):
        load_adapter(other_rank, tmp_path)
    wider_config = tiny_model_config("llama")
    wider_config.hidden_size = 64
    wider = AutoModelForCausalLM.from_config(wider_config)
    with pytest.raises(AdapterError, match=r"wrong shapes: model\.layers\.0\.self_attn\.q_proj\.lora_A has shape"):
        load_adapter(wider, tmp_path)
    with pytest.raises(AdapterError, match="not a moelora-ds adapter directory"):
        load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tiny_model_dir)


def test_cli_rejects_a_non_empty_out_and_a_bad_shard_size(tmp_path, capsys):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    assert "already exists and is not an empty directory" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "new"), "--max-shard-size", "2XB"]) == 2
    assert "--max-shard-size: not a size: '2XB'" in capsys.readouterr().err
    assert export_main(["--checkpoint", str(tmp_path), "--out", str(tmp_path / "new")]) == 2
    assert "no checkpoints/ directory" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()


# ---------------------------------------------------------------- real checkpoints from the trainer

STEPS = 5
TAG = f"step_{STEPS}"


def train(root: Path, model_dir: Path, data: dict, env: dict, *, adapter: dict, stage: int, world_size: int) -> Path:
    """`deepspeed --num_gpus N launcher/train.py` for STEPS steps of a tiny fp32 run; returns its output_dir."""
    root.mkdir(parents=True, exist_ok=True)
    config = {"model": {"name_or_path": str(model_dir), "gguf_file": None, "dtype": "float32"},
              "moelora": adapter,
              "optimizer": {"name": "riemannian_adamw", "lr": 1e-2, "reg": 1e-3},
              "data": {"train_path": str(data["train"]), "eval_path": None, "max_length": 64},
              "train": {"max_steps": STEPS, "micro_batch_size": 2, "seed": 7, "output_dir": str(root / "run")},
              "deepspeed": f"ds_configs/zero{stage}.json"}
    (root / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(deepspeed_command(world_size, str(REPO / "launcher" / "train.py"), "--config",
                                              str(root / "config.yaml")),
                            cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"training failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return root / "run"


@pytest.fixture(scope="module")
def run_factory(tmp_path_factory, tiny_model_dir, tiny_mc_data, subprocess_env):
    def start(name: str, **kwargs) -> Path:
        return train(tmp_path_factory.mktemp(name), tiny_model_dir, tiny_mc_data, subprocess_env, **kwargs)
    return start


@pytest.fixture(scope="module")
def zero3_run(run_factory) -> Path:
    return run_factory("zero3", adapter={**ROUTED, "target_modules": "all-linear"}, stage=3, world_size=2)


@pytest.fixture(scope="module")
def single_expert_run(run_factory) -> Path:
    return run_factory("single-expert", adapter=SINGLE, stage=1, world_size=2)


@pytest.fixture(scope="module")
def zero2_run(run_factory) -> Path:
    return run_factory("zero2", adapter=ROUTED, stage=2, world_size=2)


@pytest.fixture(scope="module")
def one_rank_stage0_run(run_factory) -> Path:
    return run_factory("one-rank", adapter=ROUTED, stage=0, world_size=1)


def checkpoint_dir(output_dir: Path) -> Path:
    root = output_dir / "checkpoints"
    return root / (root / "latest").read_text().strip()


def trained_model(model_dir: Path, output_dir: Path) -> nn.Module:
    """The trained model, rebuilt independently of the exporter: base + injected layers + the checkpoint's adapters."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from transformers import AutoModelForCausalLM

    path = checkpoint_dir(output_dir)
    info = json.loads((path / "moelora_run.json").read_text())
    if info["zero_stage"] == 0:
        state = torch.load(path / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        state = get_fp32_state_dict_from_zero_checkpoint(str(path.parent), tag=path.name,
                                                         exclude_frozen_parameters=True)
    model = inject_moelora(AutoModelForCausalLM.from_pretrained(model_dir), MoELoRAConfig(**info["config"]["moelora"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and not set(missing) & set(adapter_parameters(model))
    return model.eval()


def base_logits(model_dir: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    return logits_of(AutoModelForCausalLM.from_pretrained(model_dir))


@pytest.mark.distributed
def test_zero3_two_rank_merged_export_loads_in_plain_transformers(zero3_run, tiny_model_dir, subprocess_env, tmp_path):
    out = tmp_path / "merged"
    result = subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--checkpoint", str(zero3_run),
                             "--out", str(out), "--max-shard-size", "40KB"],
                            env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(set(json.loads((out / INDEX_FILE).read_text())["weight_map"].values())) > 2
    reference = logits_of(trained_model(tiny_model_dir, zero3_run))
    assert (reference - base_logits(tiny_model_dir)).abs().max() > 1e-3  # training moved the model
    loaded = load_isolated(out, tmp_path, remote=True)
    torch.testing.assert_close(loaded["logits"], reference, rtol=0, atol=1e-4)
    assert loaded["class"] == "MoELoRALlamaForCausalLM" and loaded["generated"] == 4


@pytest.mark.distributed
def test_zero3_two_rank_adapter_export_reloads_with_load_adapter(zero3_run, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    assert export_main(["--checkpoint", str(zero3_run), "--out", str(tmp_path / "adapter"), "--mode", "adapter"]) == 0
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json",
                                                                       "adapter_model.safetensors"]
    info = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert info["num_experts"] == 4 and info["base_model"]["model_dir"] == str(tiny_model_dir)
    model = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(model), logits_of(trained_model(tiny_model_dir, zero3_run)), rtol=0, atol=1e-6)


@pytest.mark.distributed
def test_single_expert_run_exports_the_plain_architecture(single_expert_run, tiny_model_dir, tmp_path):
    out = tmp_path / "merged"
    assert export_main(["--checkpoint", str(single_expert_run), "--tag", TAG, "--out", str(out)]) == 0
    saved = json.loads((out / "config.json").read_text())
    assert "auto_map" not in saved and saved["model_type"] == "llama"
    assert not list(out.glob("*.py")) and not any(".lora_" in name for name, _ in iter_safetensors(out))
    reference = logits_of(trained_model(tiny_model_dir, single_expert_run))
    assert (reference - base_logits(tiny_model_dir)).abs().max() > 1e-3
    loaded = load_isolated(out, tmp_path, remote=False)
    torch.testing.assert_close(loaded["logits"], reference, rtol=0, atol=1e-4)
    assert loaded["class"] == "LlamaForCausalLM" and loaded["generated"] == 4


@pytest.mark.distributed
@pytest.mark.parametrize("run, stage, world_size", [("zero2_run", 2, 2), ("one_rank_stage0_run", 0, 1)])
def test_other_stages_and_world_sizes_export(run, stage, world_size, request, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    output_dir = request.getfixturevalue(run)
    info = json.loads((checkpoint_dir(output_dir) / "moelora_run.json").read_text())
    assert (info["zero_stage"], info["world_size"]) == (stage, world_size)
    reference = logits_of(trained_model(tiny_model_dir, output_dir))
    assert export_main(["--checkpoint", str(output_dir), "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", trust_remote_code=True)
    torch.testing.assert_close(logits_of(merged), reference, rtol=0, atol=1e-4)
    tag_dir = checkpoint_dir(output_dir)  # a checkpoint tag directory is accepted as --checkpoint too
    assert export_main(["--checkpoint", str(tag_dir), "--out", str(tmp_path / "adapter"), "--mode", "adapter"]) == 0
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path / "adapter")
    torch.testing.assert_close(logits_of(reloaded), reference, rtol=0, atol=1e-6)


def _drop_latest(run: Path) -> tuple[list[str], str]:
    (run / "checkpoints" / "latest").unlink()
    return [], rf"checkpoints/latest is missing.*complete tags: {TAG}"


def _unknown_tag(run: Path) -> tuple[list[str], str]:
    return ["--tag", "step_99"], rf"checkpoint 'step_99' not found: .*step_99 does not exist; complete tags: {TAG}"


def _drop_run_file(run: Path) -> tuple[list[str], str]:
    (checkpoint_dir(run) / "moelora_run.json").unlink()
    return [], rf"latest names checkpoint '{TAG}' and .*{TAG}/moelora_run\.json is missing \(incomplete or moved\)"


def _truncate_rank_file(run: Path) -> tuple[list[str], str]:
    path = checkpoint_dir(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return [], rf"{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt is truncated or corrupt"


def _drop_rank_file(run: Path) -> tuple[list[str], str]:
    (checkpoint_dir(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt").unlink()
    return [], r"cannot read the DeepSpeed checkpoint files .*Expected 2 of '\*_optim_states.pt'"


class _RunsACommand:
    """Pickles as a call of os.system: what a malicious checkpoint file would carry."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _pickle_a_callable(run: Path) -> tuple[list[str], str]:
    path = checkpoint_dir(run) / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    state = torch.load(path, weights_only=False)
    state["payload"] = _RunsACommand(run / "code-was-run")
    torch.save(state, path)
    return [], rf"{TAG}/zero_pp_rank_1_mp_rank_00_optim_states.pt: refused: .*GLOBAL posix.system"


@pytest.mark.distributed
@pytest.mark.parametrize("damage", [_drop_latest, _unknown_tag, _drop_run_file, _truncate_rank_file, _drop_rank_file,
                                    _pickle_a_callable])
def test_missing_or_corrupt_zero3_checkpoint_is_a_clear_error(damage, zero3_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(zero3_run / "checkpoints", run / "checkpoints")
    extra, message = damage(run)
    assert export_main(["--checkpoint", str(run), "--out", str(tmp_path / "out"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moelora-export: error: ") and re.search(message, err), err
    assert not (tmp_path / "out").exists()
    assert not (run / "code-was-run").exists()


@pytest.mark.distributed
def test_missing_adapter_tensors_are_named_and_the_cli_exits_2_without_traceback(one_rank_stage0_run, tmp_path,
                                                                                 subprocess_env):
    run = tmp_path / "run"
    shutil.copytree(one_rank_stage0_run / "checkpoints", run / "checkpoints")
    path = checkpoint_dir(run) / "mp_rank_00_model_states.pt"
    state = torch.load(path, weights_only=False)
    del state["module"]["model.layers.1.self_attn.v_proj.lora_B"]
    torch.save(state, path)
    result = subprocess.run([sys.executable, str(REPO / "launcher" / "export.py"), "--checkpoint", str(run),
                             "--out", str(tmp_path / "out")], env=subprocess_env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "adapter tensors missing for 1 layer(s): model.layers.1.self_attn.v_proj (lora_B)" in result.stderr
