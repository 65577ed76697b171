"""Where one rank's training step goes, without DeepSpeed: MoE-LoRA vs PEFT LoRA vs the frozen base.

Benchmark 3 measures tokens/s of 2-rank ZeRO-3 runs. This script takes the launcher and DeepSpeed away and
times, in one process, the step of one rank of those runs (same model and dtype, the same real micro-batch
of the WordNet quiz, the same loss) for the three trainers, interleaved:
  moelora  MoE-LoRA from the config (quickstart: E=4 r=8 top-2, sqrt gate rescaling, on q,k,v,o) + the
           Riemannian AdamW, router load-balancing loss as in the engine
  peft     PEFT LoRA r=8 alpha=16 on the same targets + torch AdamW
  frozen   one trainable scalar on the input embeddings + SGD: forward and input-gradient backward only
A step is forward + loss + backward + optimizer step + zero_grad. Then one step of each runs under
torch.profiler, split into forward / backward / optimizer, and the operators that cost MoE-LoRA more
than PEFT LoRA are listed. In-process ratios set against benchmark 3's tokens/s ratios split the
end-to-end gap into the model's own compute (here) and what ZeRO-3 and the launch add (the rest).

Run:  python benchmarks/step_profile.py           (writes its RESULTS.md section and step_profile.png)
      python benchmarks/step_profile.py --smoke   (tiny random Llama, random batch, writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import defaultdict
from pathlib import Path
from statistics import median
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from optimizer import load_model  # noqa: E402
from peft_lora_train import add_peft_lora, add_trainable_scalar  # noqa: E402

from moelora_ds.adapters.inject import inject_moelora, router_aux_loss  # noqa: E402
from moelora_ds.adapters.optimizer import create_riemannian_optimizer  # noqa: E402
from moelora_ds.config import load_config  # noqa: E402
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

TRAINERS = ("moelora", "peft", "frozen")
PHASES = ("forward", "backward", "optimizer")
MATMUL_OPS = {"aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"}


def quiz_batch(config, micro_batch_size: int) -> dict[str, torch.Tensor]:
    """The first micro-batch rank 0 of a 2-rank run trains on (real tokens, padding and labels)."""
    from moelora_ds.data.batches import ShardedBatches
    from moelora_ds.data.records import load_records, tokenize_as_configured
    from moelora_ds.models.loading import load_tokenizer, local_model_dir

    tokenizer = load_tokenizer(local_model_dir(config.model))
    records, fmt = load_records(str(REPO_ROOT / config.data.train_path), config.data.format)
    examples, _ = tokenize_as_configured(records, fmt, tokenizer, config.data)
    batches = ShardedBatches(examples, micro_batch_size=micro_batch_size, rank=0, world_size=2, seed=config.train.seed,
                             max_length=config.data.max_length, pad_token_id=tokenizer.pad_token_id)
    return next(iter(batches))


def random_batch(vocab_size: int, micro_batch_size: int, length: int = 16) -> dict[str, torch.Tensor]:
    input_ids = torch.randint(0, vocab_size, (micro_batch_size, length))
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids.clone()}


def build_trainer(name: str, config, smoke: bool, batch: dict) -> Callable[[], None]:
    """A fresh base model with `name`'s trainable part and optimizer; returns its step function."""
    model, _ = load_model("bf16" if config.model.dtype == "bfloat16" else "fp32", smoke)
    opt, moe = config.optimizer, config.moelora
    torch.manual_seed(config.train.seed)
    if name == "moelora":
        inject_moelora(model, moe)
        optimizer = create_riemannian_optimizer(model, torch.optim.AdamW, lr=opt.lr, reg=opt.reg,
                                                betas=tuple(opt.betas), eps=opt.eps)
    elif name == "peft":
        add_peft_lora(model, moe.target_modules, moe.rank, moe.alpha, moe.dropout, model.dtype)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=opt.lr,
                                      betas=tuple(opt.betas), eps=opt.eps)
    else:
        add_trainable_scalar(model, model.dtype)
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1e-6)
    model.train()

    def step() -> None:
        with torch.profiler.record_function("forward"):
            loss = causal_lm_loss(model, batch)
            aux = router_aux_loss(model)
            if aux is not None:
                loss = loss + aux.to(loss.dtype)
        with torch.profiler.record_function("backward"):
            loss.backward()
        with torch.profiler.record_function("optimizer"):
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return step


def profile_steps(step: Callable[[], None], count: int) -> tuple[dict[str, float], dict[str, float]]:
    """`count` separately profiled steps: median ms per phase (with children) and self ms per operator."""
    phases, ops = defaultdict(list), defaultdict(list)
    for _ in range(count):
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            step()
        for event in prof.key_averages():
            if event.key in PHASES:
                phases[event.key].append(event.cpu_time_total / 1e3)
            else:
                ops[event.key].append(event.self_cpu_time_total / 1e3)
    return ({k: median(v) for k, v in phases.items()},
            {k: median(v + [0.0] * (count - len(v))) for k, v in ops.items()})


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=REPO_ROOT / "launcher" / "configs" / "quickstart.yaml")
    parser.add_argument("--reps", type=int, default=9, help="interleaved steps per trainer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one rank of the 2-rank run: 1)")
    parser.add_argument("--profiled-steps", type=int, default=5, help="profiled steps per trainer (medians)")
    parser.add_argument("--top-ops", type=int, default=8, help="operators listed by extra cost")
    parser.add_argument("--smoke", action="store_true", help="tiny random Llama, random batch, 2 repetitions")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default benchmarks/step_profile.png (none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.reps, args.profiled_steps = 2, 1
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "step_profile.png"

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    config = load_config(args.config)
    micro_batch_size = config.train.micro_batch_size
    batch = random_batch(256, micro_batch_size) if args.smoke else quiz_batch(config, micro_batch_size)
    tokens = int(batch["attention_mask"].sum())
    steps = {name: build_trainer(name, config, args.smoke, batch) for name in TRAINERS}
    cpu = interleaved_times(steps, reps=args.reps, inner={name: 1 for name in steps}, warmup=2).cpu
    profiles = {name: profile_steps(step, args.profiled_steps) for name, step in steps.items()}

    header = ["trainer", "CPU ms/step", "tokens/s (CPU time)", "vs frozen", *[f"{p} ms" for p in PHASES],
              "matmul share"]
    rows = []
    for name in TRAINERS:
        phases, ops = profiles[name]
        matmul = sum(ms for op, ms in ops.items() if op in MATMUL_OPS) / sum(ops.values())
        rows.append([name, fmt_ms(median(cpu[name])), f"{tokens / median(cpu[name]):.0f}",
                     fmt_ratio(paired_ratios(cpu["frozen"], cpu[name])), *[f"{phases.get(p, 0):.1f}" for p in PHASES],
                     f"{matmul:.0%}"])
    moe_ops, peft_ops = profiles["moelora"][1], profiles["peft"][1]
    extra = sorted(((moe_ops.get(op, 0) - peft_ops.get(op, 0), op) for op in set(moe_ops) | set(peft_ops)),
                   reverse=True)[:args.top_ops]
    op_rows = [[f"`{op}`", f"{moe_ops.get(op, 0):.1f}", f"{peft_ops.get(op, 0):.1f}", f"{diff:+.1f}"]
               for diff, op in extra]
    moe_vs_peft = paired_ratios(cpu["peft"], cpu["moelora"])
    summary = [f"- in one process, tokens/s moelora/peft {fmt_ratio(moe_vs_peft)}, moelora/frozen "
               f"{fmt_ratio(paired_ratios(cpu['frozen'], cpu['moelora']))}, peft/frozen "
               f"{fmt_ratio(paired_ratios(cpu['frozen'], cpu['peft']))} (median [25th-75th percentile] of "
               f"per-round paired ratios)"]
    tables = markdown_table(header, rows) + "\n\nOperators by extra self CPU time, MoE-LoRA over PEFT LoRA " \
        "(median of the profiled steps, ms):\n\n" + \
        markdown_table(["operator", "moelora", "peft", "difference"], op_rows)
    print(tables + "\n\n" + "\n".join(summary))
    if args.plot is not None:
        plot({name: profiles[name][0] for name in TRAINERS}, args.plot)
        print(f"wrote {args.plot}")
    if args.results is None:
        return
    moe = config.moelora
    body = [
        "## Benchmark 3b: one rank's training step in one process, MoE-LoRA vs PEFT LoRA vs frozen base",
        "",
        f"Command: `{command_line()}`",
        "",
        *machine_lines(["transformers", "peft"], load_before),
        f"- model: {config.model.gguf_file or config.model.name_or_path}, {config.model.dtype}; batch: the first "
        f"micro-batch of rank 0 of the 2-rank quickstart run ({micro_batch_size} questions, "
        f"{batch['input_ids'].shape[1]} positions, {tokens} non-padding tokens); loss as in the engine "
        f"(lm_head only at labelled positions)",
        f"- moelora: MoE-LoRA {moe.num_experts}x r{moe.rank} top-{moe.top_k} gate_rescale {moe.gate_rescale} on "
        f"{', '.join(moe.target_modules)} + Riemannian AdamW; peft: PEFT LoRA r{moe.rank} alpha {moe.alpha:g} + "
        f"AdamW; frozen: one trainable scalar on the input embeddings + SGD",
        f"- {args.threads} torch thread(s); CPU time of this process per step, median of {args.reps} interleaved "
        f"rounds after 2 warm-up steps; `vs frozen`: tokens/s relative to the frozen base (paired per round); "
        f"phases and operators: medians over {args.profiled_steps} torch.profiler steps each (elapsed time on "
        f"the thread, profiler overhead included)",
        "",
        tables,
        "",
        *summary,
    ]
    update_results(args.results, "step_profile", "\n".join(body), plot=args.plot)
    print(f"wrote {args.results}")


def plot(phases: dict[str, dict[str, float]], path: Path) -> None:
    """Stacked bars: forward, backward and optimizer ms of each trainer's profiled step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    bottom = [0.0] * len(phases)
    for phase in PHASES:
        values = [phases[name].get(phase, 0.0) for name in phases]
        ax.bar(list(phases), values, bottom=bottom, label=phase)
        bottom = [b + v for b, v in zip(bottom, values)]
    ax.set_ylabel("ms per step (median profiled step)")
    ax.legend()
    save_figure(fig, "Benchmark 3b: one rank's step by phase", path)


if __name__ == "__main__":
    main()
