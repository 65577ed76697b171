"""Smoke test of the performance benchmarks: each script runs end to end on tiny shapes and prints its table.

The benchmarks themselves are not tests (benchmarks/RESULTS.md holds their numbers); this only checks
that `python benchmarks/X.py --smoke` still works and writes its results section and plot where told.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPTS = {
    # script: (table header start, data rows the smoke run prints, results section)
    "layer.py": ("| in=out | tokens | E | routing | dtype | base ms | moe ms |", 4, "layer"),
    "optimizer.py": ("| dtype | tokens | layers | adamw ms/step | riemannian ms/step |", 2, "optimizer"),
    "step_profile.py": ("| trainer | CPU ms/step | tokens/s (CPU time) | vs frozen |", 3, "step_profile"),
    "export_memory.py": ("| mode | max shard | shards | largest shard MiB |", 2, "export_memory"),
    "health_cost.py": ("| health | CPU ms/step | vs off (paired) |", 2, "health_cost"),
    "attention.py": ("| dtype | attention | CPU ms/step | speed vs SDPA |", 5, "attention"),
    "loss_memory.py": ("| loss | RSS before step MiB | peak RSS MiB | step peak MiB | tokens/s |", 2, "loss_memory"),
}


def test_benchmark_scripts_smoke(tmp_path):
    pytest.importorskip("peft", reason="benchmarks/layer.py compares against PEFT (the `bench` extra)")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    running = {}
    for script in SCRIPTS:  # all at once: each is one thread and mostly import time
        plot = tmp_path / script.replace(".py", ".png")
        out = tmp_path / f"{script}.out"
        cmd = [sys.executable, str(REPO / "benchmarks" / script), "--smoke", "--results",
               str(tmp_path / f"{script}.md"), "--plot", str(plot)]
        running[script] = (subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=out.open("w"),
                                            stderr=subprocess.STDOUT), out, plot)
    for script, (proc, out, plot) in running.items():
        assert proc.wait(timeout=120) == 0, f"{script} --smoke failed:\n{out.read_text()[-4000:]}"
        header, n_rows, section = SCRIPTS[script]
        lines = out.read_text().splitlines()
        start = next((i for i, line in enumerate(lines) if line.startswith(header)), None)
        assert start is not None, f"{script}: no table printed:\n{out.read_text()[-2000:]}"
        rows = [line for line in lines[start + 1:] if not line.startswith("|---")][:n_rows]
        rows = [line for line in rows if line.startswith("| ")]
        assert len(rows) == n_rows, f"{script}: expected {n_rows} table rows:\n{out.read_text()[-2000:]}"
        assert all(line.count("|") == lines[start].count("|") for line in rows)
        written = (tmp_path / f"{script}.md").read_text()
        assert f"<!-- BEGIN {section} -->" in written and header in written and "Command: `python" in written
        assert plot.stat().st_size > 1000


def test_results_sections_are_replaced_not_duplicated(tmp_path):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from bench_utils import update_results
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    path = tmp_path / "RESULTS.md"
    update_results(path, "a", "first A")
    update_results(path, "b", "only B")
    update_results(path, "a", "second A")
    text = path.read_text()
    assert "second A" in text and "first A" not in text and "only B" in text
    assert text.count("<!-- BEGIN a -->") == 1 and text.index("second A") < text.index("only B")


def _bench_module(name: str):
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import importlib

        return importlib.import_module(name)
    finally:
        sys.path.remove(str(REPO / "benchmarks"))


def test_quality_report_and_resume_from_result_files(tmp_path):
    pytest.importorskip("matplotlib")
    quality = _bench_module("quality")
    cells = quality.cells_of(["sgd", "adamw"], list(quality.METHODS), {"sgd": [0.01, 0.1], "adamw": [1e-4, 1e-3]}, [1])
    assert len(cells) == 12 and len({c.name for c in cells}) == 12
    plain, sqrt = (next(c for c in cells if c.optimizer == "sgd" and c.method == m)
                   for m in ("plain", "riemannian+sqrt"))
    assert "--optimizer.name=sgd" in plain.overrides() and "--moelora.gate_rescale=none" in plain.overrides()
    assert "--optimizer.name=riemannian_sgd" in sqrt.overrides() and "--moelora.gate_rescale=sqrt" in sqrt.overrides()
    assert "--optimizer.momentum=0.9" in sqrt.overrides(0.9)
    assert not any("momentum" in o for c in cells if c.optimizer == "adamw" for o in c.overrides(0.9))
    paper = quality.cells_of(["sgd", "adamw"], ["riemannian+sqrt"], {"sgd": [0.01], "adamw": [1e-4]}, [1], ["paper"])
    sgd_paper, adamw_paper = (c.overrides(0.9) for c in paper)
    for wanted in ("--optimizer.router_lr=3e-8", "--optimizer.router_clip=1.0", "--train.grad_clip=0",
                   "--moelora.dropout_per_expert=true"):
        assert wanted in sgd_paper and wanted in adamw_paper
    assert {"--optimizer.bias_correction=false", "--optimizer.betas=[0.9,0.999]", "--optimizer.eps=1e-6"} \
        <= set(adamw_paper)
    assert sgd_paper.index("--optimizer.momentum=0") > sgd_paper.index("--optimizer.momentum=0.9")  # the last wins
    assert [c.name for c in paper] == ["sgd-paper-riemannian+sqrt-lr0.01-seed1",
                                       "adamw-paper-riemannian+sqrt-lr0.0001-seed1"]
    from moelora_ds.config import load_config

    recipe = load_config(REPO / "launcher" / "configs" / "paper.yaml")
    form = load_config(REPO / "launcher" / "configs" / "quickstart.yaml", adamw_paper)
    assert (form.optimizer.bias_correction, form.optimizer.betas, form.optimizer.eps, form.optimizer.router_lr,
            form.optimizer.router_clip, form.train.grad_clip, form.moelora.dropout_per_expert,
            form.moelora.router_aux_loss_coef, form.moelora.router_noise) == \
        (recipe.optimizer.bias_correction, recipe.optimizer.betas, recipe.optimizer.eps, recipe.optimizer.router_lr,
         recipe.optimizer.router_clip, recipe.train.grad_clip, recipe.moelora.dropout_per_expert,
         recipe.moelora.router_aux_loss_coef, recipe.moelora.router_noise)
    threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // 4))}
    for opt in ("sgd", "adamw"):  # the ablation forms are the paper form's two halves
        halves = [quality.Cell(opt, "riemannian", 1e-3, 1, form).overrides() for form in ("paper_routing",
                                                                                          "paper_optimizer")]
        assert halves[0] + halves[1][len(quality.Cell(opt, "riemannian", 1e-3, 1).overrides()):] == \
            quality.Cell(opt, "riemannian", 1e-3, 1, "paper").overrides()
        assert "--optimizer.router_lr=3e-8" in halves[0] and "--optimizer.router_lr=3e-8" not in halves[1]
        base = len(quality.Cell(opt, "riemannian", 1e-3, 1).overrides())
        parts = [quality.Cell(opt, "riemannian", 1e-3, 1, form).overrides()[base:]
                 for form in ("paper_router_lr", "paper_unclipped", "paper_dropout")]
        # the routing half's parts, together, are that half (with the paper's missing load balancing and noise)
        assert set().union(*parts) | {"--moelora.router_aux_loss_coef=0", "--moelora.router_noise=0"} == \
            set(halves[0][base:])
        assert [("--optimizer.router_lr=3e-8" in part, "--train.grad_clip=0" in part,
                 "--moelora.dropout_per_expert=true" in part) for part in parts] == \
            [(True, False, False), (False, True, False), (False, False, True)]
    assert quality.slot_launch(1, 2, 2, num_devices=4) == (["--include", "localhost:2,3"], threads)
    one_gpu = [quality.slot_launch(slot, 1, 4, num_devices=1)[0] for slot in range(4)]
    assert one_gpu == [["--include", "localhost:0"]] * 4
    assert [quality.slot_launch(slot, 1, 3, num_devices=2)[0][1] for slot in range(3)] == \
        ["localhost:0", "localhost:1", "localhost:0"]
    devices, env = quality.slot_launch(0, 1, 2, num_devices=0)
    assert devices == ["--num_gpus", "1"] and env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))
    out = tmp_path / "cells"
    for i, cell in enumerate(cells[:-1]):  # the last cell unfinished
        (out / cell.name).mkdir(parents=True)
        record = {"optimizer": cell.optimizer, "method": cell.method, "lr": cell.lr, "seed": cell.seed,
                  "accuracy": 0.3 + 0.05 * (i % 5), "eval_loss": 1.0 + i / 100, "steps": 4, "wall_s": 1.0,
                  "predicted": {"A": 19, "B": 1, "C": 0, "D": 0} if i == 1 else {"A": 5, "B": 5, "C": 5, "D": 5},
                  "health": {"dead_experts": 2 * (i % 2), "expert_share_max": 0.4}}
        if i < 2:
            record["device"] = "NVIDIA H100 80GB HBM3"
        (out / cell.name / quality.RESULT_FILE).write_text(json.dumps(record))
        evals = [{"step": 2, "eval_loss": 1.4, "accuracy": 0.25},
                 {"step": 4, "eval_loss": 1.0, "accuracy": record["accuracy"]}]
        (out / cell.name / "metrics.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))

    trained = tmp_path / "trained"  # a result record as the driver builds it from a cell's metrics.jsonl
    trained.mkdir()
    final = {"step": 4, "eval_loss": 1.2, "accuracy": 0.5, "predicted": {"A": 7, "B": 1, "C": 0, "D": 0}}
    alarmed = {"step": 2, "loss": 1.4, "lr": 0.1, "tokens_per_s": 9.0, "dead_experts": 3,
               "health_alarm": {"model.layers.0.self_attn.q_proj": "expert 1 gets less than 1% of the routed slots"}}
    step = {"step": 4, "loss": 1.3, "lr": 0.1, "tokens_per_s": 9.0, "dead_experts": 1, "expert_share_max": 0.45}
    (trained / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (alarmed, step, final)))
    record = quality.result_from_metrics(cells[0], trained, 0, 1.0)
    assert (record["accuracy"], record["eval_loss"], record["predicted"], record["steps"]) == (0.5, 1.2,
                                                                                              final["predicted"], 4)
    assert (record["form"], record["final_eval_record"], record["final_train_record"]) == ("ours", final, step)
    assert record["health"] == {"dead_experts": 1, "expert_share_max": 0.45} and record["health_alarms"] == 1

    second_seed = quality.Cell(cells[0].optimizer, cells[0].method, cells[0].lr, 2)
    (out / second_seed.name).mkdir()
    (out / second_seed.name / quality.RESULT_FILE).write_text(json.dumps(
        {"optimizer": second_seed.optimizer, "method": second_seed.method, "lr": second_seed.lr, "seed": 2,
         "accuracy": 0.2, "eval_loss": 1.4, "steps": 4, "wall_s": 1.0, "diverged": True}))

    class Args:  # a finished cell is never retrained
        out_dir = out
    assert quality.run_cell(cells[0], Args, Path("unused.yaml"), [], ([], {}))["accuracy"] == 0.3
    # a sweep run in two parts (a file written before "commands" existed, then a second command) keeps both
    settings = {"overrides": [], "num_ranks": 1, "parallel": 2, "sgd_momentum": 0.9}
    (out / "sweep.json").write_text(json.dumps({"argv": ["--optimizers", "adamw"], **settings}))
    for _ in range(2):
        quality.record_sweep(out, {"commands": [["--optimizers", "sgd"]], **settings})
    assert json.loads((out / "sweep.json").read_text())["commands"] == [["--optimizers", "adamw"],
                                                                         ["--optimizers", "sgd"]]
    md, png = tmp_path / "r.md", tmp_path / "q.png"
    quality.main(["--report", "--out-dir", str(out), "--results", str(md), "--plot", str(png)])
    text = md.read_text()
    assert "<!-- BEGIN quality -->" in text
    assert ("(the cells: `python benchmarks/quality.py --optimizers adamw`; "
            "`python benchmarks/quality.py --optimizers sgd`)") in text
    assert "| optimizer | form | method | lr 0.01 | lr 0.1 | mean | worst | best-worst | cells >= 40% |" in text
    assert "## Benchmark 4: accuracy across learning rates (sgd, adamw)," in text
    # three methods per optimizer in the accuracy, eval-loss and expert-use tables, one row per (method, rate) in
    # the per-seed table, then one row per finished cell in the accuracy-during-training table
    assert text.count("| sgd |") == 3 + 3 + 3 + 6 + 7 and text.count("| adamw |") == 3 + 3 + 3 + 5 + 5
    assert "Expert use at the last step" in text
    assert "- cells per device: cpu (not recorded): 10; NVIDIA H100 80GB HBM3: 2\n" in text
    assert "| sgd | ours | plain | 0 dead, max 40% | 2 dead, max 40% |" in text
    # the diverged second seed counts as chance: (30 + 25) / 2 in the sweep table, its own column per seed
    assert "| sgd | ours | plain | 27.5 | 45.0 | 36.3 | 27.5 | 17.5 | 1 of 3 |" in text  # 30, 25 (diverged) and 45
    assert "| optimizer | form | method | lr | seed 1 | seed 2 | seed spread |" in text
    assert "| sgd | ours | plain | 0.01 | 30.0 | 25.0 | 5.0 |" in text
    assert "| sgd | ours | plain | 0.1 | 45.0 | - | - |" in text
    assert "1 of 2 rates finished" in text
    # sgd: plain 1 of 3 cells at 40% or more, Riemannian 1 of 2 and + sqrt 1 of 2 (the 40% cell counts): a tie by share
    assert "| sgd | ours | riemannian+sqrt | 40.0 | 30.0 | 35.0 | 30.0 | 10.0 | 1 of 2 |" in text  # 40% counts
    assert "most cells that learned: ours riemannian (1 of 2), ours riemannian+sqrt (1 of 2)\n" in text
    assert _bench_module("quality_report").most_learned({("adamw", "paper", "plain"): (0, 3)}) == "no cell learned"
    collapsed = cells[1]
    assert (f"- collapsed onto one answer (>= 90% of the questions): {collapsed.optimizer} ours {collapsed.method} "
            f"lr {collapsed.lr:g} seed 1 (A 95%)\n") in text
    assert "| sgd | ours | plain | 1.000 | 1.030 |" in text
    assert "| optimizer | form | method | lr | seed | step 2 | step 4 |" in text  # accuracy during training, per cell
    assert "| sgd | ours | plain | 0.01 | 1 | 25.0 | 30.0 |" in text
    assert text.count("| 25.0 |") == 11 + 1  # step 2 of the 11 cells with evaluations; seed 2 in the per-seed table
    assert png.stat().st_size > 1000


def test_throughput_flop_count():
    throughput = _bench_module("throughput")
    moe = type("M", (), {"num_experts": 4, "rank": 8})
    shape = throughput.ModelShape(linear_params=1000, layers=2, hidden=10, adapted=[(10, 20)])
    frozen = throughput.flops_per_token(shape, "frozen", 5, moe)
    assert frozen["forward"] == 2 * 1000 + 4 * 2 * 5 * 10 and frozen["adapters"] == 0
    assert frozen["backward"] == 2 * 1000 + 8 * 2 * 5 * 10
    assert throughput.flops_per_token(shape, "peft", 5, moe)["adapters"] == 3 * 2 * 8 * 30
    assert throughput.flops_per_token(shape, "moelora", 5, moe)["adapters"] == 3 * (2 * 10 * 4 + 2 * 4 * 8 * 30)


@pytest.mark.distributed
def test_training_benchmarks_smoke(tmp_path):
    """Real launches, at once: throughput's PEFT baseline (through peak_memory.py), one quality cell (in the paper's
    form: no bias correction, router clip, unclipped experts, a dropout mask per expert), and the GPU throughput
    protocol's MoE-LoRA and frozen runs on a tiny shape."""
    pytest.importorskip("peft")
    pytest.importorskip("matplotlib")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    commands = {
        "throughput": [sys.executable, str(REPO / "benchmarks" / "throughput.py"), "--smoke", "--methods", "peft",
                       "--memory-world-sizes", "--results", str(tmp_path / "t.md")],
        "quality": [sys.executable, str(REPO / "benchmarks" / "quality.py"), "--smoke", "--methods", "plain",
                    "--forms", "paper", "--rates", "0.01", "--results", str(tmp_path / "q.md"), "--plot",
                    str(tmp_path / "q.png")],
        # the GPU protocol's runner on the CPU; its peft launch is throughput's above
        "gpu_throughput": [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--smoke", "--methods",
                           "moelora", "frozen", "--out-dir", str(tmp_path / "gpu-runs"), "--results",
                           str(tmp_path / "g.md")],
    }
    running = {name: (subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=(tmp_path / f"{name}.out").open("w"),
                                       stderr=subprocess.STDOUT), tmp_path / f"{name}.out")
               for name, cmd in commands.items()}
    for name, (proc, out) in running.items():
        assert proc.wait(timeout=300) == 0, f"{name} --smoke failed:\n{out.read_text()[-4000:]}"
    throughput = (tmp_path / "t.md").read_text()
    assert "| peft | 2 | 3 |" in throughput and "of bf16 peak" in throughput
    quality = (tmp_path / "q.md").read_text()
    assert "| adamw | paper | plain |" in quality and (tmp_path / "q.png").stat().st_size > 1000
    gpu = (tmp_path / "g.md").read_text()
    assert "<!-- BEGIN gpu -->" in gpu and "Command: `python" in gpu and "- moelora / frozen:" in gpu
    assert "| moelora | " in gpu and "| frozen | " in gpu and "| 1.00x |" in gpu
