"""GPU throughput in one call: MoE-LoRA vs PEFT LoRA vs the frozen base on a random-init Llama of a named shape.

The protocol of the GPU throughput issue, one GPU: a random-init Llama-shaped model (`--shape 1b`: hidden
2048, 16 layers, intermediate 8192, 32 heads / 8 KV heads, vocab 49152, tied embeddings, 1.07 B
parameters), bf16, ZeRO-3 (ds_configs/zero3.json), the WordNet quiz packed into rows of 2048 tokens, micro
batch 4, 25 steps, each run a real `deepspeed --num_gpus 1` launch through benchmarks/throughput.py's runner:
  moelora  launcher/train.py: MoE-LoRA E=4 r=8 alpha 16 top-2 on q/k/v/o, riemannian_adamw, sqrt rescaling
  peft     benchmarks/peft_lora_train.py --mode peft: PEFT LoRA r=8 alpha 16 on q/k/v/o, torch AdamW
  frozen   benchmarks/peft_lora_train.py --mode frozen: the frozen base's forward + input-gradient backward
tokens/s: median of metrics.jsonl `tokens_per_s` over steps 4-25. Model FLOPs as benchmarks/throughput.py
counts them; utilisation against the bf16 matmul peak measured here (an 8192^3 matmul loop). Writes the
`gpu` section of benchmarks/RESULTS.md with the device, versions, command and the issue's targets.

Run (on the GPU machine, .gpu/ from scripts/gpu_prepare.sh brought along; the tokenizer and data default to it):
      source scripts/gpu_env.sh && python3 benchmarks/gpu_throughput.py   (writes RESULTS.md, section `gpu`)
      python benchmarks/gpu_throughput.py --smoke           (tiny shape, 2 steps, CPU; writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from throughput import (  # noqa: E402
    PEFT_ALPHA,
    PEFT_RANK,
    Run,
    flops_per_token,
    mean_tokens_per_sample,
    model_shape,
    run_training,
)

from bench_utils import (  # noqa: E402
    BENCH_DIR,
    REPO_ROOT,
    command_line,
    git_revision,
    markdown_table,
    package_version,
    update_results,
)

SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8),  # Llama-3.2-1B-like body
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8),  # Llama-3-8B-like body
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
METHODS = ("moelora", "peft", "frozen")
TARGETS = [("moelora", "peft", 1.05), ("moelora", "frozen", 0.9)]
FROZEN_MFU_TARGET = 0.35


def build_model(out: Path, shape: str, tokenizer, vocab_size: int, device: str) -> Path:
    """A random-init bf16 LlamaForCausalLM of `shape` (seed 0) saved with `tokenizer` as a Hugging Face directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, max_position_embeddings=4096, rope_theta=500000.0,
                         tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **SHAPES[shape])
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def write_config(path: Path, model_dir: Path, train_path: Path, max_length: int, micro_batch_size: int) -> Path:
    import yaml

    path.write_text(yaml.safe_dump({
        "model": {"name_or_path": str(model_dir), "gguf_file": None, "dtype": "bfloat16"},
        "moelora": {"num_experts": 4, "rank": 8, "alpha": 16, "dropout": 0.05, "top_k": 2, "gate_rescale": "sqrt",
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        "optimizer": {"name": "riemannian_adamw", "lr": 0.002, "reg": 1e-6},
        "scheduler": {"name": "constant", "warmup_steps": 0},
        "data": {"train_path": str(train_path), "eval_path": None, "max_length": max_length, "packing": True},
        "train": {"micro_batch_size": micro_batch_size, "grad_accum": 1, "seed": 1, "save_every": 0,
                  "save_every_minutes": 0, "eval_every": 0, "resume": "never"},
        "deepspeed": "ds_configs/zero3.json",
    }))
    return path


def matmul_peak(device: str, size: int, seconds: float) -> float:
    """Best bf16 FLOP/s of back-to-back (size x size) products on `device` (synchronised timing)."""
    a = torch.randn(size, size, device=device).to(torch.bfloat16)
    b = torch.randn(size, size, device=device).to(torch.bfloat16)
    synchronize = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    torch.matmul(a, b)
    synchronize()
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        synchronize()
        best = max(best, 10 * 2 * size ** 3 / (time.perf_counter() - start))
    return best


def device_line(device: str) -> str:
    if device.startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU ({os.cpu_count()} logical cores)"


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip-steps", type=int, default=3, help="first steps left out of the median")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048, help="packed row length")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--tokenizer", type=Path, default=REPO_ROOT / ".gpu" / "tok", help="a saved tokenizer")
    parser.add_argument("--data", type=Path, default=REPO_ROOT / ".gpu" / "data" / "train.jsonl")
    parser.add_argument("--out-dir", type=Path, default=Path(tempfile.gettempdir()) / "moelora-gpu-throughput")
    parser.add_argument("--timeout", type=float, default=600, help="seconds per launch")
    parser.add_argument("--smoke", action="store_true", help="tiny shape, 2 steps, rows of 128; writes nothing "
                                                               "unless --results is given")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    args = parser.parse_args(argv)

    from transformers import AutoTokenizer

    shutil.rmtree(args.out_dir, ignore_errors=True)
    args.out_dir.mkdir(parents=True)
    if args.smoke:
        sys.path.insert(0, str(REPO_ROOT / "tests"))
        from harness import build_tokenizer, multiple_choice_records, write_jsonl

        args.shape, args.steps, args.skip_steps, args.micro_batch_size, args.max_length = "tiny", 2, 0, 2, 128
        tokenizer = build_tokenizer()
        args.data = write_jsonl(args.out_dir / "train.jsonl", multiple_choice_records(32, seed=0))
        vocab_size = len(tokenizer)
    else:
        args.results = args.results or BENCH_DIR / "RESULTS.md"
        tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
        vocab_size = 49152
    device = "cuda:0" if torch.cuda.is_available() else "cpu"
    started = time.perf_counter()
    model_dir = build_model(args.out_dir / f"llama-{args.shape}", args.shape, tokenizer, vocab_size, device)
    config = write_config(args.out_dir / "config.yaml", model_dir, args.data, args.max_length, args.micro_batch_size)
    args.peak_size = 256 if args.smoke else 8192
    peak = matmul_peak(device, args.peak_size, 0.2 if args.smoke else 3.0)
    print(f"[gpu_throughput] {device_line(device)}; bf16 matmul peak {peak / 1e12:.1f} TFLOP/s; model "
          f"{args.shape} in {model_dir}", flush=True)
    runs = []
    for method in args.methods:
        run = run_training(Run(method, method, 1, 3, args.steps), config, [], args.out_dir / "runs", args.skip_steps,
                           args.timeout)
        print(f"[gpu_throughput] {method}: median {run.median_tokens_per_s:,.0f} tokens/s ({run.wall_s:.0f} s)",
              flush=True)
        runs.append(run)
    report(args, runs, config, peak, device, time.perf_counter() - started)


def report(args, runs: list[Run], config: Path, peak: float, device: str, wall_s: float) -> None:
    shape, run_config = model_shape(config, [])
    seq = mean_tokens_per_sample(run_config)
    by_method = {run.method: run for run in runs}
    header = ["run", "tokens/s (median)", "vs peft", "vs frozen", "model TFLOP/s", "MFU", "peak GPU MiB"]
    rows = []
    for run in runs:
        tokens = run.median_tokens_per_s
        achieved = flops_per_token(shape, run.method, seq, run_config.moelora)["total"] * tokens
        ratio = lambda other, tokens=tokens: (f"{tokens / by_method[other].median_tokens_per_s:.2f}x"
                                              if other in by_method else "-")
        gpu = [m.get("gpu_peak_mib") for m in run.memory]
        rows.append([run.name, f"{tokens:,.0f}", ratio("peft"), ratio("frozen"), f"{achieved / 1e12:.1f}",
                     f"{achieved / peak:.1%}", ", ".join(f"{m:,.0f}" for m in gpu if m is not None) or "-"])
    table = markdown_table(header, rows)
    print("\n" + table)
    targets = []
    for num, den, want in TARGETS:
        if num in by_method and den in by_method:
            got = by_method[num].median_tokens_per_s / by_method[den].median_tokens_per_s
            targets.append(f"- {num} / {den}: {got:.2f}x (target >= {want}x): {'met' if got >= want else 'missed'}")
    if "frozen" in by_method:
        frozen = by_method["frozen"].median_tokens_per_s * flops_per_token(shape, "frozen", seq, None)["total"] / peak
        targets.append(f"- frozen MFU: {frozen:.1%} (target >= {FROZEN_MFU_TARGET:.0%}): "
                       f"{'met' if frozen >= FROZEN_MFU_TARGET else 'missed'}")
    print("\n".join(targets))
    if args.results is None:
        return
    body = [
        "## GPU: end-to-end throughput on one GPU (MoE-LoRA vs PEFT LoRA vs the frozen base)",
        "",
        f"Command: `{command_line()}`",
        "",
        f"- device: {device_line(device)}; bf16 matmul peak measured {peak / 1e12:.1f} TFLOP/s "
        f"({args.peak_size}^3 loop)",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, deepspeed "
        f"{package_version('deepspeed')}, transformers {package_version('transformers')}, peft "
        f"{package_version('peft')}; code: git {git_revision()}; measured {time.strftime('%Y-%m-%d %H:%M %Z')}, "
        f"{wall_s:.0f} s in all",
        f"- model: random-init Llama `{args.shape}` ({shape.linear_params / 1e9:.2f} B linear weights, "
        f"{shape.layers} layers, hidden {shape.hidden}), bf16, ZeRO-3, one rank; WordNet quiz packed into rows of "
        f"{args.max_length} (mean sample {seq:.0f} tokens), micro batch {args.micro_batch_size}, {args.steps} steps, "
        f"median tokens/s after step {args.skip_steps}",
        f"- runs: `moelora` launcher/train.py (MoE-LoRA {run_config.moelora.num_experts}x r{run_config.moelora.rank} "
        f"top-{run_config.moelora.top_k} on q/k/v/o, {run_config.optimizer.name}, gate_rescale "
        f"{run_config.moelora.gate_rescale}); `peft` benchmarks/peft_lora_train.py --mode peft (LoRA r={PEFT_RANK} "
        f"alpha={PEFT_ALPHA:g}, torch AdamW); `frozen` --mode frozen (forward + input-gradient backward)",
        "- model FLOPs per token as benchmarks/throughput.py counts them (frozen forward and input-gradient "
        "backward, attention within samples, adapters 3x their forward); MFU = model FLOP/s / the measured peak",
        "",
        table,
        "",
        "Targets:",
        *targets,
    ]
    update_results(args.results, "gpu", "\n".join(body))
    print(f"\nwrote {args.results}")


if __name__ == "__main__":
    main()
