"""Peak memory of a merged export on the default model (SmolLM2-135M, fp32): streaming vs loading the model whole.

    python benchmarks/export_memory.py [--max-shard-size 20MB 2GB] [--num-experts 4] [--rank 8]
    python benchmarks/export_memory.py --smoke   (a tiny random Llama, writes nothing unless asked)

Every measurement runs in a fresh process: random adapters for the default targets (q, k, v, o) are built,
then the export runs; reported are the process's peak RSS (`resource.getrusage().ru_maxrss`), its RSS just
before the export started, and the difference (what the export itself needed). `streaming` is
`moelora_ds.export.export_merged`; `whole` is the usual alternative (from_pretrained, inject, load the
adapters, save_pretrained) for comparison. The default model is converted from GGUF once and cached.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import (  # noqa: E402
    BENCH_DIR,
    TINY_LLAMA_NAME,
    command_line,
    machine_lines,
    markdown_table,
    save_figure,
    tiny_llama,
    update_results,
)

MODES = ("streaming", "whole")
HEADER = ["mode", "max shard", "shards", "largest shard MiB", "RSS before MiB", "peak RSS MiB", "export peak MiB", "s"]


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, model_dir: Path, max_shard_size: str, num_experts: int, rank: int) -> dict:
    """One export in this process; returns its memory figures."""
    import torch

    from moelora_ds.adapters.config import MoELoRAConfig
    from moelora_ds.adapters.io import expected_adapters
    from moelora_ds.checkpoints.adapters import expected_layers
    from moelora_ds.export.exporter import export_merged
    from moelora_ds.export.safetensors_stream import parse_size

    config = MoELoRAConfig(num_experts=num_experts, rank=rank)
    generator = torch.Generator().manual_seed(0)
    adapters = {name: torch.randn(shape, generator=generator) * 0.01
                for name, shape in expected_adapters(expected_layers(model_dir, config), config).items()}
    with tempfile.TemporaryDirectory(dir=REPO_ROOT / "benchmarks") as scratch:
        out = Path(scratch) / "export"
        before, started = _rss_mib(), time.perf_counter()
        if mode == "streaming":
            export_merged(model_dir, adapters, config, out, parse_size(max_shard_size))
        else:
            from transformers import AutoModelForCausalLM

            from moelora_ds.adapters.inject import adapter_parameters, inject_moelora

            model = inject_moelora(AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), config)
            with torch.no_grad():
                for name, param in adapter_parameters(model).items():
                    param.copy_(adapters[name])
            model.save_pretrained(out, max_shard_size=max_shard_size)
        seconds = time.perf_counter() - started
        shards = sorted(out.glob("*.safetensors"))
        return {"mode": mode, "max_shard_size": max_shard_size, "shards": len(shards),
                "largest_shard_mib": max(p.stat().st_size for p in shards) / 2**20,
                "total_mib": sum(p.stat().st_size for p in shards) / 2**20,
                "adapters_mib": sum(t.numel() * t.element_size() for t in adapters.values()) / 2**20,
                "rss_before_mib": before, "peak_rss_mib": _peak_rss_mib(),
                "export_peak_mib": _peak_rss_mib() - before, "seconds": seconds}


def tiny_model_dir(root: Path) -> Path:
    """The --smoke model saved as safetensors."""
    tiny_llama().save_pretrained(root / "tiny-llama")
    return root / "tiny-llama"


def measure_in_child(mode: str, model_dir: Path, shard: str, args) -> dict:
    result = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir), shard,
                             "--num-experts", str(args.num_experts), "--rank", str(args.rank)],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise SystemExit(f"{mode} export with {shard} shards failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shards = list(dict.fromkeys(r["max_shard_size"] for r in results))
    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for offset, mode in zip((-width / 2, width / 2), MODES):
        peaks = [next(r["export_peak_mib"] for r in results if r["mode"] == mode and r["max_shard_size"] == s)
                 for s in shards]
        ax.bar([i + offset for i in range(len(shards))], peaks, width, label=mode)
    ax.set_xticks(range(len(shards)), [f"shards <= {s}" for s in shards])
    ax.set_ylabel("memory the export added (MiB)")
    ax.legend()
    save_figure(fig, "Merged export: peak RSS above the process's baseline", path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-shard-size", nargs="+", default=["20MB", "2GB"])
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a tiny random Llama instead of the default model")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None,
                        help="default benchmarks/export_memory.png (none under --smoke)")
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL_DIR", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_dir, shard = args.child
        print(json.dumps(measure(mode, Path(model_dir), shard, args.num_experts, args.rank)))
        return
    if args.smoke:
        args.max_shard_size = args.max_shard_size[:1]
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "export_memory.png"

    with tempfile.TemporaryDirectory() as scratch:
        if args.smoke:
            model_dir, model_name = tiny_model_dir(Path(scratch)), TINY_LLAMA_NAME
        else:
            from moelora_ds.config import ModelConfig
            from moelora_ds.models.loading import local_model_dir

            model_dir = local_model_dir(ModelConfig())
            model_name = f"SmolLM2-135M-Instruct (de-quantised Q4_1, {model_dir.name})"
        model_mib = sum(p.stat().st_size for p in model_dir.glob("*.safetensors")) / 2**20
        described = (f"model: {model_name}, {model_mib:.0f} MiB of safetensors (fp32); adapters: "
                     f"{args.num_experts} experts, rank {args.rank}, q/k/v/o of every layer")
        print(described + "\n")
        print("| " + " | ".join(HEADER) + " |\n|" + "|".join("---" for _ in HEADER) + "|", flush=True)
        results, rows = [], []
        for shard in args.max_shard_size:
            for mode in MODES:
                r = measure_in_child(mode, model_dir, shard, args)
                results.append(r)
                rows.append([r["mode"], r["max_shard_size"], str(r["shards"]), f"{r['largest_shard_mib']:.0f}",
                             f"{r['rss_before_mib']:.0f}", f"{r['peak_rss_mib']:.0f}",
                             f"{r['export_peak_mib']:.0f}", f"{r['seconds']:.1f}"])
                print("| " + " | ".join(rows[-1]) + " |", flush=True)
    if args.plot is not None:
        plot(results, args.plot)
    if args.results is not None:
        body = [
            "## Merged export: peak memory, streaming vs loading the model whole", "",
            f"Command: `{command_line()}`", "",
            *machine_lines(["transformers", "safetensors"], os.getloadavg())[:3],
            f"- {described}",
            "- each export in a fresh process: `streaming` is moelora_ds.export.export_merged, `whole` is "
            "from_pretrained + inject + load the adapters + save_pretrained; `export peak`: the process's peak RSS "
            "minus its RSS just before the export started (what the export itself needed)", "",
            markdown_table(HEADER, rows),
        ]
        update_results(args.results, "export_memory", "\n".join(body), plot=args.plot)


if __name__ == "__main__":
    main()
