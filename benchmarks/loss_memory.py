"""Peak memory and speed of one training step: the loss from full-vocabulary logits vs through the head in chunks.

    python benchmarks/loss_memory.py [--vocab 128256] [--seq 2048] [--batch 2] [--chunk 1024] [--reps 5]
    python benchmarks/loss_memory.py --smoke   (small shapes, writes nothing unless asked)

A Llama-shape model with a 128k vocabulary and a tiny body (hidden 64, 2 layers: the loss dominates, as the
logits do on a real model's activation peak), MoE-LoRA on q/k/v/o, fp32 on the CPU, a micro-batch of 2 x 2,048
tokens every one of which is labelled. Memory: each mode in a fresh process, one step after the model and batch
are built; `loss peak` is the process's peak resident set during the step minus its resident set before it
(VmHWM - VmRSS). Speed: both modes in one process, `--reps` interleaved rounds, median tokens/s.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    BENCH_DIR,
    command_line,
    machine_lines,
    markdown_table,
    save_figure,
    update_results,
)

MODES = {"full logits": 0}
"""Mode name: train.loss_chunk_tokens (the chunked mode's is --chunk)."""


def _status_kib(key: str) -> int:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":"))


def build(args):
    """The adapted model (fp32, frozen base) and a batch of labelled tokens."""
    import torch
    import transformers

    from moelora_ds.adapters.config import MoELoRAConfig
    from moelora_ds.adapters.inject import inject_moelora

    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=args.vocab, hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=args.seq, tie_word_embeddings=False)
    model = inject_moelora(transformers.AutoModelForCausalLM.from_config(config), MoELoRAConfig(top_k=2)).train()
    ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    return model, batch


def step(model, batch, chunk_tokens: int) -> None:
    from moelora_ds.training.loss import causal_lm_loss

    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, batch, chunk_tokens=chunk_tokens).backward()


def measure_memory(args, chunk_tokens: int) -> dict:
    """In this (fresh) process: resident set before one step and the peak during it, MiB."""
    model, batch = build(args)
    before = _status_kib("VmRSS")
    step(model, batch, chunk_tokens)
    return {"before_mib": before / 1024, "peak_mib": _status_kib("VmHWM") / 1024}


def measure_speed(args, modes: dict[str, int]) -> dict[str, float]:
    """Median tokens/s of each mode, rounds interleaved after one warm-up step each."""
    model, batch = build(args)
    tokens = batch["input_ids"].numel()
    times: dict[str, list[float]] = {name: [] for name in modes}
    for chunk in modes.values():
        step(model, batch, chunk)
    for _ in range(args.reps):
        for name, chunk in modes.items():
            started = time.perf_counter()
            step(model, batch, chunk)
            times[name].append(time.perf_counter() - started)
    return {name: tokens / statistics.median(values) for name, values in times.items()}


def plot(loss_peak: dict[str, float], speed: dict[str, float], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(7, 3.2))
    names = list(loss_peak)
    left.bar(names, [loss_peak[n] for n in names], color=["tab:red", "tab:blue"])
    left.set_ylabel("step peak above the baseline (MiB)")
    right.bar(names, [speed[n] for n in names], color=["tab:red", "tab:blue"])
    right.set_ylabel("tokens/s")
    save_figure(fig, "One training step: full-vocabulary logits vs chunks through the head", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", type=int, default=128256)
    parser.add_argument("--seq", type=int, default=2048)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="vocab 4096, 2 x 256 tokens, chunk 128, 2 rounds")
    parser.add_argument("--results", type=Path, default=None, help="RESULTS.md to update (default: the repo's, "
                                                                   "not with --smoke)")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/loss_memory.png (none under "
                                                                "--smoke)")
    parser.add_argument("--memory-of", type=int, default=None, help=argparse.SUPPRESS)  # child: one mode's memory
    args = parser.parse_args()
    if args.smoke:
        args.vocab, args.seq, args.chunk, args.reps = 4096, 256, 128, 2
    import torch

    torch.set_num_threads(args.threads)
    if args.memory_of is not None:
        print(json.dumps(measure_memory(args, args.memory_of)))
        return
    load_before = os.getloadavg()
    modes = {**MODES, f"chunks of {args.chunk}": args.chunk}
    passed = ["--vocab", str(args.vocab), "--seq", str(args.seq), "--batch", str(args.batch), "--threads",
              str(args.threads)]
    memory = {}
    for name, chunk in modes.items():
        out = subprocess.run([sys.executable, __file__, *passed, "--memory-of", str(chunk)], capture_output=True,
                             text=True, check=True).stdout
        memory[name] = json.loads(out.strip().splitlines()[-1])
    speed = measure_speed(args, modes)
    full, chunked = modes
    loss_peak = {name: m["peak_mib"] - m["before_mib"] for name, m in memory.items()}
    rows = [[name, f"{memory[name]['before_mib']:.0f}", f"{memory[name]['peak_mib']:.0f}", f"{loss_peak[name]:.0f}",
             f"{speed[name]:.0f}"] for name in modes]
    table = markdown_table(["loss", "RSS before step MiB", "peak RSS MiB", "step peak MiB", "tokens/s"], rows)
    drop, speed_ratio = loss_peak[full] / loss_peak[chunked], speed[chunked] / speed[full]
    verdict = (f"step peak {drop:.1f}x lower with chunks (target >= 4x: {'met' if drop >= 4 else 'missed'}); "
               f"tokens/s {speed_ratio:.3f}x the full logits' (target within 5%: "
               f"{'met' if speed_ratio >= 0.95 else 'missed'})")
    print(table)
    print(verdict)
    results = args.results or (None if args.smoke else BENCH_DIR / "RESULTS.md")
    plot_path = args.plot or (None if args.smoke else BENCH_DIR / "loss_memory.png")
    if plot_path is not None:
        plot(loss_peak, speed, plot_path)
    if results is None:
        return
    body = ["## Loss memory: full-vocabulary logits vs chunks through the head", "",
            f"Command: `{command_line()}`", "", *machine_lines(["transformers"], load_before),
            f"- Llama shape, vocabulary {args.vocab}, hidden 64, 2 layers, MoE-LoRA E=4 r=8 top-2 on q/k/v/o, fp32, "
            f"micro-batch {args.batch} x {args.seq} tokens, all labelled; memory in a fresh process per mode "
            f"(peak RSS during one step minus RSS before it), speed {args.reps} interleaved rounds, median", "",
            table, "", verdict]
    update_results(results, "loss_memory", "\n".join(body), plot=plot_path)
    print(f"wrote {results}")


if __name__ == "__main__":
    main()
