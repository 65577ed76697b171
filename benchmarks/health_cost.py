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

Run:  python benchmarks/health_cost.py           (writes its RESULTS.md section and health_cost.png)
      python benchmarks/health_cost.py --smoke   (tiny random Llama, random batch, writes nothing unless asked)
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

from moelora_ds.adapters.inject import inject_moelora, moelora_layers, router_aux_loss  # noqa: E402
from moelora_ds.adapters.optimizer import create_riemannian_optimizer  # noqa: E402
from moelora_ds.config import load_config  # noqa: E402
from moelora_ds.telemetry.expert_health import ExpertHealth  # noqa: E402
from moelora_ds.telemetry.metrics import MetricsLogger  # noqa: E402
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


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "launcher" / "configs" / "quickstart.yaml")
    parser.add_argument("--reps", type=int, default=15, help="interleaved steps per candidate")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one rank of the 2-rank run: 1)")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random batch, 2 repetitions")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default benchmarks/health_cost.png (none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps = 2
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "health_cost.png"

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
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
