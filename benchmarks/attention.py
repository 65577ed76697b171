"""Attention on the CPU: one rank's training step with transformers' SDPA vs eager attention, bf16 and fp32.

`model.attn_implementation: auto` picks eager attention on the CPU in bf16/fp16 and transformers' default (SDPA)
elsewhere. This script measures why: the frozen SmolLM2-135M's forward + input-gradient backward (the part of
a MoE-LoRA step the adapters do not change) on the first real quiz micro-batch, each implementation on its own
copy of the model, interleaved, CPU time per step. The loss of each bf16 run is set against the fp32 model's
(SDPA): how far the bf16 rounding moves it with either implementation, and with SDPA computed in fp32
(`sdpa_fp32`), how much of that distance is the attention's own rounding.

Run:  python benchmarks/attention.py           (writes its RESULTS.md section and attention.png)
      python benchmarks/attention.py --smoke   (tiny random Llama, random batch, writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from statistics import median
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer import load_model  # noqa: E402
from peft_lora_train import add_trainable_scalar  # noqa: E402
from step_profile import quiz_batch, random_batch  # noqa: E402

from moelora_ds.config import load_config  # noqa: E402
from moelora_ds.training.loss import causal_lm_loss  # noqa: E402

from bench_utils import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    command_line,
    fmt_ratio,
    interleaved_times,
    machine_lines,
    markdown_table,
    paired_ratios,
    save_figure,
    update_results,
)

CASES = (("bf16", "sdpa"), ("bf16", "eager"), ("bf16", "sdpa_fp32"), ("fp32", "sdpa"), ("fp32", "eager"))


def sdpa_in_fp32(module, query, key, value, attention_mask, **kwargs):
    """transformers' SDPA attention computed in fp32 for a 16-bit model: how much of the bf16 loss's distance from
    fp32 the attention's own rounding accounts for."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if attention_mask is not None and attention_mask.is_floating_point():
        attention_mask = attention_mask.float()
    output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(), attention_mask,
                                             **kwargs)
    return output.to(query.dtype), weights


def frozen_step(dtype: str, attention: str, smoke: bool, batch: dict) -> tuple[Callable[[], None], float]:
    """The frozen model's step (forward, loss, backward to the input embeddings) and its loss."""
    from transformers import AttentionInterface

    AttentionInterface.register("sdpa_fp32", sdpa_in_fp32)
    model, _ = load_model(dtype, smoke)
    model.set_attn_implementation(attention)
    add_trainable_scalar(model, model.dtype)
    model.train()

    def step() -> None:
        causal_lm_loss(model, batch).backward()
        model.zero_grad(set_to_none=True)

    with torch.no_grad():
        loss = float(causal_lm_loss(model, batch))
    return step, loss


def plot(ms: dict[tuple[str, str], float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.6))
    labels = [f"{dtype} {attention}" for dtype, attention in ms]
    ax.bar(labels, list(ms.values()), color=[{"sdpa": "C0", "eager": "C1"}.get(a, "C2") for _, a in ms])
    ax.tick_params(axis="x", labelsize=7)
    ax.set_ylabel("CPU ms per step (median)")
    ax.grid(axis="y", alpha=0.3)
    save_figure(fig, "Frozen step on the CPU: SDPA vs eager attention", path)


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "launcher" / "configs" / "quickstart.yaml")
    parser.add_argument("--micro-batch-size", type=int, default=16, help="questions per step (the sweep's 16)")
    parser.add_argument("--reps", type=int, default=5, help="interleaved steps per case")
    parser.add_argument("--threads", type=int, default=1, help="torch threads")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random batch, 2 repetitions")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/attention.png (none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps = 2
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "attention.png"

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = load_config(args.config)
    batch = (random_batch(256, args.micro_batch_size) if args.smoke
             else quiz_batch(config, args.micro_batch_size))
    steps, losses = {}, {}
    for dtype, attention in CASES:
        steps[(dtype, attention)], losses[(dtype, attention)] = frozen_step(dtype, attention, args.smoke, batch)
    cpu = interleaved_times(steps, reps=args.reps, inner={case: 1 for case in steps}, warmup=1).cpu
    reference = losses[("fp32", "sdpa")]
    rows = []
    for dtype, attention in CASES:
        sdpa = cpu[(dtype, "sdpa")]
        rows.append([dtype, attention, f"{1000 * median(cpu[(dtype, attention)]):.0f}",
                     fmt_ratio(paired_ratios(sdpa, cpu[(dtype, attention)])), f"{losses[(dtype, attention)]:.4f}",
                     f"{losses[(dtype, attention)] - reference:+.4f}"])
    table = markdown_table(["dtype", "attention", "CPU ms/step", "speed vs SDPA", "loss", "vs fp32 SDPA"], rows)
    print(table)
    if args.plot is not None:
        plot({case: 1000 * median(times) for case, times in cpu.items()}, args.plot)
    if args.results is None:
        return
    tokens = int(batch["attention_mask"].sum())
    body = "\n".join([
        "## Attention on the CPU: SDPA vs eager, one rank's frozen step",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(["transformers"], load_before),
        f"- model: SmolLM2-135M-Instruct (de-quantised Q4_1), frozen; batch: the first quiz micro-batch "
        f"({batch['input_ids'].shape[0]} questions, {batch['input_ids'].shape[1]} positions, {tokens} tokens); "
        f"loss on the answer letter (lm_head at labelled positions); {args.threads} torch thread(s); "
        f"CPU time per step (forward, loss, backward to the input embeddings), median of {args.reps} interleaved "
        "rounds; speed vs SDPA: per-round paired ratio, median [25th-75th percentile]",
        "",
        table,
    ])
    update_results(args.results, "attention", body, plot=args.plot)
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
