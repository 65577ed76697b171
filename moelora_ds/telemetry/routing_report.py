"""`moelora-eval --routing-report`: how a model's MoE-LoRA layers route an evaluation set, overall and, for
multiple-choice data, per answer class, written as JSON and a heat-map PNG.

Works for moelora-ds layers (a checkpoint or an adapter export on its base) and for the remote-code layers
of a merged export, whose gates forward hooks recompute from their routers. Statistics are those of
training (adapters/routing_stats.py), summed over the ranks that share the work; padding is never counted.
For multiple-choice data only the prompt tokens count (the answer and what follows are left out), so the
classes differ by their questions alone.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from moelora_ds.adapters.layer import route
from moelora_ds.adapters.routing_stats import RoutingStats, attach_routing_stats, routing_summary
from moelora_ds.data.collate import IGNORE_INDEX
from moelora_ds.data.records import tokenize_as_configured
from moelora_ds.evaluation.evaluate import (
    eval_batches,
    eval_records,
    is_multiple_choice,
    multiple_choice_answers,
)
from moelora_ds.telemetry.expert_health import layers_json, plot_heat_maps, reduce_routing
from moelora_ds.training.loss import host_to_device, logits_at, model_device, model_inputs

ALL = "all"
"""The report's label of the whole data set."""


def _record_remote_code_layer(stats: RoutingStats, index: int, module: nn.Module, args: tuple, output) -> None:
    if not stats.active:
        return
    gates, probs = route(module.router(args[0].reshape(-1, module.in_features)), module.top_k)
    stats.record(index, gates, probs, module.top_k)


def routing_stats_of(model: nn.Module, device: torch.device) -> RoutingStats:
    """Statistics that `model`'s routed layers record into (moelora-ds layers, or a merged export's remote code)."""
    stats = attach_routing_stats(model, device)
    if stats is not None:
        return stats
    layers = [(name, module) for name, module in model.named_modules()
              if type(module).__name__ == "MoELoRALinear" and isinstance(getattr(module, "router", None), nn.Linear)]
    if not layers:
        raise ValueError("the model has no routed MoE-LoRA layers, so there is no routing to report: the base model "
                         "has none, and a merged export of single-expert layers folds them into the base weights; "
                         "give a training checkpoint (--checkpoint) or an adapter export (--model)")
    stats = RoutingStats([name for name, _ in layers], layers[0][1].num_experts, device)
    for index, (_, module) in enumerate(layers):
        module.register_forward_hook(functools.partial(_record_remote_code_layer, stats, index))
    return stats


def counted_tokens(batch: dict[str, torch.Tensor], prompt_only: bool) -> torch.Tensor:
    """(batch, seq) 0/1: the real tokens of rows with a label (a short shard's padding rows have none), and with
    `prompt_only` only those before the row's first label."""
    labelled = batch["labels"] != IGNORE_INDEX
    mask = batch["attention_mask"].bool() & labelled.any(dim=1, keepdim=True)
    if prompt_only:
        mask &= labelled.long().cumsum(dim=1) == 0
    return mask.long()


def _group_sums(model: nn.Module, stats: RoutingStats, examples: list[dict], prompt_only: bool, *, rank: int,
                world_size: int, micro_batch_size: int, pad_token_id: int) -> torch.Tensor:
    """The statistics of one pass over `examples`, sharded over the ranks and summed over them."""
    device = model_device(model)
    first = torch.zeros(1, dtype=torch.long, device=device)  # the output head is not needed: one position
    stats.reset()
    for batch in eval_batches(examples, micro_batch_size=micro_batch_size, rank=rank, world_size=world_size,
                              pad_token_id=pad_token_id):
        inputs = {k: host_to_device(v, device) if torch.is_tensor(v) else v for k, v in model_inputs(batch).items()}
        with stats.recording(host_to_device(counted_tokens(batch, prompt_only), device)):
            logits_at(model, inputs, first)
    return reduce_routing(stats)


@dataclass
class RoutingReport:
    """The per-layer figures (`routing_summary`) of every group: "all" and, for multiple-choice data, each answer."""

    data: str
    records: int
    counted: str
    dead_share: float
    names: list[str]
    summaries: dict[str, dict[str, torch.Tensor]]

    def to_json(self, what: str) -> dict:
        return {"model": what, "data": self.data, "records": self.records, "counted": self.counted,
                "dead_share": self.dead_share,
                "groups": {label: {"tokens": int(summary["tokens"][0]), "layers": layers_json(self.names, summary)}
                           for label, summary in self.summaries.items()}}

    def write(self, out: Path, what: str) -> tuple[Path, Optional[Path]]:
        """OUT.json and OUT.png (a heat map per group; None without matplotlib), for the model described by `what`."""
        out = Path(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        json_path = out.with_suffix(".json")
        json_path.write_text(json.dumps(self.to_json(what), indent=1) + "\n")
        panels = {label if label == ALL else f"answer {label}": summary["share"]
                  for label, summary in self.summaries.items()}
        png = plot_heat_maps(panels, self.names, out.with_suffix(".png"),
                             f"Routing of {what} on {self.data} ({self.counted}): share of routed slots")
        return json_path, png


def routing_report(model: nn.Module, data_config, tokenizer, *, dead_share: float, rank: int, world_size: int,
                   micro_batch_size: int) -> RoutingReport:
    """The routing of `model` over `data_config.eval_path`, sharded over the ranks (all of them call this)."""
    records, fmt = eval_records(data_config)
    multiple_choice = fmt == "chat" and is_multiple_choice(records, data_config.choices)
    if multiple_choice:
        answers = multiple_choice_answers(records, data_config.choices)
        groups = {choice: [r for r, a in zip(records, answers) if a == choice] for choice in data_config.choices}
    else:
        groups = {ALL: records}
    model.eval()
    stats = routing_stats_of(model, model_device(model))
    sums = {}
    with torch.no_grad():
        for label, group in groups.items():
            examples, _ = tokenize_as_configured(group, fmt, tokenizer, data_config) if group else ([], {})
            if examples:
                sums[label] = _group_sums(model, stats, examples, multiple_choice, rank=rank, world_size=world_size,
                                          micro_batch_size=micro_batch_size, pad_token_id=tokenizer.pad_token_id)
    if not sums:
        raise ValueError(f"{data_config.eval_path}: no example left to route (all longer than data.max_length?)")
    if multiple_choice:
        sums = {ALL: sum(sums.values()), **sums}
    return RoutingReport(data_config.eval_path, len(records), "prompt tokens" if multiple_choice else "all tokens",
                         dead_share, stats.names,
                         {label: routing_summary(group_sums, dead_share) for label, group_sums in sums.items()})
