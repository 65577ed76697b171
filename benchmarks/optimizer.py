"""Benchmark 2: what Riemannian preconditioning costs per training step, against plain AdamW, in one process.

One model (the default SmolLM2-135M, MoE-LoRA E=4 r=8 top-2 on q,k,v,o), two optimizers over the same
adapter parameters, steps interleaved:
  adamw       set_preconditioning(model, None) + torch.optim.AdamW(adapter_param_groups(model))
  riemannian  create_riemannian_optimizer(model, torch.optim.AdamW, reg=1e-6): the same AdamW, with the
              expert gradients preconditioned inside backward
A step is forward (causal LM loss) + backward + optimizer.step() + zero_grad(set_to_none=True).
Also timed alone: the preconditioner's own work for the whole model (Gram matrices of every layer's
forward plus the batched Cholesky solves of its backward), a low-noise estimate of the same cost.

Run:  python benchmarks/optimizer.py            (writes benchmarks/RESULTS.md and optimizer.png)
      python benchmarks/optimizer.py --smoke    (a tiny random Llama, one repetition, writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moelora_ds.adapters.config import MoELoRAConfig  # noqa: E402
from moelora_ds.adapters.inject import inject_moelora, moelora_layers  # noqa: E402
from moelora_ds.adapters.optimizer import adapter_param_groups, create_riemannian_optimizer, set_preconditioning  # noqa: E402
from moelora_ds.adapters.preconditioner import precondition_factors  # noqa: E402

from bench_utils import (  # noqa: E402
    BENCH_DIR,
    TINY_LLAMA_NAME,
    command_line,
    fmt_ms,
    fmt_ratio,
    interleaved_times,
    machine_lines,
    markdown_table,
    paired_ratios,
    quantiles,
    save_figure,
    tiny_llama,
    update_results,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
REG, LR = 1e-6, 1e-5
TARGET = 0.05


def load_model(dtype: str, smoke: bool):
    """The frozen base causal LM: SmolLM2-135M (de-quantised cache), or a tiny random Llama under --smoke."""
    if smoke:
        model = tiny_llama().to(DTYPES[dtype]).requires_grad_(False)
        model.config.use_cache = False
        return model, TINY_LLAMA_NAME
    from moelora_ds.config import ModelConfig
    from moelora_ds.models.loading import load_base_model, local_model_dir

    model_dir = local_model_dir(ModelConfig())
    model = load_base_model(model_dir, {"fp32": "float32", "bf16": "bfloat16"}[dtype])
    return model, f"SmolLM2-135M-Instruct (de-quantised Q4_1, {model_dir.name})"


def build(dtype: str, smoke: bool, batch: tuple[int, int], experts: int, rank: int, top_k: int):
    model, model_name = load_model(dtype, smoke)
    config = MoELoRAConfig(num_experts=experts, rank=rank, top_k=top_k)
    inject_moelora(model, config)
    model.train()
    torch.manual_seed(1)
    input_ids = torch.randint(0, model.config.vocab_size, batch)
    optimizers = {
        "adamw": torch.optim.AdamW(adapter_param_groups(model, lr=LR), lr=LR),
        "riemannian": create_riemannian_optimizer(model, torch.optim.AdamW, lr=LR, reg=REG),
    }
    reg_of = {"adamw": None, "riemannian": REG}

    def step_of(name: str):
        optimizer = optimizers[name]

        def step() -> None:
            set_preconditioning(model, reg_of[name])
            loss = model(input_ids=input_ids, labels=input_ids).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        return step

    return model, model_name, {name: step_of(name) for name in optimizers}


def preconditioner_alone(model, reps: int) -> list[float]:
    """CPU seconds per step of the preconditioner's own work: every layer's Grams (forward) and solves (backward)."""
    pairs = []
    for _, layer in moelora_layers(model):
        A = layer.lora_A.detach().clone().requires_grad_(True)
        B = layer.lora_B.detach().clone().requires_grad_(True)
        pairs.append((A, B, torch.randn_like(A), torch.randn_like(B)))

    def once() -> None:
        for A, B, grad_A, grad_B in pairs:
            A.grad = B.grad = None
            torch.autograd.backward(precondition_factors(A, B, REG), (grad_A, grad_B))

    once()
    times = []
    for _ in range(reps):
        start = time.process_time()
        once()
        times.append(time.process_time() - start)
    return times


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batch", default="4x128", help="batch x sequence length")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--reps", type=int, nargs="+", default=[21, 9],
                        help="interleaved steps per optimizer, one number per dtype (the last one repeats)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads wait on each "
                             "other whenever another job holds a core)")
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama, one repetition")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file to update (default benchmarks/RESULTS.md; none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG plot to write (default benchmarks/optimizer.png; none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.batch, args.reps = "2x16", [1]
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "optimizer.png"
    batch = tuple(int(n) for n in args.batch.lower().split("x"))

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    header = ["dtype", "tokens", "layers", "adamw ms/step", "riemannian ms/step", "riemannian/adamw",
              "riemannian/adamw (wall)", "precond alone ms", "alone / adamw step"]
    print("| " + " | ".join(header) + " |", flush=True)
    rows, results, model_name = [], [], ""
    for i, dtype in enumerate(args.dtypes):
        reps = args.reps[min(i, len(args.reps) - 1)]
        model, model_name, steps = build(dtype, args.smoke, batch, args.experts, args.rank, args.top_k)
        timings = interleaved_times(steps, reps=reps, inner={name: 1 for name in steps},
                                    warmup=1 if args.smoke else 2)
        alone = preconditioner_alone(model, max(3, 3 * reps))
        times = timings.cpu
        ratios = paired_ratios(times["riemannian"], times["adamw"])
        wall_ratios = paired_ratios(timings.wall["riemannian"], timings.wall["adamw"])
        alone_share = median(alone) / median(times["adamw"])
        layers = sum(1 for _ in moelora_layers(model))
        row = [dtype, f"{batch[0]}x{batch[1]}", str(layers), fmt_ms(median(times["adamw"])),
               fmt_ms(median(times["riemannian"])), fmt_ratio(ratios), fmt_ratio(wall_ratios), fmt_ms(median(alone)),
               f"{alone_share:.2%}"]
        rows.append(row)
        results.append((dtype, times, ratios, alone))
        print("| " + " | ".join(row) + " |", flush=True)
        del model, steps

    summary = [f"Target: preconditioning under {TARGET:.0%} of the step time."]
    for dtype, times, ratios, alone in results:
        q1, med, q3 = quantiles(ratios)
        share = median(alone) / median(times["adamw"])
        summary.append(f"- {dtype}: paired step-time overhead {med - 1:+.1%} (IQR {q1 - 1:+.1%} to {q3 - 1:+.1%}; "
                       f"{'met' if med - 1 < TARGET else 'MISSED'}); preconditioner work alone {share:.2%} of a "
                       f"plain step ({'met' if share < TARGET else 'MISSED'})")
    print("\n" + "\n".join(summary))
    if args.results is not None:
        body = [
            "## Benchmark 2: Riemannian preconditioning per training step vs plain AdamW",
            "",
            f"Command: `{command_line()}`",
            "",
            *machine_lines(["transformers"], load_before),
            f"- model: {model_name}; MoE-LoRA E={args.experts}, r={args.rank}, top-{args.top_k}, dropout 0.05, "
            f"sqrt gate rescaling, on q,k,v,o; random token ids, causal LM loss; reg {REG:g}, lr {LR:g}",
            "- step: forward + backward + AdamW step + zero_grad; `adamw` and `riemannian` steps alternate on "
            "the same model (their AdamW states are separate), after 2 warm-up steps each",
            "- times are CPU time of this process (one torch thread: the work done, not the time other jobs "
            "held the core), medians; `riemannian/adamw`: median [25th-75th percentile] of per-round paired "
            "step-time ratios, in CPU time and, for comparison, wall-clock time; `precond alone`: the "
            "preconditioner's own work for every layer (Gram matrices + batched Cholesky solves) timed by "
            "itself, median of repeated runs",
            "",
            markdown_table(header, rows),
            "",
            *summary,
        ]
        update_results(args.results, "optimizer", "\n".join(body), plot=args.plot)
        print(f"\nwrote {args.results}")
    if args.plot is not None:
        plot(results, args.plot)
        print(f"wrote {args.plot}")


def plot(results, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for i, (_dtype, times, ratios, alone) in enumerate(results):
        for j, name in enumerate(("adamw", "riemannian")):
            values = [t * 1e3 for t in times[name]]
            axes[0].scatter([i + (j - 0.5) * 0.3] * len(values), values, s=12, label=name if i == 0 else None,
                            color=f"C{j}")
        axes[1].boxplot([(r - 1) * 100 for r in ratios], positions=[i], widths=0.4)
        axes[1].scatter([i + 0.3], [median(alone) / median(times["adamw"]) * 100], marker="x", color="C3",
                        label="preconditioner alone" if i == 0 else None)
    names = [r[0] for r in results]
    axes[0].set_xticks(range(len(names)), names)
    axes[0].set_ylabel("CPU ms per training step (every sample)")
    axes[0].legend()
    axes[1].axhline(TARGET * 100, ls="--", color="grey", lw=0.8, label=f"target {TARGET:.0%}")
    axes[1].axhline(0, color="black", lw=0.5)
    axes[1].set_xticks(range(len(names)), names)
    axes[1].set_ylabel("step-time overhead of preconditioning, % (paired)")
    axes[1].legend()
    save_figure(fig, "Benchmark 2: Riemannian preconditioning vs plain AdamW, SmolLM2-135M, E=4 r=8 top-2", path)


if __name__ == "__main__":
    main()
