"""Benchmark 1: forward+backward time of one MoE-LoRA layer against its baselines, in one process.

Candidates, timed interleaved on the same input and upstream gradient (the input requires grad, as
inside a model; gradients are reset to None between calls, as an optimizer's zero_grad does):
  moe      moelora_ds.MoELoRALinear (stacked experts, sqrt gate rescaling, no preconditioning)
  moe+P    the same layer with the in-backward Riemannian preconditioner on (delta 1e-6)
  peft     PEFT's LoRA Linear of rank E*r (the same adapter parameter count, minus the router)
  loop     the paper's per-expert Python loop: every expert on every token, masked by the gate
  base     the frozen nn.Linear alone

Run:  python benchmarks/layer.py            (full grid, writes benchmarks/RESULTS.md and layer.png)
      python benchmarks/layer.py --smoke    (tiny shapes, 1 repetition, writes nothing unless asked)
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moelora_ds.adapters.config import MoELoRAConfig  # noqa: E402
from moelora_ds.adapters.layer import MoELoRALinear  # noqa: E402

from bench_utils import (  # noqa: E402
    BENCH_DIR,
    calibrate_inner,
    command_line,
    fmt_ms,
    fmt_ratio,
    interleaved_times,
    machine_lines,
    markdown_table,
    paired_ratios,
    quantiles,
    save_figure,
    update_results,
)

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
RANK, ALPHA, DROPOUT, TOP_K = 8, 16.0, 0.05, 2


class PerExpertLoop(nn.Module):
    """The reference computation of the paper's code, written for this benchmark (THUDM/MoELoRA_Riemannian).

    E separate (A_e, B_e) linear pairs; the gate is softmax(W_g x) in the activation dtype, top-k masked
    and renormalised; every expert runs on every token (dropout drawn per expert), its (tokens x out)
    output weighted with the sqrt(g) rescaling and added to the result one expert at a time.
    """

    def __init__(self, base: nn.Linear, num_experts: int, rank: int, top_k: Optional[int]) -> None:
        super().__init__()
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.base = base
        self.top_k = top_k
        self.scaling = ALPHA / rank
        self.lora_A = nn.ModuleList(nn.Linear(base.in_features, rank, bias=False, **kw) for _ in range(num_experts))
        self.lora_B = nn.ModuleList(nn.Linear(rank, base.out_features, bias=False, **kw) for _ in range(num_experts))
        self.gate = nn.Linear(base.in_features, num_experts, bias=False, **kw)
        self.dropout = nn.Dropout(DROPOUT)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base(x)
        g = torch.softmax(self.gate(x).to(result.dtype), dim=-1)
        if self.top_k is not None:
            chosen = F.one_hot(g.topk(self.top_k, dim=-1).indices, g.shape[-1]).sum(dim=-2)
            g = g * chosen
            g = g / g.sum(dim=-1, keepdim=True)
        for e, (lora_A, lora_B) in enumerate(zip(self.lora_A, self.lora_B)):
            out_e = lora_B(lora_A(self.dropout(x))) * self.scaling
            g_e = g[..., e:e + 1]
            sg = g_e.detach().sqrt()
            result = result + sg * out_e + (g_e - sg) * out_e.detach()
        return result


def peft_lora(base: nn.Linear, rank: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    try:  # recent PEFT takes the LoraConfig as well
        layer = LoraLinear(base, "default", config=LoraConfig(r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT),
                           r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT)
    except TypeError:
        layer = LoraLinear(base, "default", r=rank, lora_alpha=ALPHA, lora_dropout=DROPOUT)
    layer.to(dtype=base.weight.dtype)
    base.weight.requires_grad_(False)
    return layer


def layer_class_at(revision: str) -> type[nn.Module]:
    """MoELoRALinear as moelora_ds/layer.py was at a git revision (for before/after comparisons)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(["git", "show", f"{revision}:moelora_ds/layer.py"], cwd=BENCH_DIR.parent,
                            capture_output=True, text=True, check=True).stdout
    source = source.replace("from .", "from moelora_ds.")
    path = Path(tempfile.mkdtemp(prefix="moelora_layer_")) / "layer_at_revision.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("layer_at_revision", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MoELoRALinear


@dataclass
class Case:
    features: int
    tokens: tuple[int, int]
    experts: int
    top_k: Optional[int]
    dtype: str

    @property
    def routing(self) -> str:
        return "dense" if self.top_k is None else f"top-{self.top_k}"


def build_candidates(case: Case, names: list[str], previous: Optional[type[nn.Module]] = None):
    """name -> zero-argument fwd+bwd step, all over one shared frozen base linear."""
    torch.manual_seed(0)
    dtype = DTYPES[case.dtype]
    base = nn.Linear(case.features, case.features, bias=False, dtype=dtype).requires_grad_(False)
    x = torch.randn(*case.tokens, case.features, dtype=dtype, requires_grad=True)
    grad_out = torch.randn(*case.tokens, case.features, dtype=dtype)
    config = MoELoRAConfig(num_experts=case.experts, rank=RANK, alpha=ALPHA, dropout=DROPOUT, top_k=case.top_k)
    modules: dict[str, nn.Module] = {}
    for name in names:
        if name == "base":
            modules[name] = base
        elif name in ("moe", "moe+P", "moe@rev"):
            layer = (previous if name == "moe@rev" else MoELoRALinear)(base, config)
            with torch.no_grad():  # non-zero B, as after a few steps (no effect on the work done)
                layer.lora_B.normal_(0.0, 0.02)
            layer.riemannian_reg = 1e-6 if name == "moe+P" else None
            modules[name] = layer
        elif name == "peft":
            modules[name] = peft_lora(base, case.experts * RANK)
        elif name == "loop":
            modules[name] = PerExpertLoop(base, case.experts, RANK, config.routed_top_k)
        else:
            raise ValueError(name)

    def step_of(module: nn.Module):
        module.train()
        params = [p for p in module.parameters() if p.requires_grad]

        def step() -> None:
            x.grad = None
            for p in params:
                p.grad = None
            module(x).backward(grad_out)

        return step

    return {name: step_of(module) for name, module in modules.items()}


def run_case(case: Case, names: list[str], reps: int, sample_s: float, warmup: int,
             previous: Optional[type[nn.Module]] = None):
    steps = build_candidates(case, names, previous)
    inner = {name: calibrate_inner(step, sample_s) for name, step in steps.items()}
    return interleaved_times(steps, reps=reps, inner=inner, warmup=warmup)


def parse_shapes(text: str) -> list[tuple[int, tuple[int, int]]]:
    """'576:8x128,4096:2x128' -> [(576, (8, 128)), (4096, (2, 128))]."""
    shapes = []
    for item in text.split(","):
        features, tokens = item.split(":")
        batch, seq = tokens.lower().split("x")
        shapes.append((int(features), (int(batch), int(seq))))
    return shapes


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="576:8x128,4096:2x128",
                        help="features:batchxseq, comma-separated (square in->out layers, like q_proj)")
    parser.add_argument("--experts", type=int, nargs="+", default=[4, 8, 20])
    parser.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=list(DTYPES))
    parser.add_argument("--routing", nargs="+", default=["dense", "top2"], choices=["dense", "top2"])
    parser.add_argument("--reps", type=int, default=11, help="interleaved samples per candidate and case")
    parser.add_argument("--sample-ms", type=float, default=20.0, help="target duration of one sample")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (default 1: on a shared 2-core machine, 2 OpenMP threads wait on each "
                             "other whenever another job holds a core, and small ops get 10-50x slower)")
    parser.add_argument("--no-precond", action="store_true", help="skip the moe+P candidate")
    parser.add_argument("--compare-rev", default=None, metavar="REV",
                        help="also time MoELoRALinear from moelora_ds/layer.py at this git revision (`moe@rev`)")
    parser.add_argument("--section", default="layer", help="name of the RESULTS.md section to write")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes, one repetition, a quick check")
    parser.add_argument("--results", type=Path, default=None,
                        help="results file to update (default benchmarks/RESULTS.md; none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="PNG plot to write (default benchmarks/layer.png; none under --smoke)")
    args = parser.parse_args(argv)
    if args.smoke:
        args.shapes, args.experts, args.reps, args.sample_ms = "64:2x16", [4], 1, 0.0
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "layer.png"

    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    names = ["base", "moe", *([] if args.no_precond else ["moe+P"]), "peft", "loop"]
    previous = None
    if args.compare_rev:
        previous = layer_class_at(args.compare_rev)
        names.append("moe@rev")
    cases = [Case(features, tokens, experts, None if routing == "dense" else TOP_K, dtype)
             for features, tokens in parse_shapes(args.shapes)
             for experts in args.experts for dtype in args.dtypes for routing in args.routing]

    header = ["in=out", "tokens", "E", "routing", "dtype", *[f"{n} ms" for n in names],
              "moe/peft", "loop/moe", "loop/moe adapters", "moe/base"]
    if "moe+P" in names:
        header.append("moe+P/moe")
    if previous is not None:
        header.append("moe/moe@rev")
    header += ["moe/peft wall", "loop/moe wall"]
    rows, results = [], []
    print("| " + " | ".join(header) + " |", flush=True)
    for case in cases:
        timings = run_case(case, names, args.reps, args.sample_ms / 1e3, warmup=1 if args.smoke else 3,
                           previous=previous)
        times, wall = timings.cpu, timings.wall
        ratios = {
            "moe/peft": paired_ratios(times["moe"], times["peft"]),
            "loop/moe": paired_ratios(times["loop"], times["moe"]),
            "moe/base": paired_ratios(times["moe"], times["base"]),
        }
        if "moe+P" in names:
            ratios["moe+P/moe"] = paired_ratios(times["moe+P"], times["moe"])
        if previous is not None:
            ratios["moe/moe@rev"] = paired_ratios(times["moe"], times["moe@rev"])
        ratios["moe/peft wall"] = paired_ratios(wall["moe"], wall["peft"])
        ratios["loop/moe wall"] = paired_ratios(wall["loop"], wall["moe"])
        adapters = adapter_only_ratio(times)
        row = [str(case.features), f"{case.tokens[0]}x{case.tokens[1]}", str(case.experts), case.routing, case.dtype,
               *[fmt_ms(median(times[n])) for n in names], fmt_ratio(ratios["moe/peft"]), fmt_ratio(ratios["loop/moe"]),
               f"{adapters:.1f}", fmt_ratio(ratios["moe/base"]),
               *([fmt_ratio(ratios["moe+P/moe"])] if "moe+P" in names else []),
               *([fmt_ratio(ratios["moe/moe@rev"])] if previous is not None else []),
               fmt_ratio(ratios["moe/peft wall"]), fmt_ratio(ratios["loop/moe wall"])]
        rows.append(row)
        results.append((case, times, ratios))
        print("| " + " | ".join(row) + " |", flush=True)

    table = markdown_table(header, rows)
    summary = target_summary(results)
    print("\n" + "\n".join(summary))
    if args.results is not None:
        body = [
            "## Benchmark 1: one MoE-LoRA layer, forward + backward"
            + (f" (this layer against git revision {args.compare_rev})" if previous is not None else ""),
            "",
            f"Command: `{command_line()}`",
            "",
            *machine_lines(["peft", "transformers"], load_before),
            f"- per case: r={RANK}, alpha={ALPHA:g}, dropout {DROPOUT} (train mode), sqrt gate rescaling, no bias, "
            f"input requires grad, gradients reset to None per call; {args.reps} interleaved samples per "
            f"candidate, each about {args.sample_ms:g} ms of back-to-back calls, after warm-up",
            "- candidates: `moe` MoELoRALinear; `moe+P` the same with the Riemannian preconditioner in backward; "
            "`peft` PEFT LoRA of rank E*r; `loop` the paper's per-expert loop (every expert on every token, "
            "masked by the gate); `base` the frozen nn.Linear alone"
            + (f"; `moe@rev` MoELoRALinear as of git revision {args.compare_rev}" if previous is not None else ""),
            "- `... ms`: median CPU time of this process per forward+backward (one torch thread: the work done, "
            "not the time other jobs held the core); ratios: median [25th-75th percentile] of per-round paired "
            "ratios of CPU times; `... wall`: the same from wall-clock times; `loop/moe adapters`: "
            "(loop - base) / (moe - base) from the medians, the adapters' own cost without the frozen matmul",
            "",
            table,
            "",
            *summary,
        ]
        update_results(args.results, args.section, "\n".join(body), plot=args.plot)
        print(f"\nwrote {args.results}")
    if args.plot is not None:
        plot(results, names, args.plot)
        print(f"wrote {args.plot}")


def adapter_only_ratio(times: dict[str, list[float]]) -> float:
    """(loop - base) / (moe - base) of the medians: what the adapters themselves cost, frozen matmul excluded."""
    base = median(times["base"])
    return (median(times["loop"]) - base) / max(median(times["moe"]) - base, 1e-9)


def target_summary(results) -> list[str]:
    """The two targets, at E=8: moe within 1.3x of PEFT LoRA rank 64, and at least 3x faster than the loop."""
    lines = ["Targets at E=8, r=8 (moe/peft <= 1.3, loop/moe >= 3; CPU-time medians of paired ratios):"]
    at_target = [(c, t, r) for c, t, r in results if c.experts == 8]
    if not at_target:
        return lines + ["- no E=8 case in this run"]
    for case, times, ratios in at_target:
        peft_ratio = quantiles(ratios["moe/peft"])[1]
        loop_ratio = quantiles(ratios["loop/moe"])[1]
        lines.append(f"- {case.features} {case.dtype} {case.routing}: moe/peft {peft_ratio:.2f} "
                     f"({'met' if peft_ratio <= 1.3 else 'MISSED'}), loop/moe {loop_ratio:.2f} "
                     f"({'met' if loop_ratio >= 3 else 'MISSED'}; adapters alone {adapter_only_ratio(times):.1f}x)")
    return lines


def plot(results, names: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = sorted({c.features for c, _, _ in results})
    fig, axes = plt.subplots(2, len(shapes), figsize=(7 * len(shapes), 8), squeeze=False)
    for col, features in enumerate(shapes):
        chosen = [(c, t, r) for c, t, r in results if c.features == features]
        labels = [f"E{c.experts} {c.routing}\n{c.dtype}" for c, _, _ in chosen]
        positions = range(len(chosen))
        ax = axes[0][col]
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            ax.bar([p + (i - (len(names) - 1) / 2) * width for p in positions],
                   [median(t[name]) * 1e3 for _, t, _ in chosen], width, label=name)
        ax.set_yscale("log")
        ax.set_ylabel("CPU ms per forward+backward (median)")
        ax.set_title(f"{features}->{features}, {chosen[0][0].tokens[0]}x{chosen[0][0].tokens[1]} tokens")
        ax.set_xticks(list(positions), labels, fontsize=7)
        ax.legend(fontsize=8)
        ax = axes[1][col]
        for key, marker, target in (("moe/peft", "o", 1.3), ("loop/moe", "s", 3.0)):
            qs = [quantiles(r[key]) for _, _, r in chosen]
            ax.errorbar(list(positions), [q[1] for q in qs],
                        yerr=[[q[1] - q[0] for q in qs], [q[2] - q[1] for q in qs]], fmt=marker, label=key, capsize=3)
            ax.axhline(target, ls="--", lw=0.8, color="grey")
        ax.set_yscale("log")
        ax.set_ylabel("paired CPU-time ratio (median, IQR)\ndashed: targets 1.3 and 3")
        ax.set_xticks(list(positions), labels, fontsize=7)
        ax.legend(fontsize=8)
    save_figure(fig, "Benchmark 1: one MoE-LoRA layer (r=8) vs PEFT LoRA rank E*r, per-expert loop, base linear", path)


if __name__ == "__main__":
    main()
