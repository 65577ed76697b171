"""Peak memory of a merged export on the default model (SmolLM2-135M, fp32): streaming vs loading the model whole.

    python benchmarks/export_memory.py [--max-shard-size 50MB 2GB] [--num-experts 4] [--rank 8]

Every measurement runs in a fresh process: random adapters for the default targets (q, k, v, o) are built,
then the export runs; reported are the process's peak RSS (`resource.getrusage().ru_maxrss`), its RSS just
before the export started, and the difference (what the export itself needed). `streaming` is
`moelora_ds.export.export_merged`; `whole` is the usual alternative (from_pretrained, inject, load the
adapters, save_pretrained) for comparison. The default model is converted from GGUF once and cached.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))


def _rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:")) / 1024


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def measure(mode: str, model_dir: Path, max_shard_size: str, num_experts: int, rank: int) -> dict:
    """One export in this process; returns its memory figures."""
    import torch

    from moelora_ds.checkpoint_adapters import expected_layers
    from moelora_ds.export import export_merged
    from moelora_ds.merge import expected_adapters
    from moelora_ds.moelora_config import MoELoRAConfig
    from moelora_ds.safetensors_stream import parse_size

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

            from moelora_ds.inject import adapter_parameters, inject_moelora

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-shard-size", nargs="+", default=["50MB", "2GB"])
    parser.add_argument("--num-experts", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "MODEL_DIR", "SHARD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, model_dir, shard = args.child
        print(json.dumps(measure(mode, Path(model_dir), shard, args.num_experts, args.rank)))
        return

    from moelora_ds.config import ModelConfig
    from moelora_ds.model_loading import local_model_dir

    model_dir = local_model_dir(ModelConfig())
    print(f"model: {model_dir} ({sum(p.stat().st_size for p in model_dir.glob('*.safetensors')) / 2**20:.0f} MiB "
          f"of safetensors); adapters: {args.num_experts} experts, rank {args.rank}, q/k/v/o of every layer\n")
    print("| mode | max shard | shards | largest shard MiB | RSS before MiB | peak RSS MiB | export peak MiB | s |")
    print("|---|---|---|---|---|---|---|---|")
    for shard in args.max_shard_size:
        for mode in ("streaming", "whole"):
            result = subprocess.run([sys.executable, __file__, "--child", mode, str(model_dir), shard,
                                     "--num-experts", str(args.num_experts), "--rank", str(args.rank)],
                                    capture_output=True, text=True, check=True)
            r = json.loads(result.stdout.strip().splitlines()[-1])
            print(f"| {r['mode']} | {r['max_shard_size']} | {r['shards']} | {r['largest_shard_mib']:.0f} | "
                  f"{r['rss_before_mib']:.0f} | {r['peak_rss_mib']:.0f} | {r['export_peak_mib']:.0f} | "
                  f"{r['seconds']:.1f} |", flush=True)


if __name__ == "__main__":
    main()
