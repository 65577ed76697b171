"""Expert health of a training run: routing statistics summed over ranks per health interval (health.every steps),
the collapse alarm, the metrics summary, per-layer tracker scalars and the heat map (layers x experts)."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Mapping, Optional, Sequence

import torch
from torch import nn

from moelora_ds.adapters.routing_stats import RoutingStats, attach_routing_stats, routing_summary
from moelora_ds.config import HealthConfig
from moelora_ds.distributed.process_group import all_sum_tensor
from moelora_ds.telemetry.metrics import METRICS_FILE, MetricsLogger

HEALTH_FILE = "expert_health.json"
HEAT_MAP_FILE = "expert_health.png"
SUMMARY_KEYS = ("expert_share_min", "expert_share_max", "router_entropy", "router_confident", "dead_experts")
"""What a logged step's metrics record gets: the smallest and largest expert share over all layers, the mean router
entropy (nats) and confidently routed fraction over the layers, and the number of dead experts in all layers."""
ALARM_ADVICE = ("the router is not spreading tokens over the experts: try a stronger load-balancing loss "
                "(moelora.router_aux_loss_coef, default 0.01; e.g. 0.05) or a larger router learning rate "
                "(optimizer.router_lr)")
ALARM_LAYERS_NAMED = 4
"""Layers a collapse warning names one by one; the rest are counted."""


def reduce_routing(stats: RoutingStats) -> torch.Tensor:
    """The statistics summed over all ranks (one all-reduce of the whole buffer), on the host; the buffer restarts."""
    sums = all_sum_tensor(stats.sums).cpu().clone()
    stats.reset()
    return sums


class CollapseAlarm:
    """Counts, per layer, the intervals in a row with a dead or a dominating expert; reports a layer once when
    its count reaches `patience` (again only after a healthy interval)."""

    def __init__(self, names: Sequence[str], config: HealthConfig) -> None:
        self.names, self.config = list(names), config
        self.streak = [0] * len(self.names)
        self.longest = [0] * len(self.names)
        """Per layer, the most intervals in a row it has looked collapsed: how close it came to the alarm."""

    def problems(self, summary: Mapping[str, torch.Tensor]) -> list[str]:
        """What is wrong with each layer this interval ("" when healthy)."""
        share = summary["share"]
        if share.shape[1] == 1:
            return [""] * len(self.names)
        dead = (share < self.config.dead_share).tolist()
        top_share, top = (values.tolist() for values in share.max(dim=1))
        found = []
        for layer_dead, layer_top, layer_share in zip(dead, top, top_share):
            issues = []
            experts = [str(e) for e, is_dead in enumerate(layer_dead) if is_dead]
            if experts:
                issues.append(f"expert{'s' if len(experts) > 1 else ''} {', '.join(experts)} "
                              f"{'get' if len(experts) > 1 else 'gets'} less than {self.config.dead_share * 100:g}% "
                              f"of the routed slots")
            if layer_share > self.config.max_share:
                issues.append(f"expert {layer_top} gets {layer_share:.0%} of the routed slots")
            found.append("; ".join(issues))
        return found

    def update(self, summary: Mapping[str, torch.Tensor]) -> dict[str, str]:
        """{layer: problem} for the layers whose alarm goes off with this interval."""
        fired = {}
        for layer, problem in enumerate(self.problems(summary)):
            self.streak[layer] = self.streak[layer] + 1 if problem else 0
            self.longest[layer] = max(self.longest[layer], self.streak[layer])
            if self.streak[layer] == self.config.patience:
                fired[self.names[layer]] = problem
        return fired


def alarm_message(step: int, fired: Mapping[str, str], patience: int) -> str:
    """The one warning printed for the layers whose alarm went off at `step`."""
    named = [f"{name}: {problem}" for name, problem in list(fired.items())[:ALARM_LAYERS_NAMED]]
    more = len(fired) - len(named)
    return (f"[moelora-ds] warning: expert collapse at step {step} (for {patience} health intervals in a row) in "
            f"{len(fired)} layer(s): " + "; ".join(named) + (f"; and {more} more layer(s)" if more else "")
            + f". {ALARM_ADVICE}; see metrics.jsonl and {HEAT_MAP_FILE} (health.* configures this alarm)")


def _number(value: float) -> Optional[float]:
    return None if math.isnan(value) else round(value, 6)


def layers_json(names: Sequence[str], summary: Mapping[str, torch.Tensor]) -> list[dict]:
    """Per-layer figures of `routing_summary` as JSON-able records (NaN as null)."""
    return [{"name": name, "share": [_number(v) for v in summary["share"][i].tolist()],
             "load": [_number(v) for v in summary["load"][i].tolist()],
             "entropy": _number(float(summary["entropy"][i])), "confident": _number(float(summary["confident"][i])),
             "dead": int(summary["dead"][i]), "tokens": int(summary["tokens"][i])}
            for i, name in enumerate(names)]


def streak_message(names: Sequence[str], longest: Sequence[int], patience: int) -> str:
    """The end-of-run line saying how close the layers came to the collapse alarm."""
    worst = max(range(len(names)), key=lambda i: longest[i])
    if longest[worst] == 0:
        return "[moelora-ds] expert health: no layer had a dead or dominating expert in any health interval"
    return (f"[moelora-ds] expert health: the most health intervals in a row with a dead or dominating expert: "
            f"{longest[worst]} ({names[worst]}; the alarm's patience is {patience})")


def _short_names(names: Sequence[str]) -> list[str]:
    """The layer paths without the dotted prefix they all share (model.layers.)."""
    prefix = os.path.commonprefix(list(names))
    prefix = prefix[:prefix.rfind(".") + 1]
    return [name[len(prefix):] for name in names]


def plot_heat_maps(panels: Mapping[str, torch.Tensor], names: Sequence[str], path: Path,
                   title: str) -> Optional[Path]:
    """One heat map (layers x experts, share of the routed slots) per panel, side by side, as a PNG at `path`;
    None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers, experts = next(iter(panels.values())).shape
    top = max(float(torch.nan_to_num(share).max()) for share in panels.values()) or 1.0
    figure, axes = plt.subplots(1, len(panels), squeeze=False, sharey=True, layout="constrained",
                                figsize=(2.5 + (1.0 + 0.5 * experts) * len(panels), 1.2 + 0.18 * layers))
    for axis, (label, share) in zip(axes[0], panels.items()):
        image = axis.imshow(share.numpy(), aspect="auto", cmap="viridis", vmin=0.0, vmax=top, interpolation="nearest")
        axis.set_title(label, fontsize=9)
        axis.set_xticks(range(experts))
        axis.set_xlabel("expert")
        if layers * experts <= 160:
            for (row, col), value in zip(((r, c) for r in range(layers) for c in range(experts)), share.flatten()):
                axis.text(col, row, f"{float(value):.0%}", ha="center", va="center", fontsize=6,
                          color="white" if float(value) < 0.6 * top else "black")
    axes[0][0].set_yticks(range(layers))
    axes[0][0].set_yticklabels(_short_names(names), fontsize=8 if layers <= 40 else 6)
    figure.colorbar(image, ax=axes[0].tolist(), label="share of routed slots")
    figure.suptitle(title, fontsize=10)
    path = Path(path)
    figure.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return path


class ExpertHealth:
    """A training run's routing telemetry from `first_step` on: attach to the model, record inside
    `recording(mask)`, reduce with `interval` every health.every steps (a collective: all ranks call it),
    `finish(output_dir)` on rank 0."""

    def __init__(self, model: nn.Module, config: HealthConfig, device: torch.device, first_step: int) -> None:
        stats = attach_routing_stats(model, device)
        if stats is None:
            raise ValueError("expert health: the model has no MoE-LoRA layers")
        self.stats, self.config = stats, config
        self.alarm = CollapseAlarm(stats.names, config)
        self.run_sums = torch.zeros(stats.sums.shape, dtype=torch.float64)
        self.steps = [first_step, first_step - 1]
        """First and last step of the recorded intervals."""
        self.alarmed: set[str] = set()
        """Layers whose alarm went off; only the first alarm is printed (all are in the metrics records)."""

    def recording(self, attention_mask: torch.Tensor):
        """`with health.recording(batch["attention_mask"]):` around a training forward pass."""
        return self.stats.recording(attention_mask)

    def interval(self, step: int, record: dict, logger: Optional[MetricsLogger]) -> None:
        """Reduce the interval ending at `step` (all ranks call this); with rank 0's `logger`, add the summary to
        `record`, write the per-layer scalars, and print the run's first collapse warning (records name them all)."""
        sums = reduce_routing(self.stats)
        if logger is None:
            return
        sums[~torch.isfinite(sums).all(dim=1)] = 0.0  # a non-finite forward (a skipped step) voids its layers' interval
        self.run_sums += sums
        self.steps[1] = step
        summary = routing_summary(sums, self.config.dead_share)
        record.update(zip(SUMMARY_KEYS, (float(summary["share"].min()), float(summary["share"].max()),
                                         float(summary["entropy"].mean()), float(summary["confident"].mean()),
                                         int(summary["dead"].sum()))))
        columns = {key: summary[key].tolist() for key in ("share", "entropy", "confident", "dead")}
        scalars = {}
        for i, name in enumerate(self.stats.names):
            scalars.update((f"health/{name}/share_{e}", value) for e, value in enumerate(columns["share"][i]))
            scalars.update((f"health/{name}/{key}", columns[key][i]) for key in ("entropy", "confident", "dead"))
        logger.scalars(scalars, step)
        fired = self.alarm.update(summary)
        if fired:
            record["health_alarm"] = fired
            if not self.alarmed:
                logger.write(alarm_message(step, fired, self.config.patience))
            self.alarmed.update(fired)

    def finish(self, output_dir: Path, logger: MetricsLogger) -> Optional[Path]:
        """Write the run's totals to expert_health.json and the heat map expert_health.png (the PNG's path, or None),
        both artifacts for the logger's trackers, and a line naming how many layers alarmed in all."""
        if self.alarmed:
            logger.write(f"[moelora-ds] expert health: the collapse alarm went off for {len(self.alarmed)} of "
                         f"{len(self.stats.names)} layers in this run ('health_alarm' in {METRICS_FILE})")
        if self.steps[1] < self.steps[0]:
            return None
        logger.write(streak_message(self.stats.names, self.alarm.longest, self.config.patience))
        summary = routing_summary(self.run_sums, self.config.dead_share)
        layers = layers_json(self.stats.names, summary)
        for layer, longest in zip(layers, self.alarm.longest):
            layer["longest_collapsed_intervals"] = longest
        steps = f"steps {self.steps[0]}-{self.steps[1]}"
        totals = Path(output_dir) / HEALTH_FILE
        totals.write_text(json.dumps({"steps": self.steps, "dead_share": self.config.dead_share,
                                      "every": self.config.every, "patience": self.config.patience,
                                      "layers": layers}, indent=1) + "\n")
        heat_map = (plot_heat_maps({steps: summary["share"]}, self.stats.names, Path(output_dir) / HEAT_MAP_FILE,
                                   "Expert health: share of routed slots per layer and expert")
                    if logger.plots else None)
        logger.add_artifact(totals)
        logger.add_artifact(heat_map)
        return heat_map
