"""Benchmark 5: what expert-health telemetry costs per training step, on vs off, in one process.

One model (the quickstart's SmolLM2-135M, bf16, MoE-LoRA E=4 r=8 top-2 on q,k,v,o, Riemannian AdamW, the real
first micro-batch of rank 0), one training step as the engine runs it (forward with causal-LM loss and router
aux loss, backward, optimizer step), steps interleaved:
  off  no routing statistics (MoELoRALinear.routing_stats None)
  on   every layer records its routing inside `ExpertHealth.recording(attention_mask)`, and every step ends a
       logging interval (`ExpertHealth.interval`: reduction, summary, per-layer scalars, alarm), the worst
       case log_every=1
Both write the step's metrics record. Two measures: the paired per-round ratio of CPU time per step (on/off,
noisy on a shared machine), and the CPU time spent inside the health code itself during the `on` steps (the
layers' recording calls, adding their routing up at the end of the forward, and the interval), timed
directly, as a fraction of the `off` step.

A second measure, the writing: what rank 0 spends per step writing the expert-health scalars (layers x
(E + 3) per interval) to each installed tracker for a 64-layer x 7-target model shape with E=8 (a 70B-class
all-linear run: 448 routed layers, 4,928 scalars), at an interval every step (log_every 1, the cadence
before health.every) against one every health.every steps; the baseline is the step's metrics record
alone, written to the same tracker in the same process. Wall time, as W&B serialises in its own process
and MLflow waits for its store: what the training loop waits for.

Run:  python benchmarks/health_cost.py                (both; writes the RESULTS.md sections and health_cost.png)
      python benchmarks/health_cost.py --writes-only  (the writing only: RESULTS.md section health_writes)
      python benchmarks/health_cost.py --smoke        (tiny random Llama, random batch, 4 x 7 layers for the
                                                       writing; writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path
from statistics import median
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer import load_model  # noqa: E402
from step_profile import quiz_batch, random_batch  # noqa: E402

from moelora_ds.adapters.config import MoELoRAConfig  # noqa: E402
from moelora_ds.adapters.inject import inject_moelora, moelora_layers, router_aux_loss  # noqa: E402
from moelora_ds.adapters.optimizer import create_riemannian_optimizer  # noqa: E402
from moelora_ds.config import HealthConfig, load_config  # noqa: E402
from moelora_ds.telemetry.expert_health import ExpertHealth  # noqa: E402
from moelora_ds.telemetry.metrics import MetricsLogger  # noqa: E402
from moelora_ds.telemetry.trackers import PACKAGES, TrackedRun, Trackers, installed  # noqa: E402
from moelora_ds.training.loss import causal_lm_loss  # noqa: E402

from bench_utils import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    command_line,
    fmt_ms,
    fmt_ratio,
    interleaved_times,
    machine_lines,
    markdown_table,
    paired_ratios,
    save_figure,
    update_results,
)


class HealthTimer:
    """CPU seconds of this thread in the health code: wraps each layer's recorder and `ExpertHealth.interval`."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def wrap(self, function):
        def timed(*args, **kwargs):
            start = time.thread_time()
            try:
                return function(*args, **kwargs)
            finally:
                self.seconds += time.thread_time() - start
        return timed


def build_steps(config, smoke: bool, batch: dict, log_dir: Path):
    """The `off` and `on` step functions over one model, and the timer of the health code."""
    model, _ = load_model("bf16" if config.model.dtype == "bfloat16" else "fp32", smoke)
    opt = config.optimizer
    torch.manual_seed(config.train.seed)
    inject_moelora(model, config.moelora)
    optimizer = create_riemannian_optimizer(model, torch.optim.AdamW, lr=opt.lr, reg=opt.reg, betas=tuple(opt.betas),
                                            eps=opt.eps)
    model.train()
    health = ExpertHealth(model, config.health, torch.device("cpu"), first_step=1)
    logger = MetricsLogger(log_dir, total_steps=10**6, start_step=0)
    logger.progress.close()  # ends the progress bar's line, which would run into the printed table
    timer = HealthTimer()
    layers = [layer for _, layer in moelora_layers(model)]
    recorders = [timer.wrap(layer.routing_stats) for layer in layers]
    interval = timer.wrap(health.interval)
    counter = [0]

    def step(on: bool) -> None:
        for layer, recorder in zip(layers, recorders):
            layer.routing_stats = recorder if on else None
        with health.recording(batch["attention_mask"]) if on else nullcontext():
            loss = causal_lm_loss(model, batch)
        aux = router_aux_loss(model)
        if aux is not None:
            loss = loss + aux.to(loss.dtype)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        counter[0] += 1
        record = {"step": counter[0], "loss": float(loss.detach())}
        if on:
            interval(counter[0], record, logger)
        logger.log(record)

    return {"off": lambda: step(False), "on": lambda: step(True)}, timer, len(layers)


ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RECORD = {"loss": 1.0, "lr": 2e-3, "grad_norm": 0.5, "step_time_s": 9.0, "tokens_per_s": 1e4,
          "tokens_per_s_per_device": 1.2e3, "labelled_tokens": 4096, "epoch": 0, "peak_memory_gb": 60.0}
"""A metrics record of the trainer's keys (the baseline write)."""


def routed_shape_model(layers: int, experts: int):
    """A Llama of `layers` decoder layers at toy width with MoE-LoRA on all seven linear targets: the routed-layer
    names and counts of a large all-linear run, cheap to run forward."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))
    return inject_moelora(model.requires_grad_(False), MoELoRAConfig(num_experts=experts, rank=2, top_k=2,
                                                                      dropout=0.0, target_modules=ALL_LINEAR))


class WriteLoop:
    """Steps that write the metrics record through one MetricsLogger, with a health interval (its routing sums set back
    to one real forward pass's) where due."""

    def __init__(self, health: ExpertHealth, routed: torch.Tensor, logger: MetricsLogger) -> None:
        self.health, self.routed, self.logger = health, routed, logger
        self.step = 0

    def seconds_per_step(self, count: int, interval_every: Optional[int]) -> float:
        """Wall seconds per step over `count` steps, an interval at every `interval_every`-th of them (None: none)."""
        start = time.perf_counter()
        for index in range(1, count + 1):
            self.step += 1
            record = {"step": self.step, **RECORD}
            if interval_every and index % interval_every == 0:
                self.health.stats.sums.copy_(self.routed)
                self.health.interval(self.step, record, self.logger)
            self.logger.log(record)
        return (time.perf_counter() - start) / count


def write_costs(layers: int, experts: int, every: int, reps: int, work: Path) -> tuple[list[list[str]], int]:
    """Per tracker: ms/step of the record alone, with a health interval every step, and with one every `every` steps
    (each the median of `reps` rounds), and the ratios to the record alone; and the scalars per interval."""
    model = routed_shape_model(layers, experts)
    health = ExpertHealth(model, HealthConfig(every=every), torch.device("cpu"), first_step=1)
    ids = torch.randint(0, 256, (2, 16))
    with health.recording(torch.ones_like(ids)), torch.no_grad():
        model(input_ids=ids)
    routed = health.stats.sums.clone()
    scalars = len(health.stats.names) * (experts + 3)
    rows = []
    for name in ["none", *(n for n in sorted(PACKAGES) if installed(n))]:
        out = work / name
        out.mkdir()
        trackers = None if name == "none" else Trackers([name], TrackedRun(name, out, {"bench": "health_writes"}))
        if trackers is not None and not trackers.active:
            continue  # could not start (warned): nothing to measure
        logger = MetricsLogger(out, total_steps=10**6, start_step=0, trackers=trackers)
        logger.progress.close()
        loop = WriteLoop(health, routed, logger)
        loop.seconds_per_step(2, 1)  # warm-up: the first write of every key
        times: dict[str, list[float]] = {"record": [], "every step": [], "every": []}
        for _ in range(reps):
            times["record"].append(loop.seconds_per_step(every, None))
            times["every step"].append(loop.seconds_per_step(5, 1))
            times["every"].append(loop.seconds_per_step(every, every))
        logger.close()
        base, one, sparse = (median(values) for values in times.values())
        rows.append([name, f"{base * 1e3:.2f}", f"{one * 1e3:.1f}", f"{one / base:.0f}x", f"{sparse * 1e3:.2f}",
                     f"{sparse / base:.1f}x"])
    return rows, scalars


def writes_section(args, layers: int, experts: int, every: int, load_before) -> str:
    """Measure the writing and return its RESULTS.md section (printing the table)."""
    os.environ.setdefault("WANDB_MODE", "offline")  # measured on the machine, not over the network
    os.environ.setdefault("WANDB_SILENT", "true")
    with tempfile.TemporaryDirectory() as work:
        rows, scalars = write_costs(layers, experts, every, args.reps_writes, Path(work))
    header = ["tracker", "record alone ms/step", "health every step ms/step", "vs record",
              f"health.every={every} ms/step", "vs record"]
    table = markdown_table(header, rows)
    print(table)
    slowest = max(rows, key=lambda row: float(row[2]))
    return "\n".join([
        "## Benchmark 5b: writing expert-health scalars per step, every step vs health.every",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(["mlflow", "wandb", "tensorboard"], load_before),
        f"- CPU features: torch CPU capability {torch.backends.cpu.get_cpu_capability()}, AMX "
        f"{'yes' if 'amx_tile' in Path('/proc/cpuinfo').read_text() else 'no'} (/proc/cpuinfo)",
        f"- shape: {layers} decoder layers x 7 targets ({', '.join(ALL_LINEAR)}), E={experts}: "
        f"{layers * 7} routed layers, {scalars} health scalars per interval (layers x (E + 3)) on rank 0",
        f"- wall ms per step on rank 0 of MetricsLogger.log (metrics.jsonl and the tracker) and, at interval steps, "
        f"ExpertHealth.interval (summary, per-layer scalars, alarm; the routing sums restored before each); median "
        f"of {args.reps_writes} rounds of {every} steps (5 for `every step`); `none`: metrics.jsonl only; mlflow: "
        f"local SQLite store (its default here), wandb: WANDB_MODE=offline; `vs record`: against the record alone "
        f"to the same tracker",
        "",
        table,
        "",
        f"Reading: the slowest tracker here ({slowest[0]}) spends {slowest[2]} ms of rank 0's step writing an interval "
        f"every step and {slowest[4]} ms per step at health.every={every}, while the other ranks wait at the next "
        f"all-reduce.",
    ])


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "launcher" / "configs" / "quickstart.yaml")
    parser.add_argument("--reps", type=int, default=15, help="interleaved steps per candidate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one rank of the 2-rank run: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random batch, 2 repetitions")
    parser.add_argument("--writes-only", action="store_true", help="only the writing of the health scalars")
    parser.add_argument("--reps-writes", type=int, default=3, help="rounds of health.every steps per tracker")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default benchmarks/health_cost.png (none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.reps_writes = 2, 1
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "health_cost.png"

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    if not args.writes_only:
        step_cost(args, load_before)
    writes = writes_section(args, 4 if args.smoke else 64, 8, HealthConfig().every, os.getloadavg())
    if args.results is not None:
        update_results(args.results, "health_writes", writes)
        print(f"wrote {args.results}")


def step_cost(args, load_before) -> None:
    """The first measure: a training step with expert health off and on (table, plot, RESULTS.md section)."""
    config = load_config(args.config)
    micro_batch_size = config.train.micro_batch_size
    batch = random_batch(256, micro_batch_size) if args.smoke else quiz_batch(config, micro_batch_size)
    tokens = int(batch["attention_mask"].sum())
    with tempfile.TemporaryDirectory() as log_dir:
        steps, timer, layers = build_steps(config, args.smoke, batch, Path(log_dir))
        warmup = 2
        for _ in range(warmup):
            steps["off"]()
            steps["on"]()
        timer.seconds = 0.0
        cpu = interleaved_times(steps, reps=args.reps, inner={"off": 1, "on": 1}, warmup=0).cpu
    health_ms = timer.seconds / args.reps * 1e3
    off_ms = median(cpu["off"]) * 1e3
    ratios = paired_ratios(cpu["on"], cpu["off"])
    header = ["health", "CPU ms/step", "vs off (paired)", "health code ms/step", "health code / off step"]
    rows = [["off", fmt_ms(median(cpu["off"])), "1.00", "-", "-"],
            ["on", fmt_ms(median(cpu["on"])), fmt_ratio(ratios), f"{health_ms:.2f}", f"{health_ms / off_ms:.2%}"]]
    table = markdown_table(header, rows)
    print(table)
    if args.plot is not None:
        plot(cpu, args.plot)
        print(f"wrote {args.plot}")
    if args.results is None:
        return
    moe = config.moelora
    body = [
        "## Benchmark 5: expert-health telemetry per training step, on vs off",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(["transformers"], load_before),
        f"- model: {config.model.gguf_file or config.model.name_or_path}, {config.model.dtype}, MoE-LoRA "
        f"{moe.num_experts}x r{moe.rank} top-{moe.top_k} on {', '.join(moe.target_modules)} ({layers} routed layers) "
        f"+ Riemannian AdamW; batch: the first micro-batch of rank 0 of the 2-rank quickstart run "
        f"({micro_batch_size} questions, {batch['input_ids'].shape[1]} positions, {tokens} non-padding tokens)",
        f"- {args.threads} torch thread(s); CPU time of this process per step, median of {args.reps} interleaved "
        f"rounds after {warmup} warm-up steps each; `on` ends a logging interval every step (log_every=1, the most "
        f"health work per step); `health code`: CPU time (this thread) inside the layers' recording calls "
        f"and ExpertHealth.interval, averaged over the `on` steps: the measure of the cost, as "
        f"the paired ratio cannot resolve differences below the per-round noise of a shared machine",
        "",
        table,
    ]
    update_results(args.results, "health_cost", "\n".join(body), plot=args.plot)
    print(f"wrote {args.results}")


def plot(cpu: dict[str, list[float]], path: Path) -> None:
    """CPU ms of every interleaved round, health off and on."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    for name, values in cpu.items():
        ax.plot(range(1, len(values) + 1), [v * 1e3 for v in values], "o-", label=f"health {name}")
    ax.set_xlabel("round")
    ax.set_ylabel("CPU ms per step")
    ax.legend()
    ax.grid(alpha=0.3)
    save_figure(fig, "Benchmark 5: training step with expert health off and on", path)


if __name__ == "__main__":
    main()
