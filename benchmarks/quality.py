"""Benchmark 4: robustness to the learning rate (the paper's claim), plain MoE-LoRA vs Riemannian vs Riemannian + sqrt.

A learning-rate sweep under SGD and AdamW of three methods, every other setting equal (config, data,
seeds, steps, batch size):
  plain            optimizer.name=sgd|adamw,                       moelora.gate_rescale=none
  riemannian       optimizer.name=riemannian_sgd|riemannian_adamw, moelora.gate_rescale=none
  riemannian+sqrt  optimizer.name=riemannian_sgd|riemannian_adamw, moelora.gate_rescale=sqrt
each in one or more optimizer forms (`--forms`, quality_report.FORMS): `ours`, the configuration as it is,
and `paper`, the paper's recipe (launcher/configs/paper.yaml: AdamW without bias correction, betas
(0.9, 0.999), eps 1e-6; SGD without momentum; routers at lr 3e-8 with their own clip 1.0, expert
gradients unclipped, a dropout mask per expert); `paper_optimizer` and `paper_routing` are ours with one of the
two halves of those differences (the optimizer's settings; routers, clipping and dropout), to tell which matters,
and `paper_router_lr`, `paper_unclipped`, `paper_dropout` ours with one part of the routing half (routers at
lr 3e-8 with their own clip; expert gradients unclipped, the routers clipped on their own; a mask per expert).
Every cell (optimizer, form, method, lr, seed) is one training run, `deepspeed --num_gpus R launcher/train.py
--config CONFIG` with overrides, in its own output directory OUT/CELL; `--parallel N` runs N cells at once
(on GPUs each on its own R devices, shared round-robin when N * R exceeds them; each with cores / (N * R)
threads); its result, the final evaluation (metrics.jsonl's last record with "accuracy"), with the expert health
of the last logged step (dead experts, smallest and largest expert share, router entropy), the number of collapse
alarms and the device it ran on, goes to OUT/CELL/result.json. The driver just loops over the cells and skips
those whose result.json exists, so it can be stopped and restarted at any time, or started detached with
--background (scripts/gpu_sweep.sh runs it on a GPU machine). `--report`
(quality_report.py) reads the result files and writes the table (accuracy per cell; mean, worst and
best-minus-worst over the sweep per method; expert use) into the `quality` section of benchmarks/RESULTS.md
and the plot benchmarks/quality.png (accuracy vs learning rate, log x).

Data: the WordNet definition quiz, `python -m moelora_ds.data.wordnet --out data/wordnet --seed 0`.

Run:  nice -n 19 python benchmarks/quality.py --background      (the sweep, detached; log in OUT/driver.log)
      (the AdamW sweep in RESULTS.md, on a 2-core CPU: --optimizers adamw --adamw-rates 2e-3 1e-2 5e-4 1e-4
       --num-ranks 1 --parallel 2 --micro-batch-size 16 --steps 120 --deepspeed=ds_configs/zero0.json
       --data.train_on_eos=false --train.eval_every=40; any further --key=value goes to every cell's train.py;
       with the end-of-turn token in the loss too, accuracy on this quiz jumps only after ~150 steps)
      (the re-test of the paper's claim in RESULTS.md, `quality_sweep`: --optimizers adamw --forms paper ours
       --adamw-rates 2e-3 1e-3 5e-4 1e-2 1e-4 --seeds 42 1 2 --steps 150 --num-ranks 1 --parallel 2
       --micro-batch-size 16 --deepspeed=ds_configs/zero0.json --model.dtype=bfloat16
       --out-dir benchmarks/quality_sweep --section quality_sweep --plot benchmarks/quality_sweep.png;
       its cells' result files are in git, so it resumes from a fresh clone; on a GPU: scripts/gpu_sweep.sh;
       its SGD part, in the paper's form only (scaled GD without momentum, expert gradients unclipped: with our
       clip of 1.0 Riemannian SGD stalls): the same with --optimizers sgd --forms paper --sgd-rates 3e-2 3e-1)
      (which of the paper's differences keeps its form from learning, `quality_ablation`: the same settings
       with --methods riemannian+sqrt --adamw-rates 2e-3 --forms paper_optimizer paper_routing, then
       paper_router_lr paper_unclipped paper_dropout; RESULTS.md lists each run's command)
      python benchmarks/quality.py --report                     (table and plot from the finished cells)
      python benchmarks/quality.py --smoke                      (tiny model, 2 rates x AdamW, 2 steps)
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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import FORMS, METHODS, OPTIMIZERS, RESULT_FILE, fmt_acc, record_sweep, sweep_settings, write_report  # noqa: E402

from bench_utils import BENCH_DIR, REPO_ROOT, free_port, launch_env  # noqa: E402

DEFAULT_CONFIG = REPO_ROOT / "launcher" / "configs" / "quickstart.yaml"
TRAIN_SCRIPT = REPO_ROOT / "launcher" / "train.py"
DEFAULT_RATES = {  # two orders of magnitude each, around the rate each optimizer needs on this model
    "adamw": [1e-4, 5e-4, 2e-3, 1e-2],
    "sgd": [1e-3, 5e-3, 2.5e-2, 1e-1],
}


@dataclass(frozen=True)
class Cell:
    optimizer: str
    method: str
    lr: float
    seed: int
    form: str = "ours"

    @property
    def name(self) -> str:
        return f"{self.optimizer}-{self.form}-{self.method}-lr{self.lr:g}-seed{self.seed}"

    @property
    def optimizer_name(self) -> str:
        return ("riemannian_" if METHODS[self.method][0] else "") + self.optimizer

    def overrides(self, sgd_momentum: float = 0.0) -> list[str]:
        momentum = [f"--optimizer.momentum={sgd_momentum:g}"] if self.optimizer == "sgd" else []
        return [f"--optimizer.name={self.optimizer_name}", f"--optimizer.lr={self.lr:g}",
                f"--moelora.gate_rescale={METHODS[self.method][1]}", f"--train.seed={self.seed}", *momentum,
                *FORMS[self.form][self.optimizer]]


def slot_launch(slot: int, num_ranks: int, parallel: int, num_devices: int) -> tuple[list[str], dict[str, str]]:
    """The launcher's device arguments and environment for concurrent cell number `slot` of `parallel`: on a
    machine with `num_devices` GPUs the slot's R of them (slots share GPUs round-robin when there are more slots
    than GPUs: a small model leaves one mostly idle), on CPU (0) `--num_gpus R`; cores / (N * R) threads each, counting
    the cores this process may run on (`taskset` gives two sweeps a core each)."""
    threads = {"OMP_NUM_THREADS": str(max(1, len(os.sched_getaffinity(0)) // (parallel * num_ranks)))}
    if num_devices:
        devices = ",".join(str((slot * num_ranks + i) % num_devices) for i in range(num_ranks))
        return ["--include", f"localhost:{devices}"], threads
    return ["--num_gpus", str(num_ranks)], threads


def device_description() -> str:
    """What the cells run on: the GPU's name, or the CPU and torch's capability on it (its bf16 speed depends on it)."""
    import platform

    import torch
    from deepspeed.accelerator import get_accelerator

    kind = get_accelerator().device_name()
    if kind != "cpu":
        module = torch.get_device_module(kind)
        return module.get_device_name(0) if hasattr(module, "get_device_name") else kind
    return f"cpu {platform.machine()} {torch.backends.cpu.get_cpu_capability()}, {os.cpu_count()} cores"


def cells_of(optimizers, methods, rates: dict[str, list[float]], seeds, forms=("ours",)) -> list[Cell]:
    """The sweep's cells, seed by seed (a sweep stopped early leaves whole replicates of the grid), the rates in the
    order given (the likely working rate first), every form and method at each rate."""
    return [Cell(opt, method, lr, seed, form) for seed in seeds for opt in optimizers for lr in rates[opt]
            for form in forms for method in methods]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_result(cell_dir: Path) -> Optional[dict]:
    path = cell_dir / RESULT_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def result_from_metrics(cell: Cell, cell_dir: Path, returncode: int, wall_s: float) -> dict:
    """The cell's result record from its metrics.jsonl: final accuracy, eval loss, last training loss, skips, and the
    last evaluation and training records whole (whatever else the trainer logs there, routing statistics say)."""
    from moelora_ds.telemetry.expert_health import SUMMARY_KEYS
    from moelora_ds.telemetry.metrics import read_metrics

    records = read_metrics(cell_dir)
    evals = [r for r in records if "accuracy" in r]
    train = [r for r in records if "loss" in r and "tokens_per_s" in r]
    return {"optimizer": cell.optimizer, "form": cell.form, "method": cell.method, "lr": cell.lr, "seed": cell.seed,
            "optimizer_name": cell.optimizer_name, "gate_rescale": METHODS[cell.method][1],
            "accuracy": evals[-1]["accuracy"] if evals else None,
            "eval_loss": evals[-1].get("eval_loss") if evals else None,
            "predicted": evals[-1].get("predicted") if evals else None,
            "final_train_loss": train[-1]["loss"] if train else None,
            "steps": train[-1]["step"] if train else 0,
            "skipped_steps": sum(1 for r in train if r.get("skipped")),
            "final_eval_record": evals[-1] if evals else None, "final_train_record": train[-1] if train else None,
            "health": {key: train[-1][key] for key in SUMMARY_KEYS if train and key in train[-1]},
            "health_alarms": sum(len(r.get("health_alarm", {})) for r in train),
            "exit_code": returncode, "wall_s": round(wall_s, 1)}


def run_cell(cell: Cell, args, config: Path, base_overrides: list[str],
             slot: tuple[list[str], dict[str, str]]) -> Optional[dict]:
    """Train one cell (unless its result exists or another driver is on it); returns its result or None."""
    cell_dir = args.out_dir / cell.name
    done = read_result(cell_dir)
    if done is not None:
        return done
    marker = cell_dir / "running.pid"
    if marker.is_file():
        try:
            if _pid_alive(int(marker.read_text().strip())):
                print(f"[quality] {cell.name}: another driver is running it, skipped", flush=True)
                return None
        except ValueError:
            pass
    shutil.rmtree(cell_dir, ignore_errors=True)
    cell_dir.mkdir(parents=True)
    marker.write_text(str(os.getpid()))
    devices, env = slot
    command = ["deepspeed", *devices, "--master_port", str(free_port()), str(TRAIN_SCRIPT), "--config", str(config),
               *base_overrides, *cell.overrides(args.sgd_momentum), f"--train.output_dir={cell_dir}"]
    log = cell_dir / "train.log"
    print(f"[quality] {cell.name}: training ({time.strftime('%H:%M:%S')})", flush=True)
    started = time.perf_counter()
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n")
        handle.flush()
        returncode = subprocess.run(command, cwd=REPO_ROOT, env={**launch_env(), **env}, stdout=handle,
                                    stderr=subprocess.STDOUT, timeout=args.timeout).returncode
    wall = time.perf_counter() - started
    marker.unlink(missing_ok=True)
    result = {**result_from_metrics(cell, cell_dir, returncode, wall), "device": args.device}
    if returncode == 3:  # stopped on non-finite values (only with --train.nonfinite=stop): diverged
        result["diverged"] = True
    elif returncode != 0 or result["accuracy"] is None:
        print(f"[quality] {cell.name}: FAILED (exit {returncode}), no result written; see {log}:\n"
              + "\n".join(log.read_text().splitlines()[-15:]), flush=True)
        return None
    if not args.keep_checkpoints:
        shutil.rmtree(cell_dir / "checkpoints", ignore_errors=True)
    (cell_dir / RESULT_FILE).write_text(json.dumps(result, indent=2))
    print(f"[quality] {cell.name}: accuracy {fmt_acc(result['accuracy'])} ({wall:.0f} s)", flush=True)
    return result


def run_cells(cells: list[Cell], args, config: Path, base: list[str]) -> None:
    """Train the cells, args.parallel at a time, each concurrent one on its own slot of the machine."""
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    num_devices = accelerator.device_count() if accelerator.device_name() != "cpu" else 0
    args.device = device_description()
    free_slots = list(range(args.parallel))

    def train(cell: Cell) -> None:
        slot = free_slots.pop()
        try:
            run_cell(cell, args, config, base, slot_launch(slot, args.num_ranks, args.parallel, num_devices))
        finally:
            free_slots.append(slot)

    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(train, cells))


def smoke_setup(root: Path) -> Path:
    """The tiny Llama and tokenizer of tests/conftest.py saved to `root`, tiny quiz data, a config for them."""
    import yaml

    sys.path.insert(0, str(REPO_ROOT / "tests"))
    from conftest import build_tiny_model, build_tokenizer, multiple_choice_records, write_jsonl

    model_dir = root / "tiny-llama"
    build_tiny_model("llama").save_pretrained(model_dir)
    build_tokenizer().save_pretrained(model_dir)
    train = write_jsonl(root / "train.jsonl", multiple_choice_records(32, seed=0))
    test = write_jsonl(root / "test.jsonl", multiple_choice_records(8, seed=1))
    config = yaml.safe_load(DEFAULT_CONFIG.read_text())
    config["model"].update(name_or_path=str(model_dir), gguf_file=None)
    config["data"].update(train_path=str(train), eval_path=str(test), max_length=64)
    config["train"].update(micro_batch_size=2)
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def background(argv: list[str], out_dir: Path) -> None:
    """Start this driver again, detached (own session, output to OUT/driver.log), and return."""
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "driver.log"
    cmd = [sys.executable, str(Path(__file__).resolve()), *[a for a in argv if a != "--background"]]
    with open(log, "a") as handle:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, stdout=handle, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    print(f"[quality] driver started in the background: pid {proc.pid}, log {log}")


def main(argv: Optional[list[str]] = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    parser.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=OPTIMIZERS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--forms", nargs="+", default=["ours"], choices=list(FORMS),
                        help="optimizer forms: ours (the configuration as it is), paper (the paper's recipe), "
                             "paper_optimizer and paper_routing (ours with one half of the paper's differences), "
                             "paper_router_lr, paper_unclipped and paper_dropout (ours with one part of "
                             "paper_routing)")
    parser.add_argument("--rates", type=float, nargs="+", default=None, help="learning rates for every optimizer")
    parser.add_argument("--sgd-rates", type=float, nargs="+", default=DEFAULT_RATES["sgd"])
    parser.add_argument("--adamw-rates", type=float, nargs="+", default=DEFAULT_RATES["adamw"])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42])
    parser.add_argument("--steps", type=int, default=None, help="train.max_steps of every cell (default: config's)")
    parser.add_argument("--micro-batch-size", type=int, default=None, help="train.micro_batch_size (default: config's)")
    parser.add_argument("--eval-max-samples", type=int, default=200, help="data.eval_max_samples (0: all)")
    parser.add_argument("--warmup-steps", type=int, default=None, help="scheduler.warmup_steps (default: config's)")
    parser.add_argument("--num-ranks", type=int, default=2, help="deepspeed --num_gpus")
    parser.add_argument("--parallel", type=int, default=1, help="cells trained at once")
    parser.add_argument("--sgd-momentum", type=float, default=0.9, help="optimizer.momentum of the SGD cells")
    parser.add_argument("--out-dir", type=Path, default=REPO_ROOT / "outputs" / "bench-quality")
    parser.add_argument("--keep-checkpoints", action="store_true", help="keep each cell's final checkpoint")
    parser.add_argument("--timeout", type=float, default=6 * 3600, help="seconds per cell")
    parser.add_argument("--background", action="store_true", help="start the sweep detached and return")
    parser.add_argument("--report", action="store_true", help="only write the table and plot from finished cells")
    parser.add_argument("--section", default="quality")
    parser.add_argument("--results", type=Path, default=None, help="default benchmarks/RESULTS.md (none under --smoke)")
    parser.add_argument("--plot", type=Path, default=None, help="default benchmarks/quality.png (none under --smoke)")
    parser.add_argument("--smoke", action="store_true", help="tiny model, 2 rates x AdamW x 3 methods, 2 steps")
    args, extra = parser.parse_known_args(argv)
    bad = [e for e in extra if not (e.startswith("--") and "=" in e)]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    args.sweep_args = [a for a in argv if a not in ("--report", "--background")]

    temp = None
    config = args.config
    if args.smoke:
        temp = Path(tempfile.mkdtemp(prefix="bench-quality-"))
        config = smoke_setup(temp)
        if args.optimizers == list(OPTIMIZERS):
            args.optimizers = ["adamw"]
        if args.rates is None:
            args.rates = [1e-3, 1e-2]
        args.steps, args.eval_max_samples, args.warmup_steps = 2, 0, 0
        if args.out_dir == REPO_ROOT / "outputs" / "bench-quality":
            args.out_dir = temp / "cells"
    elif args.results is None and args.plot is None:
        args.results, args.plot = BENCH_DIR / "RESULTS.md", BENCH_DIR / "quality.png"

    try:
        if args.report and not args.smoke:
            write_report(args, config)
            return
        if args.background:
            background(argv, args.out_dir)
            return
        from moelora_ds.config import load_config

        train_path = Path(load_config(config).data.train_path)
        if not (train_path if train_path.is_absolute() else REPO_ROOT / train_path).exists():
            raise SystemExit(f"{train_path} not found; build the WordNet quiz first: "
                             f"python -m moelora_ds.data.wordnet --out data/wordnet --seed 0")
        rates = {opt: args.rates or getattr(args, f"{opt}_rates") for opt in OPTIMIZERS}
        base = ["--train.save_every=0", "--train.save_every_minutes=0", "--train.eval_every=0",
                "--train.resume=never", "--train.nonfinite=skip", *extra]
        if args.steps:
            base.append(f"--train.max_steps={args.steps}")
        if args.micro_batch_size:
            base.append(f"--train.micro_batch_size={args.micro_batch_size}")
        base.append(f"--data.eval_max_samples={args.eval_max_samples or 'null'}")
        if args.warmup_steps is not None:
            base.append(f"--scheduler.warmup_steps={args.warmup_steps}")
        cells = cells_of(args.optimizers, args.methods, rates, args.seeds, args.forms)
        print(f"[quality] {len(cells)} cells in {args.out_dir}; "
              f"{sum(read_result(args.out_dir / c.name) is not None for c in cells)} already done", flush=True)
        args.out_dir.mkdir(parents=True, exist_ok=True)
        record_sweep(args.out_dir, sweep_settings(args, base))
        run_cells(cells, args, config, base)
        if args.smoke or args.results is not None or args.plot is not None:
            write_report(args, config)
    finally:
        if temp is not None:
            shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
