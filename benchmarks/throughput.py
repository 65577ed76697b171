"""Benchmark 3: end-to-end training throughput (tokens/s), FLOP utilisation and per-rank peak memory.

Runs, each a real launch of `deepspeed --num_gpus W` through benchmarks/peak_memory.py (which records
every rank's peak resident memory at exit):
  moelora  launcher/train.py --config CONFIG (the quickstart: MoE-LoRA 4 experts x r8 top-2 on q/k/v/o,
           Riemannian AdamW, sqrt gate rescaling), bf16, ZeRO-3, 2 ranks
  peft     benchmarks/peft_lora_train.py --mode peft: PEFT LoRA r=8 on q/k/v/o, torch AdamW, same everything else
  frozen   benchmarks/peft_lora_train.py --mode frozen: the frozen base's forward + input-gradient backward alone
and, for memory, moelora again at world size 1 and 2 under ZeRO-0 and ZeRO-3 (--memory-steps steps each).
tokens/s: median of metrics.jsonl's `tokens_per_s` over the steps after the first --skip-steps (all ranks'
non-padding tokens per wall second of a step). FLOPs per token: frozen forward 2*N (N = the parameters
of every nn.Linear, lm_head included) + attention 4*L*S*d (S: mean non-padding tokens per sample);
input-gradient backward the same matmuls again (attention twice); adapters 3x their forward (forward,
input gradient, weight gradient; MoE-LoRA computes all E experts and the router densely). Utilisation:
achieved model FLOP/s over the machine's bf16 matmul peak, measured here with a torch.matmul loop on all
cores. All three runs compute the loss the same way (moelora_ds.training.loss: the output head only at positions
that predict a labelled token), so the lm_head FLOPs counted at every token overstate the work actually done.

Run:  python benchmarks/throughput.py               (writes the `throughput` section of benchmarks/RESULTS.md)
      python benchmarks/throughput.py --smoke       (tiny model, 3 steps, writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from statistics import median
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    command_line,
    free_port,
    launch_env,
    machine_lines,
    markdown_table,
    update_results,
)

DEFAULT_CONFIG = REPO_ROOT / "launcher" / "configs" / "quickstart.yaml"
TRAIN_SCRIPT = REPO_ROOT / "launcher" / "train.py"
BASELINE_SCRIPT = BENCH_DIR / "peft_lora_train.py"
WRAPPER = BENCH_DIR / "peak_memory.py"
PEFT_RANK, PEFT_ALPHA = 8, 16.0


@dataclass
class Run:
    name: str
    method: str  # moelora | peft | frozen
    world_size: int
    stage: int
    steps: int
    output_dir: Path = field(default=Path())
    tokens_per_s: list[float] = field(default_factory=list)
    memory: list[dict] = field(default_factory=list)
    wall_s: float = 0.0

    @property
    def median_tokens_per_s(self) -> float:
        return median(self.tokens_per_s) if self.tokens_per_s else float("nan")

    @property
    def peak_mib(self) -> list[float]:
        return [m["vmhwm_kib"] / 1024 for m in sorted(self.memory, key=lambda m: m["rank"])]


def run_training(run: Run, config: Path, overrides: list[str], root: Path, skip_steps: int,
                 timeout_s: float) -> Run:
    """Launch one run, read its metrics.jsonl and the ranks' memory records."""
    run.output_dir = root / run.name
    shutil.rmtree(run.output_dir, ignore_errors=True)
    memory_dir = run.output_dir / "memory"
    memory_dir.mkdir(parents=True)
    if run.method == "moelora":
        script = [str(TRAIN_SCRIPT)]
    else:
        script = [str(BASELINE_SCRIPT), "--mode", run.method, "--lora-rank", str(PEFT_RANK),
                  "--lora-alpha", str(PEFT_ALPHA)]
    command = ["deepspeed", "--num_gpus", str(run.world_size), "--master_port", str(free_port()), str(WRAPPER),
               *script, "--config", str(config), *overrides, f"--train.max_steps={run.steps}",
               "--data.eval_path=null", f"--train.output_dir={run.output_dir}", "--train.save_every=0",
               "--train.save_every_minutes=0",
               "--train.resume=never", f"--deepspeed=ds_configs/zero{run.stage}.json"]
    env = dict(launch_env(), BENCH_MEMORY_DIR=str(memory_dir))
    log = run.output_dir / "launch.log"
    print(f"[throughput] {run.name}: {' '.join(command[3:])}", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        result = subprocess.run(command, cwd=REPO_ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                timeout=timeout_s)
    run.wall_s = time.perf_counter() - started
    if result.returncode != 0:
        raise RuntimeError(f"{run.name} failed (exit {result.returncode}); last lines of {log}:\n"
                           + "\n".join(log.read_text().splitlines()[-40:]))
    records = [json.loads(line) for line in (run.output_dir / "metrics.jsonl").read_text().splitlines()
               if '"tokens_per_s"' in line]
    kept = [r for r in records if r["step"] > skip_steps] or records[-1:]
    run.tokens_per_s = [r["tokens_per_s"] for r in kept]
    run.memory = [json.loads(p.read_text()) for p in sorted(memory_dir.glob("rank*.json"))]
    return run


def measure_matmul_peak(size: int, dtype: torch.dtype, seconds: float) -> float:
    """Best FLOP/s of back-to-back (size x size) @ (size x size) products on all cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        torch.matmul(a, b)
        best, deadline = 0.0, time.perf_counter() + seconds
        while True:
            start = time.perf_counter()
            for _ in range(3):
                torch.matmul(a, b)
            best = max(best, 3 * 2 * size ** 3 / (time.perf_counter() - start))
            if time.perf_counter() > deadline:
                return best
    finally:
        torch.set_num_threads(threads)


@dataclass
class ModelShape:
    linear_params: int  # every nn.Linear weight, lm_head included (tied or not)
    layers: int
    hidden: int
    adapted: list[tuple[int, int]]  # (in, out) of every adapted linear


def model_shape(config_path: Path, overrides: list[str]) -> tuple[ModelShape, object]:
    from torch import nn
    from transformers import AutoModelForCausalLM

    from moelora_ds.adapters.inject import find_target_linears
    from moelora_ds.config import load_config
    from moelora_ds.training.preflight import base_model_config

    config = load_config(config_path, overrides)
    model_config = base_model_config(config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    targets = find_target_linears(model, config.moelora)
    return ModelShape(linear_params=sum(m.weight.numel() for m in linears.values()),
                      layers=model_config.num_hidden_layers, hidden=model_config.hidden_size,
                      adapted=[(linears[t].in_features, linears[t].out_features) for t in targets]), config


def flops_per_token(shape: ModelShape, method: str, seq: float, moe) -> dict[str, float]:
    """Model FLOPs per trained token: frozen forward, input-gradient backward, adapters (3x their forward)."""
    attention = 4 * shape.layers * seq * shape.hidden
    forward = 2 * shape.linear_params + attention
    backward = 2 * shape.linear_params + 2 * attention
    adapters = 0.0
    for fan_in, fan_out in shape.adapted:
        if method == "moelora":
            adapters += 3 * (2 * fan_in * moe.num_experts + 2 * moe.num_experts * moe.rank * (fan_in + fan_out))
        elif method == "peft":
            adapters += 3 * 2 * PEFT_RANK * (fan_in + fan_out)
    return {"forward": forward, "backward": backward, "adapters": adapters, "total": forward + backward + adapters}


def smoke_setup(root: Path) -> tuple[Path, list[str]]:
    """The tiny Llama and tokenizer of tests/conftest.py saved to `root`, tiny chat data, a config for them."""
    import yaml

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import build_tiny_model, build_tokenizer, multiple_choice_records, write_jsonl

    model_dir = root / "tiny-llama"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    train = write_jsonl(root / "train.jsonl", multiple_choice_records(32, seed=0))
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["model"].update(name_or_path=str(model_dir), gguf_file=None)
    config["data"].update(train_path=str(train), max_length=64)
    config["train"].update(micro_batch_size=2)
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path, []


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--steps", type=int, default=20, help="steps of each throughput run")
    parser.add_argument("--skip-steps", type=int, default=2, help="first steps left out of the median")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="override train.micro_batch_size")
    parser.add_argument("--memory-steps", type=int, default=4, help="steps of each extra memory run")
    parser.add_argument("--memory-world-sizes", type=int, nargs="*", default=[1, 2])
    parser.add_argument("--memory-stages", type=int, nargs="*", default=[0, 3])
    parser.add_argument("--methods", nargs="+", default=["moelora", "peft", "frozen"],
                        choices=["moelora", "peft", "frozen"])
    parser.add_argument("--peak-size", type=int, default=2048, help="matrix size of the bf16 matmul peak loop")
    parser.add_argument("--peak-seconds", type=float, default=5.0)
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "outputs" / "bench-throughput",
                        help="where the runs' output directories go")
    parser.add_argument("--timeout", type=float, default=3 * 3600, help="seconds per launch")
    parser.add_argument("--section", default="throughput")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 3 steps; writes nothing unless asked")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file to update (default benchmarks/RESULTS.md; none under --smoke)")
    args, extra = parser.parse_known_args(argv)  # anything else: --section.key=value training overrides
    bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")

    load_before = os.getloadavg()
    temp = None
    config = args.config
    overrides = list(extra)
    if args.smoke:
        temp = Path(tempfile.mkdtemp(prefix="bench-throughput-"))
        config, overrides = smoke_setup(temp)
        args.steps, args.memory_steps, args.peak_size, args.peak_seconds = 3, 2, 128, 0.2
        if args.memory_world_sizes == [1, 2] and args.memory_stages == [0, 3]:  # one extra launch: ZeRO-0, 2 ranks
            args.memory_world_sizes, args.memory_stages = [2], [0]
        args.out_dir = temp / "runs"
    elif args.results is None:
        args.results = BENCH_DIR / "RESULTS.md"
    if args.micro_batch_size:
        overrides.append(f"--train.micro_batch_size={args.micro_batch_size}")

    try:
        shape, run_config = model_shape(config, overrides)
        peak = measure_matmul_peak(args.peak_size, torch.bfloat16, args.peak_seconds)
        print(f"[throughput] bf16 matmul peak ({args.peak_size}^3, {os.cpu_count()} threads): {peak / 1e9:.1f} GFLOP/s",
              flush=True)
        runs = [Run(m, m, 2, 3, args.steps) for m in args.methods]
        for world in args.memory_world_sizes:
            for stage in args.memory_stages:
                if not ("moelora" in args.methods and world == 2 and stage == 3):
                    runs.append(Run(f"moelora-w{world}-z{stage}", "moelora", world, stage, args.memory_steps))
        for run in runs:
            run_training(run, config, overrides, args.out_dir, args.skip_steps, args.timeout)
            print(f"[throughput] {run.name}: median {run.median_tokens_per_s:,.1f} tokens/s, peak MiB per rank "
                  f"{', '.join(f'{m:.0f}' for m in run.peak_mib)} ({run.wall_s:.0f} s)", flush=True)
        report(args, runs, shape, run_config, peak, load_before)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


def report(args, runs: list[Run], shape: ModelShape, run_config, peak: float, load_before) -> None:
    world_runs = {r.method: r for r in runs if r.name == r.method}
    seq = mean_tokens_per_sample(run_config)
    header = ["run", "ranks", "ZeRO", "tokens/s (median)", "seq (mean tokens/sample)", "MFLOP/token fwd",
              "MFLOP/token bwd", "MFLOP/token adapters", "model TFLOP/s", "of bf16 peak", "peak MiB per rank"]
    rows = []
    for run in runs:
        row = [run.name, str(run.world_size), str(run.stage), f"{run.median_tokens_per_s:,.1f}"]
        if run.name == run.method:
            flops = flops_per_token(shape, run.method, seq, run_config.moelora)
            achieved = flops["total"] * run.median_tokens_per_s
            row += [f"{seq:.0f}", f"{flops['forward'] / 1e6:.4g}", f"{flops['backward'] / 1e6:.4g}",
                    f"{flops['adapters'] / 1e6:.4g}", f"{achieved / 1e12:.4g}", f"{achieved / peak:.2%}"]
        else:
            row += ["", "", "", "", "", ""]
        row.append(", ".join(f"{m:.0f}" for m in run.peak_mib))
        rows.append(row)
    header_line = "| " + " | ".join(header) + " |"
    print("\n" + header_line)
    for row in rows:
        print("| " + " | ".join(row) + " |")
    ratios = []
    for num, den in (("moelora", "peft"), ("moelora", "frozen"), ("peft", "frozen")):
        if num in world_runs and den in world_runs:
            value = world_runs[num].median_tokens_per_s / world_runs[den].median_tokens_per_s
            ratios.append(f"- tokens/s {num}/{den}: {value:.3f}")
    print("\n" + "\n".join(ratios))
    if args.results is None:
        return
    body = [
        "## Benchmark 3: end-to-end fine-tuning throughput, FLOP utilisation and peak memory",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(["deepspeed", "peft", "transformers"], load_before)[:3],
        f"- load average (1/5/15 min) before: {'/'.join(f'{v:.2f}' for v in load_before)}, after: "
        f"{'/'.join(f'{v:.2f}' for v in os.getloadavg())} (other jobs on these cores lower every number here, "
        f"the matmul peak included)",
        f"- runs: `deepspeed --num_gpus W` of launcher/train.py (`moelora`: {args.config.name}, MoE-LoRA "
        f"{run_config.moelora.num_experts}x r{run_config.moelora.rank} top-{run_config.moelora.top_k}, "
        f"{run_config.optimizer.name}, gate_rescale {run_config.moelora.gate_rescale}) and of "
        f"benchmarks/peft_lora_train.py (`peft`: PEFT LoRA r={PEFT_RANK} alpha={PEFT_ALPHA:g} on the same targets, "
        f"torch AdamW; `frozen`: the frozen base's forward + input-gradient backward, one trainable scalar on "
        f"the embeddings); {run_config.model.dtype}, micro-batch {run_config.train.micro_batch_size} per rank, "
        f"max_length {run_config.data.max_length}; {args.steps} steps (memory-only runs {args.memory_steps})",
        f"- tokens/s: median of metrics.jsonl `tokens_per_s` after the first {args.skip_steps} steps (all ranks' "
        f"non-padding tokens per wall second of a step)",
        f"- FLOPs per token: forward 2*N + 4*L*S*d with N = {shape.linear_params:,} nn.Linear weights (lm_head "
        f"included), L={shape.layers}, d={shape.hidden}, S the mean tokens per sample; input-gradient backward "
        f"2*N + 8*L*S*d; adapters 3x their forward (MoE-LoRA: router and all experts, dense); utilisation = "
        f"model FLOP/s / bf16 matmul peak {peak / 1e9:.1f} GFLOP/s ({args.peak_size}^3 torch.matmul on "
        f"{os.cpu_count()} threads, measured by this script)",
        f"- memory-only runs (`moelora-wW-zS`): {args.memory_steps} steps; their tokens/s is the median after the "
        f"first {args.skip_steps} steps or, with fewer, the last step's (warm-up included: not comparable)",
        "- peak MiB per rank: VmHWM (peak resident set) of each rank's process at exit (benchmarks/peak_memory.py)",
        "",
        markdown_table(header, rows),
        "",
        *ratios,
    ]
    update_results(args.results, args.section, "\n".join(body))
    print(f"\nwrote {args.results}")


def mean_tokens_per_sample(run_config) -> float:
    """Mean tokens per training sample (after truncation), what the attention FLOPs depend on."""
    from moelora_ds.data.records import load_records, tokenize_as_configured
    from moelora_ds.models.loading import load_tokenizer, local_model_dir

    data = run_config.data
    tokenizer = load_tokenizer(local_model_dir(run_config.model))
    records, fmt = load_records(data.train_path, data.format)
    examples, _ = tokenize_as_configured(records, fmt, tokenizer, data)
    return sum(len(e["input_ids"]) for e in examples) / max(1, len(examples))


if __name__ == "__main__":
    main()
