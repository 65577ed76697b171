"""Per-rank memory of evaluating a training checkpoint on 2 ranks: ZeRO-3 partitioned vs loaded whole (ZeRO-0).

    python benchmarks/eval_memory.py [--checkpoint outputs/quickstart] [--config launcher/configs/quickstart.yaml]

Each stage runs `moelora_ds.evaluation.models.load_for_eval` (what `moelora-eval --checkpoint` loads) under the
deepspeed launcher with 2 ranks, then scores 16 questions; every rank reports the bytes of model weights it holds
(ZeRO-3: its partitions; else every parameter) and its peak resident set (VmHWM). Needs a checkpoint: the
quickstart's by default (`bash scripts/quickstart.sh` writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_utils import BENCH_DIR, command_line, free_port, machine_lines, markdown_table, update_results  # noqa: E402

STAGES = {"ZeRO-0 (whole model per rank)": "ds_configs/zero0.json", "ZeRO-3 (partitioned)": "ds_configs/zero3.json"}


def rank_main(args) -> None:
    """One rank: load the checkpoint for evaluation as moelora-eval does, score, report its memory."""
    import torch.distributed as dist

    from moelora_ds.config import load_config
    from moelora_ds.distributed.process_group import end_rank_process, init_distributed
    from moelora_ds.evaluation.evaluate import evaluate_run, prepare_eval_set
    from moelora_ds.evaluation.models import load_for_eval

    rank, world_size = init_distributed()
    config = load_config(args.config, [f"--deepspeed={args.deepspeed}", "--data.eval_max_samples=16"])
    model, tokenizer, what = load_for_eval(config, checkpoint=Path(args.checkpoint), barrier=dist.barrier)
    module = getattr(model, "module", model)
    held = sum((p.ds_tensor if hasattr(p, "ds_tensor") else p).numel() * p.element_size()
               for p in module.parameters())
    result = evaluate_run(model, prepare_eval_set(config.data, tokenizer), tokenizer, rank=rank,
                          world_size=world_size, micro_batch_size=4)
    with open("/proc/self/status") as status:
        hwm = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
    Path(args.out, f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "what": what, "weights_mib": held / 2**20, "peak_rss_mib": hwm / 1024,
         "accuracy": result.get("accuracy")}))
    end_rank_process(0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default="outputs/quickstart")
    parser.add_argument("--config", default="launcher/configs/quickstart.yaml")
    parser.add_argument("--results", type=Path, default=BENCH_DIR / "RESULTS.md")
    parser.add_argument("--rank-of", dest="deepspeed", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.deepspeed:
        rank_main(args)
        return
    load_before = os.getloadavg()
    rows, reports = [], {}
    for name, ds in STAGES.items():
        out = Path(tempfile.mkdtemp(prefix="eval-memory-"))
        subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(free_port()), __file__,
                        "--checkpoint", args.checkpoint, "--config", args.config, "--rank-of", ds, "--out", str(out)],
                       check=True, cwd=REPO_ROOT, capture_output=True, text=True)
        reports[name] = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        for report in reports[name]:
            rows.append([name, str(report["rank"]), f"{report['weights_mib']:.0f}", f"{report['peak_rss_mib']:.0f}",
                         f"{report['accuracy']:.3f}"])
    table = markdown_table(["evaluation", "rank", "weights held MiB", "peak RSS MiB", "accuracy (16 questions)"],
                           rows)
    whole, sharded = (max(r["weights_mib"] for r in reports[name]) for name in STAGES)
    verdict = f"weights per rank under ZeRO-3: {sharded / whole:.2f}x the whole model's (target about 0.5x)"
    print(table)
    print(verdict)
    body = ["## Evaluating a checkpoint on 2 ranks: partitioned vs whole", "", f"Command: `{command_line()}`", "",
            *machine_lines(["deepspeed", "transformers"], load_before),
            f"- checkpoint {args.checkpoint} (config {args.config}), `load_for_eval` as `moelora-eval --checkpoint` "
            f"loads it, 16 questions scored; weights held: the parameters' bytes on the rank (ZeRO-3: its "
            f"partitions), peak RSS: VmHWM at the end (runtime, tokenizer and data included)", "", table, "",
            verdict]
    update_results(args.results, "eval_memory", "\n".join(body))
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
