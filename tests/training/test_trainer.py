"""The DeepSpeed engine against a single-process reference, across ZeRO stages and offload, with real ranks."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
import yaml

from moelora_ds.adapters.inject import adapter_parameters, inject_moelora
from moelora_ds.data.batches import ShardedBatches
from moelora_ds.data.records import load_records, tokenize_as_configured
from moelora_ds.models.loading import load_base_model, load_tokenizer
from moelora_ds.telemetry.metrics import read_metrics

from conftest import REPO
from harness import (
    bf16_bound,
    checkpoint_adapters,
    deepspeed_command,
    global_relative_error,
    launch,
    load_config_from_dict,
    max_relative_error,
    reference_run,
    run_config,
)

WORLD_SIZE = 2
STEPS = 10
ROUTER_CLIP = 0.02


STAGE_BOUND = 1e-5
"""How far a stage's final adapters may be from the single-process reference (max relative error over tensors): the
two sum the same gradients in another order (across ranks, in ZeRO's buckets), fp32 rounding of ~1e-7 per sum that
10 steps of an update linear in the gradient (or damped, DAMPED_ADAMW_EPS) keep within a few 1e-7."""
OFFLOAD_BOUND = 1e-4
"""The same under optimizer offload: DeepSpeed's CPU Adam (C++ SIMD fp32) is not torch's AdamW, its own arithmetic
rounds each update differently (measured 1.2e-5 for riemannian_adamw)."""
DAMPED_ADAMW_EPS = 1e-5
"""AdamW's eps in the stage comparison. Adam's step m/(sqrt(v)+eps) is about sign(g) for |g| >> eps: an element whose
gradient is itself rounding noise (a router row no token reached, an expert's A before its B moves) then takes a
full +-lr step whose sign the summation order decides, and any bound on the difference is machine luck (the same
reference against itself summed in reverse order: 2.1e-5 at eps 1e-8 here). The step's derivative in g is at most
1/eps, so with eps above the rounding noise of the gradients (|g| ~ 1e-3..1, rounding ~1e-7 of that) a rounding
difference moves the update by at most lr * 1e-7 * |g| / eps: the comparison is then as exact as SGD's (the test
checks that the reference against itself in reverse order is below STAGE_BOUND / 10)."""


@pytest.fixture(scope="module", params=["riemannian_sgd", "riemannian_adamw"])
def optimizer_case(request, tiny_model_dir, tiny_mc_data):
    optimizer = {"riemannian_sgd": {"name": "riemannian_sgd", "lr": 0.2},
                 "riemannian_adamw": {"name": "riemannian_adamw", "lr": 1e-2, "eps": DAMPED_ADAMW_EPS}}[request.param]
    config = run_config(tiny_model_dir, tiny_mc_data, Path("unused"), optimizer=optimizer)
    reference = reference_run(config, WORLD_SIZE)
    rounding = max_relative_error(reference_run(config, WORLD_SIZE, reverse_order=True).adapters, reference.adapters)
    assert rounding < STAGE_BOUND / 10, f"{request.param}: the reference against itself in reverse order {rounding:.2e}"
    return request.param, config, reference, rounding


@pytest.mark.distributed
@pytest.mark.parametrize("ds_config,checkpointing", [("zero0", False), ("zero1", False), ("zero2", False),
                                                     ("zero3", False), ("zero3_offload", True)],
                         ids=["zero0", "zero1", "zero2", "zero3", "zero3_offload-gradient_checkpointing"])
def test_stages_match_single_process_reference(optimizer_case, ds_config, checkpointing, tmp_path, subprocess_env):
    """Every stage trains like the reference and records its gradient norm (DeepSpeed's under ZeRO, the trainer's own at
    stage 0); the offload case also recomputes activations in backward (gradient checkpointing under ZeRO-3: the
    recomputed forward must find its partitioned frozen weights gathered again)."""
    name, config, reference_run_result, rounding = optimizer_case
    reference = reference_run_result.adapters
    config = {**config, "deepspeed": f"ds_configs/{ds_config}.json",
              "model": {**config["model"], "gradient_checkpointing": checkpointing},
              "train": {**config["train"], "output_dir": str(tmp_path / "out")}}
    launch(config, tmp_path, subprocess_env)
    trained = checkpoint_adapters(tmp_path / "out")
    error = max_relative_error(trained, reference)
    tolerance = OFFLOAD_BOUND if ds_config.endswith("offload") else STAGE_BOUND
    assert error < tolerance, (f"{name} under {ds_config}: max relative error {error:.2e} on final adapter weights "
                               f"(the reference against itself in reverse order: {rounding:.2e})")
    records = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert len(records) == STEPS
    assert [r["loss"] for r in records] == pytest.approx(reference_run_result.losses, rel=1e-5)
    assert [r["grad_norm"] for r in records] == pytest.approx(reference_run_result.grad_norms, rel=tolerance)
    # The adapters moved: the comparison is not trivially between two initial states.
    assert any(trained[k].abs().sum() > 0 for k in trained if k.endswith("lora_B"))


@pytest.mark.distributed
def test_router_losses_and_noise_under_zero3_match_the_reference(tiny_model_dir, tiny_mc_data, tmp_path,
                                                                   subprocess_env):
    """Load balancing, z-loss and noisy top-k selection on 2 ZeRO-3 ranks train like the single-process reference, which
    adds each micro-batch's router loss and keys the noise per micro-batch and rank as the trainer does. SGD: the
    update is linear in the gradient, so the stage tests' bound holds; the same run without the three is far off."""
    routing = {"router_aux_loss_coef": 0.05, "router_z_loss_coef": 1e-3, "router_noise": 0.5}
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", moelora=routing,
                        optimizer={"name": "riemannian_sgd", "lr": 0.2})
    reference = reference_run(config, WORLD_SIZE)
    plain = reference_run({**config, "moelora": {**config["moelora"], "router_aux_loss_coef": 0.0,
                                                 "router_z_loss_coef": 0.0, "router_noise": 0.0}}, WORLD_SIZE)
    gap = max_relative_error(plain.adapters, reference.adapters)
    launch(config, tmp_path, subprocess_env)
    error = max_relative_error(checkpoint_adapters(tmp_path / "out"), reference.adapters)
    assert error < STAGE_BOUND < gap / 100, (error, gap)
    records = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert [r["loss"] for r in records] == pytest.approx(reference.losses, rel=1e-5)  # the task loss alone
    # 8 routed layers, each adding 0.05 * E * sum f_e P_e (1 when balanced) + the z-loss: near 0.4, never 0
    assert all(0.3 < r["router_loss"] < 1.0 for r in records), [r["router_loss"] for r in records]


PAPER_OPTIMIZER = {"name": "riemannian_adamw", "lr": 1e-2, "reg": 1e-3, "bias_correction": False,
                   "betas": [0.9, 0.999], "eps": 1e-6, "router_lr": 5e-3, "router_clip": ROUTER_CLIP}


@pytest.fixture(scope="module")
def paper_case(tiny_model_dir, tiny_mc_data):
    """The paper's optimizer recipe on the tiny run, its plain reference, and how far that reference moves without the
    router clip, with bias correction, or with another eps (what the comparison must be able to see).

    Dense routing: without bias correction and with eps 1e-6 the routers' tiny gradients are amplified, and
    rounding could flip a top-k choice and send the runs apart.
    """
    config = run_config(tiny_model_dir, tiny_mc_data, Path("unused"), optimizer=PAPER_OPTIMIZER,
                        moelora={"top_k": None}, scheduler={"name": "linear", "warmup_steps": 0, "min_lr_ratio": 0.1})
    reference = reference_run(config, WORLD_SIZE, plain=True)
    gaps = {}
    for key, value in (("router_clip", 0.0), ("bias_correction", True), ("eps", 1e-8)):
        changed = reference_run({**config, "optimizer": {**PAPER_OPTIMIZER, key: value}}, WORLD_SIZE, plain=True)
        gaps[key] = max_relative_error(changed.adapters, reference.adapters)
    return config, reference.adapters, reference.losses, gaps


@pytest.mark.distributed
@pytest.mark.parametrize("ds_config", ["zero3", "zero3_offload"])
def test_paper_recipe_matches_plain_reference(paper_case, ds_config, tmp_path, subprocess_env):
    """optimizer.bias_correction=false (torch AdamW adjusted per step; DeepSpeed's CPU Adam under offload) and
    optimizer.router_clip with train.grad_clip=0 on 2 ranks, against the recipe written out in one process. Under
    ZeRO-3 each rank's optimizer holds a slice of the routers' flat partition: the clip needs the norm over ranks."""
    config, reference, reference_losses, gaps = paper_case
    config = {**config, "deepspeed": f"ds_configs/{ds_config}.json",
              "train": {**config["train"], "output_dir": str(tmp_path / "out")}}
    launch(config, tmp_path, subprocess_env)
    error = max_relative_error(checkpoint_adapters(tmp_path / "out"), reference)
    tolerance = 3e-4 if ds_config.endswith("offload") else 1e-4
    assert error < tolerance, f"{ds_config}: max relative error {error:.2e} on final adapter weights"
    assert min(gaps.values()) > 10 * tolerance, gaps
    logged = [r["loss"] for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert logged == pytest.approx(reference_losses, rel=1e-4)


PROBE_PRELUDE = (
    "import sys, json, torch, deepspeed, torch.distributed as dist\n"
    "from pathlib import Path\n"
    "sys.path.insert(0, {repo!r})\n"
    "from moelora_ds.config import load_config\n"
    "from moelora_ds.training.deepspeed_config import build_deepspeed_config\n"
    "from moelora_ds.training.trainer import build_model\n"
    "from moelora_ds.adapters.inject import moelora_layers\n"
    "from moelora_ds.distributed.process_group import end_rank_process, init_distributed, say\n"
    "from moelora_ds.training.optimizers import build_optimizer\n"
    "rank, world = init_distributed()\n"
    "cfg = load_config(sys.argv[-1])\n"
    "ds = build_deepspeed_config(cfg, world)\n"
    "model = build_model(cfg, ds, Path(cfg.model.name_or_path))\n")


def run_probe(body: str, config: dict, tmp_path: Path, env: dict) -> list[dict]:
    """Run PROBE_PRELUDE + `body` on 2 ranks under the deepspeed launcher; `body` says `RESULT <json>` per rank."""
    probe = tmp_path / "probe.py"
    probe.write_text(PROBE_PRELUDE.format(repo=str(REPO)) + body + "end_rank_process(0)\n")
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    result = subprocess.run(deepspeed_command(2, str(probe), str(tmp_path / "config.yaml")), env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    reports = [json.loads(line.split("RESULT ", 1)[1]) for line in result.stdout.splitlines() if "RESULT " in line]
    assert sorted(r["rank"] for r in reports) == [0, 1], result.stdout[-3000:]
    return reports


@pytest.mark.distributed
def test_zero3_partitions_every_frozen_weight(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    reports = run_probe(
        "frozen = {n: (p.numel(), list(getattr(p, 'ds_shape', [])))\n"
        "          for n, p in model.named_parameters() if not p.requires_grad}\n"
        "trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)\n"
        "say('RESULT ' + json.dumps({'rank': rank, 'frozen': frozen, 'trainable': trainable}))\n",
        run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out"), tmp_path, subprocess_env)
    for report in reports:
        assert report["frozen"], "no frozen parameters reported"
        for name, (numel, ds_shape) in report["frozen"].items():
            assert numel == 0 and ds_shape, f"rank {report['rank']}: {name} is not partitioned"
        assert all(n.endswith(("lora_A", "lora_B", "router.weight")) for n in report["trainable"])


@pytest.mark.distributed
def test_zero3_build_starts_from_the_same_adapters(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """A model built inside `deepspeed.zero.Init` (ZeRO-3, 2 ranks) starts from bitwise the same adapters as one
    built without DeepSpeed in this process: the draws do not depend on where or how the base was built."""
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", moelora={"dropout": 0.1})
    reports = run_probe(
        "import hashlib\n"
        "from moelora_ds.adapters.inject import adapter_parameters\n"
        "digests = {n: hashlib.sha256(p.detach().float().cpu().numpy().tobytes()).hexdigest()\n"
        "           for n, p in adapter_parameters(model).items()}\n"
        "partitioned = all(p.numel() == 0 for n, p in model.named_parameters() if not p.requires_grad)\n"
        "say('RESULT ' + json.dumps({'rank': rank, 'digests': digests, 'partitioned': partitioned}))\n",
        config, tmp_path, subprocess_env)
    cfg = load_config_from_dict(config)
    plain = inject_moelora(load_base_model(tiny_model_dir, "float32"), cfg.moelora, seed=cfg.train.seed)
    expected = {n: hashlib.sha256(p.detach().float().numpy().tobytes()).hexdigest()
                for n, p in adapter_parameters(plain).items()}
    for report in reports:
        assert report["partitioned"], f"rank {report['rank']}: the base was not built partitioned"
        differing = sorted(n for n in expected if report["digests"].get(n) != expected[n])
        assert not differing and set(report["digests"]) == set(expected), (report["rank"], differing)


DROPOUT_PROBE = (
    "from moelora_ds.training.trainer import Trainer\n"
    "trainer = Trainer(cfg)\n"
    "layers = [layer for _, layer in moelora_layers(trainer.engine.module)]\n"
    "layers[0].train(); layers[1].train()\n"
    "x = torch.ones(16, 32, device=trainer.device)\n"
    "masks = [(layer.dropout(x) != 0).cpu() for layer in layers[:2] for _ in range(2)]\n"
    "say('RESULT ' + json.dumps({'rank': rank, 'masks': [m.int().flatten().tolist() for m in masks]}))\n")


@pytest.mark.distributed
def test_dropout_masks_differ_between_ranks_and_rerun_bitwise(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """The trainer's layers draw dropout masks from the rank's own stream (one for all its layers): rank 0's and rank
    1's differ, while their starting adapters are the same (test_zero3_build_starts_from_the_same_adapters); a
    second run draws bitwise the same masks on each rank."""
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", moelora={"dropout": 0.5})
    runs = []
    for attempt in ("first", "again"):
        (tmp_path / attempt).mkdir()
        runs.append({r["rank"]: r["masks"] for r in run_probe(DROPOUT_PROBE, config, tmp_path / attempt,
                                                               subprocess_env)})
    first, again = runs
    assert first == again
    assert first[0] != first[1]
    assert len({tuple(mask) for mask in first[0]}) == 4  # successive draws and layers: one stream, moving on


@pytest.mark.distributed
@pytest.mark.parametrize("deepspeed,dtype,per_expert", [("ds_configs/zero3.json", "float32", True),
                                                         ("ds_configs/zero0.json", "bfloat16", False)])
def test_resume_continues_exactly(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env, deepspeed, dtype, per_expert):
    """Also the dropout masks continue exactly (one shared mask, or one per expert: moelora.dropout_per_expert)."""
    base = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "full", optimizer={"name": "riemannian_adamw"},
                      moelora={"dropout": 0.1, "dropout_per_expert": per_expert},
                      train={"max_steps": 12, "output_dir": str(tmp_path / "full")},
                      deepspeed=deepspeed)
    base["model"]["dtype"] = dtype
    (tmp_path / "a").mkdir()
    launch(base, tmp_path / "a", subprocess_env)
    full = [r["loss"] for r in read_metrics(tmp_path / "full") if "loss" in r]

    split_dir = tmp_path / "split"
    first = {**base, "train": {**base["train"], "output_dir": str(split_dir), "stop_at": 6}}
    (tmp_path / "b").mkdir()
    launch(first, tmp_path / "b", subprocess_env)
    second = {**base, "train": {**base["train"], "output_dir": str(split_dir), "resume": "auto"}}
    launch(second, tmp_path / "b", subprocess_env)
    resumed = [r["loss"] for r in read_metrics(split_dir) if "loss" in r]

    assert (split_dir / "checkpoints" / "step_6").is_dir()
    assert [r["step"] for r in read_metrics(split_dir) if "loss" in r] == list(range(1, 13))
    assert resumed[6:] == pytest.approx(full[6:], rel=1e-6, abs=1e-7)
    assert resumed == pytest.approx(full, rel=1e-6, abs=1e-7)
    assert json.loads((split_dir / "checkpoints" / "step_12" / "moelora_run.json").read_text())["step"] == 12
    assert not list(split_dir.glob("*.png")) and (split_dir / "expert_health.json").is_file()  # train.plots=false


@pytest.mark.distributed
def test_zero3_experts_without_tokens_do_not_hang(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """Zeroed, frozen (router_lr=0) routers tie every logit, so top-2 of 4 picks the same two experts for every
    token and the other two get no tokens on any rank. Stacked experts still touch every parameter, so ZeRO-3's
    gradient reduce cannot wait forever, and the idle experts' B stays exactly zero."""
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", train={"grad_accum": 1},
                        optimizer={"name": "riemannian_adamw", "lr": 1e-2, "router_lr": 0.0})
    reports = run_probe(
        "for _, layer in moelora_layers(model):\n"
        "    layer.router.weight.data.zero_()\n"
        "engine, *_ = deepspeed.initialize(model=model, config=ds,\n"
        "                                  optimizer=build_optimizer(model, cfg.optimizer, offload=False))\n"
        "torch.manual_seed(rank)\n"
        "for _ in range(3):\n"
        "    ids = torch.randint(0, 300, (2, 12))\n"
        "    engine.backward(engine(input_ids=ids, labels=ids).loss)\n"
        "    engine.step()\n"
        "layer = next(moelora_layers(engine.module))[1]\n"
        "with deepspeed.zero.GatheredParameters([layer.lora_B]):\n"
        "    norms = layer.lora_B.detach().flatten(1).norm(dim=1).tolist()\n"
        "say('RESULT ' + json.dumps({'rank': rank, 'norms': norms}))\n",
        config, tmp_path, subprocess_env)
    assert reports[0]["norms"] == reports[1]["norms"]
    assert sorted(n > 0 for n in reports[0]["norms"]) == [False, False, True, True], reports[0]


BF16_CASES = {"riemannian_sgd": ("sgd", 0.2), "riemannian_adamw": ("adamw", 1e-2)}  # name: (unpreconditioned, lr)


def bf16_config(name: str, model_dir: Path, data: dict, output_dir: Path, stage: int) -> dict:
    return run_config(model_dir, data, output_dir, optimizer={"name": name, "lr": BF16_CASES[name][1]},
                      scheduler={"name": "constant", "warmup_steps": 0}, deepspeed=f"ds_configs/zero{stage}.json")


@pytest.fixture(scope="module", params=sorted(BF16_CASES))
def bf16_case(request, tiny_model_dir, tiny_mc_data):
    """A case's fp32 reference, its distance to the unpreconditioned reference (gap) and to itself under bf16
    autocast (noise): single-process runs, the same for every ZeRO stage."""
    name = request.param
    config = bf16_config(name, tiny_model_dir, tiny_mc_data, Path("unused"), 0)
    reference = reference_run(config, WORLD_SIZE).adapters
    plain = reference_run({**config, "optimizer": {**config["optimizer"], "name": BF16_CASES[name][0]}},
                          WORLD_SIZE).adapters
    noise = global_relative_error(reference_run(config, WORLD_SIZE, bf16_autocast=True).adapters, reference)
    return name, reference, global_relative_error(plain, reference), noise


@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_follows_the_fp32_reference(bf16_case, tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env, stage):
    """bf16 at ZeRO-0 and ZeRO-3 tracks the fp32 single-process reference within bf16 noise (as measured by the
    reference itself under bf16 autocast), and far closer than the same reference without preconditioning is (so
    the bf16 path really preconditions)."""
    name, reference, gap, noise = bf16_case
    config = bf16_config(name, tiny_model_dir, tiny_mc_data, tmp_path / "out", stage)
    launch({**config, "model": {**config["model"], "dtype": "bfloat16"}}, tmp_path, subprocess_env)
    error = global_relative_error(checkpoint_adapters(tmp_path / "out"), reference)
    assert error < bf16_bound(gap, noise), (f"{name} ZeRO-{stage}: bf16 error {error:.3f}, the reference under bf16 "
                                            f"autocast {noise:.3f}, unpreconditioned gap {gap:.3f}")


@pytest.mark.distributed
def test_start_up_advisory_and_collapse_alarm_reach_the_console_once(tiny_model_dir, tiny_mc_data, tmp_path,
                                                                     subprocess_env):
    """The start-up advisory and a collapse alarm (forced: some expert of 4 always has at most a quarter of the
    routed slots, below health.dead_share=0.26) reach the user's console once each (rank 0), the run still trains,
    and the routing statistics count the real tokens of both ranks' micro-batches."""
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", optimizer={"name": "riemannian_sgd", "lr": 0.1})
    config["train"].update(max_steps=1, grad_clip=1.0, plots=True)
    config["health"] = {"dead_share": 0.26, "patience": 1}
    result = launch(config, tmp_path, subprocess_env)
    output = result.stdout + result.stderr
    assert output.count("train.grad_clip=1 with optimizer.name=riemannian_sgd") == 1, output[-3000:]
    assert output.count("expert collapse at step 1") == 1, output[-3000:]
    (record,) = [r for r in read_metrics(tmp_path / "out") if "loss" in r]
    assert record["step"] == 1 and len(record["health_alarm"]) == 8  # 2 decoder layers x q, k, v, o
    assert 0 <= record["expert_share_min"] <= 0.25 <= record["expert_share_max"] <= 0.5  # top-2: at most half the slots
    cfg = load_config_from_dict(config)
    tokenizer = load_tokenizer(Path(cfg.model.name_or_path))
    examples, _ = tokenize_as_configured(*load_records(cfg.data.train_path, cfg.data.format), tokenizer, cfg.data)
    tokens = 0
    for rank in range(WORLD_SIZE):
        shard = iter(ShardedBatches(examples, micro_batch_size=cfg.train.micro_batch_size, rank=rank,
                                    world_size=WORLD_SIZE, seed=cfg.train.seed, shuffle=cfg.data.shuffle,
                                    max_length=cfg.data.max_length, pad_token_id=tokenizer.pad_token_id))
        tokens += sum(int(next(shard)["attention_mask"].sum()) for _ in range(cfg.train.grad_accum))
    health = json.loads((tmp_path / "out" / "expert_health.json").read_text())
    assert [layer["tokens"] for layer in health["layers"]] == [tokens] * 8
    assert (tmp_path / "out" / "expert_health.png").stat().st_size > 0
    assert (tmp_path / "out" / "loss_curve.png").stat().st_size > 0


@pytest.mark.distributed
def test_zero0_bf16_first_adam_step_is_step_one(tiny_model_dir, tiny_mc_data, tmp_path, subprocess_env):
    """DeepSpeed's ZeRO-0 bf16 wrapper steps the optimizer once on zero gradients at start-up; the trainer undoes
    it, so after one training step Adam has counted one step and moved the zero-initialised B factors by lr (its
    first update is lr times the gradient's sign wherever the gradient is well above eps)."""
    lr = 1e-2
    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", optimizer={"name": "adamw", "lr": lr},
                        scheduler={"name": "constant", "warmup_steps": 0}, deepspeed="ds_configs/zero0.json")
    config["model"]["dtype"] = "bfloat16"
    config["train"]["max_steps"] = 1
    launch(config, tmp_path, subprocess_env)
    root = tmp_path / "out" / "checkpoints"
    state = torch.load(root / (root / "latest").read_text().strip() / "mp_rank_00_model_states.pt", weights_only=False)
    adam_steps = {float(s["step"]) for s in state["optimizer"]["optimizer_state_dict"]["state"].values()}
    assert adam_steps == {1.0}
    moved = torch.cat([p.float().abs().flatten() for name, p in state["module"].items() if name.endswith("lora_B")])
    assert abs(moved.median().item() / lr - 1) < 2 ** -7, moved.median()  # 0.735 with the start-up step counted
