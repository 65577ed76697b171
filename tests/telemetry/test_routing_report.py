"""`moelora-eval --routing-report`: per-layer routing over an eval set, per answer class, for every kind of model."""

from __future__ import annotations

import json
import subprocess

import pytest
import torch
import yaml

from moelora_ds import MoELoRAConfig, inject_moelora, load_adapter
from moelora_ds.adapters.inject import adapter_parameters
from moelora_ds.adapters.io import save_adapter
from moelora_ds.config import DataConfig
from moelora_ds.data.records import load_records, tokenize_as_configured
from moelora_ds.export.exporter import export_merged
from moelora_ds.telemetry.routing_report import ALL, routing_report, routing_stats_of

from conftest import build_tiny_model, write_jsonl

ADAPTER = MoELoRAConfig(num_experts=4, rank=2, alpha=4.0, top_k=2, dropout=0.0, router_noise=0.0,
                        target_modules=["q_proj", "v_proj"])
LAYERS = 4  # 2 decoder layers x (q_proj, v_proj)


def trained_like(model_dir):
    """The tiny Llama with MoE-LoRA whose routers are far from uniform (scaled up), as after training."""
    from transformers import AutoModelForCausalLM

    model = inject_moelora(AutoModelForCausalLM.from_pretrained(model_dir), ADAPTER)
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in adapter_parameters(model).items():
            param.normal_(0.0, 3.0 if name.endswith("router.weight") else 0.1)
    return model.eval()


def report_of(model, data: DataConfig, tokenizer):
    return routing_report(model, data, tokenizer, dead_share=0.01, rank=0, world_size=1, micro_batch_size=3)


def first_label(example: dict) -> int:
    return next(i for i, label in enumerate(example["labels"]) if label != -100)


def test_report_counts_prompt_tokens_per_answer_class_and_matches_the_merged_export(tiny_model_dir, tiny_mc_data,
                                                                                     tiny_tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    data = DataConfig(eval_path=str(tiny_mc_data["test"]), max_length=96)
    model = trained_like(tiny_model_dir)
    report = report_of(model, data, tiny_tokenizer)
    assert list(report.summaries) == [ALL, "A", "B", "C", "D"] and report.counted == "prompt tokens"
    records, fmt = load_records(data.eval_path)
    for letter in "ABCD":
        group = [r for r in records if r["messages"][-1]["content"] == letter]
        examples, _ = tokenize_as_configured(group, fmt, tiny_tokenizer, data)
        assert report.summaries[letter]["tokens"].tolist() == [sum(map(first_label, examples))] * LAYERS
    overall = report.summaries[ALL]
    slots = sum(report.summaries[c]["share"] * report.summaries[c]["tokens"].unsqueeze(1) for c in "ABCD")
    torch.testing.assert_close(overall["share"] * overall["tokens"].unsqueeze(1), slots)  # sums, not averages
    torch.testing.assert_close(overall["share"].sum(1), torch.ones(LAYERS, dtype=torch.float64))
    assert overall["share"].max() > 0.3  # the scaled routers are uneven: the comparison below is not trivial

    merged_dir = export_merged(tiny_model_dir, {k: p.detach().clone() for k, p in adapter_parameters(model).items()},
                               ADAPTER, tmp_path / "merged", max_shard_bytes=10**9)
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, trust_remote_code=True)
    from_remote_code = report_of(merged, data, tiny_tokenizer)
    assert from_remote_code.names == report.names
    for label, summary in report.summaries.items():
        for key in ("share", "entropy", "confident", "tokens"):
            torch.testing.assert_close(from_remote_code.summaries[label][key], summary[key], rtol=1e-5, atol=1e-6)


def test_text_data_counts_every_real_token(tiny_model_dir, tiny_tokenizer, tmp_path):
    texts = [{"text": "cat and dog"}, {"text": "a river by the stone house under a cloud"}]
    data = DataConfig(eval_path=str(write_jsonl(tmp_path / "text.jsonl", texts)), max_length=32)
    report = report_of(trained_like(tiny_model_dir), data, tiny_tokenizer)
    examples, _ = tokenize_as_configured(texts, "text", tiny_tokenizer, data)
    assert list(report.summaries) == [ALL] and report.counted == "all tokens"
    assert report.summaries[ALL]["tokens"].tolist() == [sum(len(e["input_ids"]) for e in examples)] * LAYERS


def test_a_model_without_routed_layers_is_a_clear_error():
    with pytest.raises(ValueError, match="no routed MoE-LoRA layers.*--checkpoint"):
        routing_stats_of(build_tiny_model("llama"), torch.device("cpu"))


def test_console_script_writes_json_and_png_for_an_adapter_export(tiny_model_dir, tiny_mc_data, tiny_tokenizer,
                                                                  tmp_path, subprocess_env):
    from transformers import AutoModelForCausalLM

    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    model = trained_like(tiny_model_dir)
    save_adapter(adapter_dir, {k: p.detach() for k, p in adapter_parameters(model).items()}, ADAPTER,
                 {"model_type": "llama"})
    config = {"model": {"name_or_path": str(tiny_model_dir), "gguf_file": None, "dtype": "float32"},
              "data": {"eval_path": str(tiny_mc_data["test"]), "max_length": 96}, "train": {"micro_batch_size": 3}}
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(["moelora-eval", "--config", str(tmp_path / "eval.yaml"), "--model", str(adapter_dir),
                          "--routing-report", str(tmp_path / "out" / "routing")],
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"routing of {LAYERS} layers" in run.stdout
    saved = json.loads((tmp_path / "out" / "routing.json").read_text())
    assert (tmp_path / "out" / "routing.png").stat().st_size > 0
    assert saved["model"] == f"adapter export {adapter_dir} (ZeRO-3 partitioned)"
    assert list(saved["groups"]) == [ALL, "A", "B", "C", "D"]
    reloaded = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter_dir).eval()
    want = report_of(reloaded, DataConfig(eval_path=str(tiny_mc_data["test"]), max_length=96), tiny_tokenizer)
    for label, group in saved["groups"].items():
        assert group["tokens"] == int(want.summaries[label]["tokens"][0])
        for layer, name in zip(group["layers"], want.names):
            assert layer["name"] == name
            assert layer["share"] == pytest.approx(want.summaries[label]["share"][want.names.index(name)].tolist(),
                                                   abs=1e-6)
