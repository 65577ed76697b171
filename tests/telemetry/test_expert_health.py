"""Expert health: routing statistics summed over ranks, the collapse alarm, the metrics summary and heat map."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from moelora_ds.adapters.config import MoELoRAConfig
from moelora_ds.adapters.inject import inject_moelora, moelora_layers
from moelora_ds.adapters.layer import MoELoRALinear, route
from moelora_ds.adapters.routing_stats import RoutingStats, routing_summary, routing_sums
from moelora_ds.config import HealthConfig
from moelora_ds.telemetry.expert_health import ALARM_ADVICE, CollapseAlarm, ExpertHealth, alarm_message, reduce_routing
from moelora_ds.telemetry.metrics import MetricsLogger, read_metrics

from conftest import build_tiny_model

# Rank 0 routes three tokens, rank 1 one token (top-1 of 2 experts): per-rank shares (2/3, 1/3) and (0, 1)
# average to (1/3, 2/3), while the four tokens together give (1/2, 1/2).
LOGITS = {0: [[2.0, 0.0], [3.0, 0.0], [0.0, 1.0]], 1: [[0.0, 4.0]]}


def _rank_main(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        stats = RoutingStats(["a", "b"], 2, torch.device("cpu"))
        gates, probs = route(torch.tensor(LOGITS[rank]), 1)
        with stats.recording():
            stats.record(0, gates, probs, 1)
            stats.record(1, probs, probs, None)
        results[rank] = (reduce_routing(stats), stats.sums.abs().sum().item())
    finally:
        dist.destroy_process_group()


def test_two_ranks_sum_their_statistics(tmp_path):
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.start_processes(_rank_main, args=(2, str(tmp_path / "init"), results), nprocs=2, start_method="fork")
    gates, probs = route(torch.tensor(LOGITS[0] + LOGITS[1]), 1)
    want = torch.stack([routing_sums(gates, probs, 1), routing_sums(probs, probs, None)])
    for rank in range(2):
        reduced, left = results[rank]
        torch.testing.assert_close(reduced, want)
        assert left == 0  # the buffer restarts after each interval
    assert routing_summary(results[0][0], 0.01)["share"][0].tolist() == pytest.approx([0.5, 0.5])


def layer_summary(forced: bool, tokens: int = 512) -> dict:
    """One interval of a real 4-expert top-2 layer: its router forced to expert 0 (all inputs positive, only
    expert 0's router row non-zero), or a random one (balanced)."""
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(16, 16), MoELoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.0,
                                                           router_noise=0.0))
    x = torch.randn(tokens, 16)
    if forced:
        x = x.abs() + 0.1
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0
    stats = RoutingStats(["model.layers.0.self_attn.q_proj"], 4, torch.device("cpu"))
    layer.routing_stats = lambda gates, probs: stats.record(0, gates, probs, layer.top_k)
    with torch.no_grad(), stats.recording():
        layer(x)
    return routing_summary(stats.sums, 0.01)


def test_alarm_fires_once_after_patience_on_a_forced_router_and_never_on_a_balanced_one():
    config = HealthConfig(patience=3)
    names = ["model.layers.0.self_attn.q_proj"]
    forced, balanced = layer_summary(True), layer_summary(False)
    assert forced["share"][0, 0] == 0.5 and forced["dead"][0] == 2  # expert 0 and one tie-broken partner
    assert balanced["dead"][0] == 0 and balanced["share"].max() < 0.4
    alarm = CollapseAlarm(names, config)
    assert [alarm.update(forced) for _ in range(5)] == [{}, {}, {names[0]: alarm.problems(forced)[0]}, {}, {}]
    assert "get less than 1% of the routed slots" in alarm.problems(forced)[0]
    alarm.update(balanced)  # a healthy interval re-arms it
    assert [bool(alarm.update(forced)) for _ in range(3)] == [False, False, True]
    assert alarm.longest == [5]  # the first run of collapsed intervals, not the last
    quiet = CollapseAlarm(names, config)
    assert not any(quiet.update(balanced) for _ in range(10))
    message = alarm_message(12, {names[0]: alarm.problems(forced)[0]}, 3)
    assert names[0] in message and "optimizer.router_lr" in message and "moelora.router_aux_loss_coef" in message
    assert ALARM_ADVICE in message


def test_a_dominating_expert_under_dense_routing_alarms():
    dense = routing_summary(torch.tensor([[0.95, 0.03, 0.02, 0.1, 0.1, 0.1, 1.0, 0.0, 0.0, 1.0]]), 0.01)
    assert CollapseAlarm(["x"], HealthConfig(patience=1)).problems(dense) == ["expert 0 gets 95% of the routed slots"]


def test_single_expert_layers_never_alarm():
    summary = routing_summary(torch.tensor([[5.0, 0.0, 5.0, 5.0]]), 0.01)  # E=1: slots, entropy, confident, tokens
    assert CollapseAlarm(["x"], HealthConfig(patience=1)).update(summary) == {}


class ScalarLog:
    """Stands in for the run's trackers (MetricsLogger's `trackers`): the (tag, step) of every scalar and the artifacts
    handed over at close."""

    def __init__(self) -> None:
        self.scalars: list[tuple[str, int]] = []
        self.artifacts: list[str] = []

    def log_metrics(self, values: dict, step: int) -> None:
        self.scalars += [(tag, step) for tag in values]

    def log_artifacts(self, paths) -> None:
        self.artifacts += [path.name for path in paths]

    def close(self) -> None:
        pass


def test_training_intervals_write_the_summary_scalars_alarm_and_heat_map(tmp_path, capsys):
    model = inject_moelora(build_tiny_model("llama"), MoELoRAConfig(num_experts=4, rank=2, top_k=1, dropout=0.0,
                                                                    router_noise=0.0, target_modules=["q_proj"]))
    q_proj = dict(moelora_layers(model))["model.layers.1.self_attn.q_proj"]
    with torch.no_grad():
        q_proj.router.weight.zero_()  # ties every logit: top-1 always picks expert 0
    health = ExpertHealth(model, HealthConfig(patience=2), torch.device("cpu"), first_step=1)
    trackers = ScalarLog()
    logger = MetricsLogger(tmp_path, total_steps=2, start_step=0, trackers=trackers)
    ids = torch.randint(0, 300, (2, 9))
    for step in (1, 2, 3, 4):
        if step == 3:  # layer 0 collapses too: its alarm goes off at step 4, recorded but not printed again
            with torch.no_grad():
                dict(moelora_layers(model))["model.layers.0.self_attn.q_proj"].router.weight.zero_()
        with health.recording(torch.ones_like(ids)):
            model(input_ids=ids)
        record = {"step": step, "loss": 1.0}
        health.interval(step, record, logger)
        logger.log(record)
    health.finish(tmp_path, logger)
    logger.close()
    first, second, _, fourth = read_metrics(tmp_path)
    assert first["expert_share_max"] == 1.0 and first["expert_share_min"] == 0.0 and first["dead_experts"] >= 3
    assert 0 < first["router_entropy"] <= torch.log(torch.tensor(4.0)).item()
    assert "health_alarm" not in first
    assert list(second["health_alarm"]) == ["model.layers.1.self_attn.q_proj"]
    assert list(fourth["health_alarm"]) == ["model.layers.0.self_attn.q_proj"]
    out = capsys.readouterr().out
    assert out.count("expert collapse at step") == 1 and "expert collapse at step 2" in out
    assert "the collapse alarm went off for 2 of 2 layers" in out
    assert ("most health intervals in a row with a dead or dominating expert: 4 (model.layers.1.self_attn.q_proj; "
            "the alarm's patience is 2)") in out
    saved = json.loads((tmp_path / "expert_health.json").read_text())
    assert saved["steps"] == [1, 4] and [layer["tokens"] for layer in saved["layers"]] == [72, 72]
    assert [layer["longest_collapsed_intervals"] for layer in saved["layers"]] == [2, 4]  # layer 0 from step 3 on
    assert (saved["every"], saved["patience"]) == (50, 2)
    assert sorted(saved["layers"][1]["share"]) == [0.0, 0.0, 0.0, 1.0]  # one expert (ties break by index)
    assert (tmp_path / "expert_health.png").stat().st_size > 0
    assert {"health/model.layers.1.self_attn.q_proj/share_3", "health/model.layers.0.self_attn.q_proj/entropy",
            "dead_experts", "loss"} <= {tag for tag, step in trackers.scalars if step == 2}
    assert trackers.artifacts == ["expert_health.json", "expert_health.png", "loss_curve.png"]


def test_a_non_finite_interval_is_left_out_of_the_run_totals(tmp_path):
    model = inject_moelora(build_tiny_model("llama"), MoELoRAConfig(num_experts=4, rank=2, top_k=2, dropout=0.0,
                                                                    router_noise=0.0, target_modules=["q_proj"]))
    health = ExpertHealth(model, HealthConfig(), torch.device("cpu"), first_step=1)
    logger = MetricsLogger(tmp_path, total_steps=2, start_step=0)
    embeddings = model.get_input_embeddings().weight
    clean = embeddings.detach().clone()
    ids = torch.arange(10, 22).reshape(2, 6)
    records = []
    for step in (1, 2):
        with torch.no_grad():
            embeddings.copy_(clean)
            if step == 1:
                embeddings[12] = float("nan")  # as a poisoned batch of a step that train.nonfinite=skip discards
        with torch.no_grad(), health.recording(torch.ones_like(ids)):
            model(input_ids=ids)
        records.append({"step": step})
        health.interval(step, records[-1], logger)
    assert math.isnan(records[0]["router_entropy"]) and records[0]["dead_experts"] == 0
    assert math.isfinite(records[1]["router_entropy"])
    health.finish(tmp_path, logger)
    logger.close()
    saved = json.loads((tmp_path / "expert_health.json").read_text())
    assert [layer["tokens"] for layer in saved["layers"]] == [12, 12]  # step 2's tokens only
