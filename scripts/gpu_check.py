"""One-call correctness check of the trainer on this machine's accelerator; `--smoke`: the same, tiny, on the CPU.

    bash scripts/gpu_check.sh [--smoke]     (installs the wheels of .gpu/ where deepspeed is missing, then runs this)

Prints one line per check (PASS, FAIL, SKIP; INFO for diagnostics) and exits 1 if a check failed. Every
training run is the real Trainer (moelora_ds.training.trainer) in this process at world size 1, fp32 unless said, on
the tiny run of tests/harness.py (2-layer Llama, E=4 r=4 top-2 sqrt on q/k/v/o, grad accumulation 2):
  start     the adapters every stage's engine starts from (after deepspeed.initialize, before any step) against the
            reference's, bitwise: one line naming the stages and tensors that start elsewhere (a device-dependent
            initialisation shows here, before any update can blur it)
  grads     the gradient every stage has accumulated after micro-batch 1 and 2 of the first step against the
            reference's (bound 1e-5): tells a gradient-accumulation or reduction fault apart from a different start
  stage     ZeRO-0/1/2/3 and ZeRO-3 with optimizer offload against the single-process reference (no DeepSpeed)
            on the same device: relative difference of the final adapter weights, for sgd, riemannian_sgd
            without and with clipping, riemannian_adamw at eps 1e-5 (bound 1e-5 for all; AdamW also shown against
            the reference summed in reverse order and at lr/10)
  step1     for a stage over its bound: the same after one step, per kind of tensor (routers apart), the worst
            tensors, and the gradient norm clipping uses, the engine's against the reference's
  bf16      ZeRO-3 in bf16 against the fp32 reference, within 4x of the reference's own distance under bf16
            autocast (tests/harness.py bf16_bound)
  export    a trained ZeRO-3 checkpoint exported merged and loaded by plain transformers (moelora_ds not
            importable) against the adapter export loaded with moelora_ds.load_adapter: logits on the device
  launcher  one run through `deepspeed --num_gpus 1 launcher/train.py` against the same run in this process,
            and its log free of NCCL's "Guessing device ID" warning
  device    the process group bound to the device (accelerators only), the fused finiteness check finding NaN
            and inf on the device, host reads per training step (tests/host_syncs.py; on CUDA also counted by
            torch.cuda's sync debug mode)
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "tests")]

import torch  # noqa: E402

from harness import (  # noqa: E402
    bf16_bound,
    checkpoint_adapters,
    free_port,
    global_relative_error,
    load_config_from_dict,
    load_in_plain_transformers,
    multiple_choice_records,
    reference_micro_gradients,
    reference_run,
    reference_start,
    relative_errors,
    run_config,
    save_tiny_model_dir,
    write_jsonl,
)

SGD_BOUND = 1e-5
ADAMW_EPS = 1e-5
"""AdamW's eps in the stage check: above the gradients' rounding noise, so an update cannot flip sign with the
summation order and the comparison is as exact as SGD's (tests/training/test_trainer.py DAMPED_ADAMW_EPS says why)."""
OFFLOAD_ADAMW_BOUND = 1e-4
"""AdamW under optimizer offload: DeepSpeed's CPU Adam (C++ SIMD) rounds each update differently from torch's."""
GRAD_BOUND = 1e-5
"""Accumulated micro-batch gradients against the reference's: one backward each, fp32 rounding only."""
CASES = {  # name: (optimizer, lr, grad_clip)
    "sgd": ("sgd", 0.5, 0.0),
    "riemannian_sgd": ("riemannian_sgd", 0.2, 0.0),
    "riemannian_sgd+clip": ("riemannian_sgd", 0.2, 1.0),
    "riemannian_adamw": ("riemannian_adamw", 1e-2, 0.0),
}
STAGES = ["zero0", "zero1", "zero2", "zero3", "zero3_offload"]
BF16_CASES = {"riemannian_sgd": ("sgd", 0.2), "riemannian_adamw": ("adamw", 1e-2)}  # name: (unpreconditioned, lr)


@dataclass
class Trained:
    adapters: dict[str, torch.Tensor]
    losses: list[float]
    grad_norms: list[Optional[float]]
    """The engine's global gradient norm after every step (None where DeepSpeed keeps none: stage 0)."""


class Check:
    """The run's settings, work directory and tally of check lines."""

    def __init__(self, args) -> None:
        self.smoke, self.work = args.smoke, args.work
        self.steps = 2 if args.smoke else 10
        self.stages = ["zero0", "zero3"] if args.smoke else STAGES
        self.failed = 0
        self.log = self.work / "runs.log"
        root = self.work / "data"
        root.mkdir(parents=True, exist_ok=True)
        with quiet(self.log):
            from deepspeed.accelerator import get_accelerator

            accelerator = get_accelerator()
            self.device = accelerator.device_name(0) if accelerator.device_name() != "cpu" else "cpu"
            self.model_dir = save_tiny_model_dir(root / "tiny-llama")
        self.data = {"train": write_jsonl(root / "train.jsonl", multiple_choice_records(64, seed=0))}

    def say(self, status: str, name: str, text: str) -> None:
        self.failed += status == "FAIL"
        print(f"{status:<4} {name:<9} {text}", flush=True)

    def config(self, case: str, stage: str, *, steps: Optional[int] = None, lr_scale: float = 1.0,
               dtype: str = "float32", schedule: Optional[dict] = None, name: Optional[str] = None,
               damped: bool = True) -> dict:
        """The tiny run of `case` at `stage`; AdamW at ADAMW_EPS unless `damped` is false (its default eps)."""
        optimizer, lr, clip = CASES[case]
        out = self.work / "runs" / (name or f"{case}-{stage}-{dtype}-lr{lr_scale:g}-s{steps or self.steps}")
        settings = {"name": optimizer, "lr": lr * lr_scale}
        if damped and optimizer.endswith("adamw"):
            settings["eps"] = ADAMW_EPS
        config = run_config(self.model_dir, self.data, out, deepspeed=f"ds_configs/{stage}.json",
                            optimizer=settings,
                            train={"max_steps": steps or self.steps, "grad_clip": clip, "save_every": 0,
                                   "log_every": 1, "output_dir": str(out)})
        config["model"]["dtype"] = dtype
        if schedule:
            config["scheduler"] = schedule
        return config

    def reference(self, config: dict, reverse_order: bool = False):
        with quiet(self.log):
            return reference_run(config, 1, self.device, reverse_order=reverse_order)

    def train(self, config: dict) -> Trained:
        """`config` trained by the Trainer in this process; its final checkpoint's adapters."""
        from moelora_ds.telemetry.metrics import read_metrics
        from moelora_ds.training.trainer import Trainer

        output_dir = Path(config["train"]["output_dir"])
        shutil.rmtree(output_dir, ignore_errors=True)
        norms: list[Optional[float]] = []
        with quiet(self.log):
            trainer = Trainer(load_config_from_dict(config))
            step = trainer.train_step

            def recorded(batch_iter):
                stats = step(batch_iter)
                norm = trainer.engine.get_global_grad_norm()
                norms.append(None if norm is None else float(norm))
                return stats

            trainer.train_step = recorded
            trainer.train()
        losses = [r["loss"] for r in read_metrics(output_dir) if "loss" in r]
        with quiet(self.log):
            adapters = checkpoint_adapters(output_dir)
        return Trained(adapters, losses, norms)

    def run(self, name: str, check: Callable[[], None]) -> None:
        """Run one check; an exception is a FAIL line with its last frames, and the next check goes on."""
        try:
            check()
        except Exception as error:  # noqa: BLE001 - every failure is reported and the other checks still run
            frames = "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])
            self.say("FAIL", name, f"{type(error).__name__}: {error} | " + " ".join(frames.split())[-600:])


@contextlib.contextmanager
def quiet(log: Path):
    """Send this process's stdout and stderr (file descriptors 1 and 2, so DeepSpeed's and tqdm's too) to `log`."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    with open(log, "a") as handle:
        os.dup2(handle.fileno(), 1)
        os.dup2(handle.fileno(), 2)
        try:
            yield
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            os.close(saved[0])
            os.close(saved[1])


def start_and_gradient_checks(ctx: Check) -> None:
    """Every stage's starting adapters (bitwise) and first-step micro-batch gradients against the reference's."""
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    from moelora_ds.adapters.inject import adapter_parameters
    from moelora_ds.training.loss import causal_lm_loss
    from moelora_ds.training.trainer import Trainer

    case = "riemannian_adamw"
    with quiet(ctx.log):
        start = reference_start(ctx.config(case, "zero0"), ctx.device)
        reference_grads = reference_micro_gradients(ctx.config(case, "zero0"), ctx.device)
    differing: dict[str, list[str]] = {}
    grad_errors: dict[str, list[float]] = {}
    for stage in ctx.stages:
        with quiet(ctx.log):
            trainer = Trainer(load_config_from_dict(ctx.config(case, stage, name=f"start-{stage}")))
            engine, params = trainer.engine, adapter_parameters(trainer.engine.module)
            with deepspeed.zero.GatheredParameters(list(params.values())):
                engine_start = {n: p.detach().float().cpu().clone() for n, p in params.items()}
            batch_iter = iter(trainer.batches)
            engine.train()
            errors = []
            for micro, want in enumerate(reference_grads):
                engine.backward(causal_lm_loss(engine, next(batch_iter), trainer.device))
                got = {n: safe_get_full_grad(p) for n, p in params.items()}
                got = {n: (torch.zeros_like(want[n]) if g is None else g.detach().float().cpu())
                       for n, g in got.items()}
                errors.append(global_relative_error(got, want))
                if micro < len(reference_grads) - 1:
                    engine.step()
            engine.destroy()
        differing[stage] = [n for n in start if not torch.equal(engine_start[n], start[n])]
        grad_errors[stage] = errors
    bad = {stage: names for stage, names in differing.items() if names}
    if bad:
        ctx.say("FAIL", "start", "starting adapters differ from the reference's: " + "; ".join(
            f"{stage}: {len(names)} of {len(start)} tensors ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
            for stage, names in bad.items()))
    else:
        ctx.say("PASS", "start", f"{' '.join(ctx.stages)} start from bitwise the reference's adapters "
                f"({len(start)} tensors, {case})")
    worst = max(max(errors) for errors in grad_errors.values())
    ctx.say("PASS" if worst <= GRAD_BOUND else "FAIL", "grads", "accumulated gradient after micro-batch 1, 2 of "
            "step 1 vs the reference, rel. diff.: " + "; ".join(
                f"{stage} {' '.join(f'{e:.1e}' for e in errors)}" for stage, errors in grad_errors.items())
            + f" (bound {GRAD_BOUND:.0e})")


def stage_checks(ctx: Check) -> dict:
    """Every case at every stage against the reference; returns the trained ZeRO-3 runs by case."""
    zero3 = {}
    for case, (optimizer, _, _) in CASES.items():
        reference = ctx.reference(ctx.config(case, "zero0"))
        adamw = optimizer.endswith("adamw")
        rounding = small_lr_reference = None
        if adamw:
            rounding = global_relative_error(ctx.reference(ctx.config(case, "zero0"), reverse_order=True).adapters,
                                             reference.adapters)
            small_lr_reference = ctx.reference(ctx.config(case, "zero0", lr_scale=0.1))
        for stage in ctx.stages:
            name = f"{case} {stage}"
            bound = OFFLOAD_ADAMW_BOUND if adamw and stage.endswith("offload") else SGD_BOUND
            try:
                trained = ctx.train(ctx.config(case, stage))
            except Exception as error:  # noqa: BLE001
                if stage.endswith("offload") and adamw and "cpu_adam" in f"{error!r}{traceback.format_exc()}".lower():
                    ctx.say("SKIP", "stage", f"{name}: DeepSpeed's CPU Adam does not build here ({error})")
                    continue
                raise
            if stage == "zero3":
                zero3[case] = trained
            error = global_relative_error(trained.adapters, reference.adapters)
            worst = max(relative_errors(trained.adapters, reference.adapters).values())
            text = (f"{name}: rel. diff. of final adapters {error:.2e} (worst tensor {worst:.2e}), bound {bound:.1e}; "
                    f"last loss {trained.losses[-1]:.6f} vs reference {reference.losses[-1]:.6f}")
            if adamw:
                small = global_relative_error(ctx.train(ctx.config(case, stage, lr_scale=0.1)).adapters,
                                              small_lr_reference.adapters)
                text += f"; reference vs itself in reverse order {rounding:.2e}; at lr/10 {small:.2e}"
            ctx.say("PASS" if error <= bound else "FAIL", "stage", text)
            if error > bound:
                ctx.run("step1", lambda case=case, stage=stage: first_step(ctx, case, stage))
    return zero3


def first_step(ctx: Check, case: str, stage: str) -> None:
    """After one step: which adapter tensors differ from the reference and by how much; the clipping norms."""
    config = ctx.config(case, stage, steps=1)
    reference = ctx.reference(config)
    trained = ctx.train(config)
    errors = relative_errors(trained.adapters, reference.adapters)
    kinds = {kind: max((e for k, e in errors.items() if k.endswith(kind)), default=0.0)
             for kind in ("lora_A", "lora_B", "router.weight")}
    worst = sorted(errors.items(), key=lambda item: -item[1])[:3]
    norm = trained.grad_norms[0]
    ctx.say("INFO", "step1", f"{case} {stage} after 1 step: max rel. diff. "
            + ", ".join(f"{kind} {e:.2e}" for kind, e in kinds.items())
            + "; worst " + ", ".join(f"{k} {e:.2e}" for k, e in worst)
            + f"; gradient norm engine {'n/a' if norm is None else f'{norm:.6g}'} vs reference "
            f"{reference.grad_norms[0]:.6g}; loss {trained.losses[0]:.7f} vs {reference.losses[0]:.7f}")


def bf16_checks(ctx: Check) -> None:
    """As tests/training/test_trainer.py's bf16 test: 10 steps (also under --smoke: the bound needs the runs to move
    apart)."""
    constant = {"name": "constant", "warmup_steps": 0}
    for case, (plain, lr) in BF16_CASES.items():
        reference = ctx.reference(ctx.config(case, "zero3", steps=10, schedule=constant, damped=False))
        plain_config = ctx.config(case, "zero3", steps=10, schedule=constant, damped=False)
        plain_config["optimizer"] = {**plain_config["optimizer"], "name": plain, "lr": lr}
        gap = global_relative_error(ctx.reference(plain_config).adapters, reference.adapters)
        trained = ctx.train(ctx.config(case, "zero3", steps=10, dtype="bfloat16", schedule=constant, damped=False))
        error = global_relative_error(trained.adapters, reference.adapters)
        with quiet(ctx.log):
            autocast = reference_run(ctx.config(case, "zero3", steps=10, schedule=constant, damped=False), 1,
                                     ctx.device, bf16_autocast=True)
        noise = global_relative_error(autocast.adapters, reference.adapters)
        bound = bf16_bound(gap, noise)
        ctx.say("PASS" if error < bound else "FAIL", "bf16", f"{case} zero3 bf16 vs fp32 reference: rel. diff. "
                f"{error:.3f}, bound {bound:.3f} (reference under bf16 autocast at {noise:.3f}, unpreconditioned "
                f"reference at {gap:.3f})")


def export_check(ctx: Check) -> None:
    from transformers import AutoModelForCausalLM

    from moelora_ds import load_adapter
    from moelora_ds.cli import export_main

    config = ctx.config("riemannian_adamw", "zero3")  # the stage check's run, trained again only if it is missing
    if not (Path(config["train"]["output_dir"]) / "checkpoints" / "latest").is_file():
        ctx.train(config)
    out = ctx.work / "export"
    shutil.rmtree(out, ignore_errors=True)
    run_dir = config["train"]["output_dir"]
    with quiet(ctx.log):
        assert export_main(["--checkpoint", run_dir, "--out", str(out / "merged")]) == 0, "merged export failed"
        assert export_main(["--checkpoint", run_dir, "--out", str(out / "adapter"), "--mode", "adapter"]) == 0
    ids = torch.randint(3, 320, (2, 12), generator=torch.Generator().manual_seed(0))
    plain = load_in_plain_transformers(out / "merged", ids, out / "plain", remote=True, device=ctx.device)
    with quiet(ctx.log), torch.no_grad():
        base = AutoModelForCausalLM.from_pretrained(ctx.model_dir).to(ctx.device).eval()
        base_logits = base(ids.to(ctx.device)).logits.cpu()
        adapter = load_adapter(AutoModelForCausalLM.from_pretrained(ctx.model_dir), out / "adapter")
        logits = adapter.to(ctx.device).eval()(ids.to(ctx.device)).logits.cpu()
    difference = (plain["logits"] - logits).abs().max().item()
    moved = (logits - base_logits).abs().max().item()
    ok = difference <= 1e-4 and moved > 1e-3 and plain["generated"] == 4
    ctx.say("PASS" if ok else "FAIL", "export", f"merged export in plain transformers ({plain['class']}) vs adapter "
            f"export on {ctx.device}: max |logit diff.| {difference:.2e} (bound 1e-4; training moved logits by "
            f"{moved:.2e}); generated {plain['generated']} tokens")


def launcher_check(ctx: Check, in_process: Trained) -> None:
    import yaml

    config = ctx.config("riemannian_sgd", "zero3", name="launcher")
    path = ctx.work / "launcher.yaml"
    path.write_text(yaml.safe_dump(config))
    log = ctx.work / "launcher.log"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    with open(log, "w") as handle:
        result = subprocess.run(["deepspeed", "--num_gpus", "1", "--master_port", str(free_port()),
                                 str(REPO / "launcher" / "train.py"), "--config", str(path)],
                                cwd=ctx.work, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=600)
    assert result.returncode == 0, f"launch failed ({result.returncode}): see {log}"
    with quiet(ctx.log):
        launched = checkpoint_adapters(Path(config["train"]["output_dir"]))
    error = global_relative_error(launched, in_process.adapters)
    guessing = "Guessing device ID" in log.read_text()
    ok = error <= 1e-6 and not guessing
    ctx.say("PASS" if ok else "FAIL", "launcher", f"deepspeed --num_gpus 1 launcher/train.py vs in process "
            f"(riemannian_sgd zero3): rel. diff. {error:.2e} (bound 1e-6); NCCL 'Guessing device ID' warning: "
            f"{'yes' if guessing else 'no'}")


def device_checks(ctx: Check) -> None:
    import torch.distributed as dist

    from moelora_ds.training.nonfinite import nonfinite_flags

    bound = dist.distributed_c10d._get_default_group().bound_device_id
    expected = ctx.device != "cpu"
    ctx.say("PASS" if (bound is not None) == expected else "FAIL", "device",
            f"process group backend {dist.get_backend()}, bound to {bound} (expected: "
            f"{'the device' if expected else 'none'})")
    for dtype in (torch.float32, torch.bfloat16):
        tensors = [torch.ones(5, dtype=dtype, device=ctx.device) for _ in range(3)]
        tensors.append(torch.empty(0, device=ctx.device))
        tensors[0][3], tensors[1][0] = float("nan"), float("inf")
        flags = nonfinite_flags(tensors, torch.device(ctx.device)).tolist()
        ctx.say("PASS" if flags == [1.0, 1.0, 0.0, 0.0] else "FAIL", "device",
                f"fused finiteness check on {ctx.device} {dtype}: flags {flags} (want NaN, inf, finite, empty: "
                f"[1, 1, 0, 0])")
    host_reads_check(ctx)


def host_reads_check(ctx: Check) -> None:
    """Host reads per training step of the ZeRO-3 AdamW run, by library (steps 2 and 3)."""
    from moelora_ds.training.trainer import Trainer

    from host_syncs import reads_per_step

    config = ctx.config("riemannian_adamw", "zero3", steps=4, name="host-reads")
    config["train"]["log_every"] = 100  # steps that log (expert health's interval, metrics) read back on purpose
    cuda = ctx.device.startswith("cuda")
    with quiet(ctx.log):
        steps, synced, copies = reads_per_step(Trainer(load_config_from_dict(config)), cuda_syncs=cuda)
    for index in (1, 2):
        counted = steps[index]
        ours = sum(n for where, n in counted.items() if where.startswith("moelora_ds"))
        libraries = Counter()
        for where, n in counted.items():
            libraries[where.split("/")[0]] += n
        text = (f"step {index + 1} of riemannian_adamw zero3: {sum(counted.values())} host reads "
                f"({', '.join(f'{lib} {n}' for lib, n in libraries.most_common())}); the trainer's own: {ours} "
                f"(want 2)")
        our_copies = sum(n for where, n in copies[index].items() if where.startswith("moelora_ds"))
        text += (f"; blocking host-to-device copies: {sum(copies[index].values())}, the trainer's own: {our_copies} "
                 f"(want 0)")
        if cuda:
            text += f"; torch.cuda sync debug mode: {synced[index]} synchronizing calls"
        ctx.say("PASS" if ours == 2 and our_copies == 0 else "FAIL", "device", text)


def header(ctx: Check) -> None:
    with quiet(ctx.log):
        import deepspeed
        import transformers

    name = torch.cuda.get_device_name(0) if ctx.device.startswith("cuda") else ctx.device
    revision = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True).stdout.strip() or "unknown"
    print(f"gpu_check on {name}: torch {torch.__version__}, deepspeed {deepspeed.__version__}, transformers "
          f"{transformers.__version__}, git {revision}; fp32 matmul precision {torch.get_float32_matmul_precision()}"
          f"{', smoke' if ctx.smoke else ''}; {ctx.steps} steps, stages {' '.join(ctx.stages)}; logs in {ctx.work}",
          flush=True)


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny and on the CPU: stages 0 and 3, 2 steps")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "moelora-gpu-check")
    args = parser.parse_args(argv)
    if args.smoke:
        os.environ["DS_ACCELERATOR"] = "cpu"
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    started = time.perf_counter()
    ctx = Check(args)
    header(ctx)
    zero3: dict = {}
    ctx.run("start", lambda: start_and_gradient_checks(ctx))
    ctx.run("stage", lambda: zero3.update(stage_checks(ctx)))
    ctx.run("device", lambda: device_checks(ctx))
    ctx.run("bf16", lambda: bf16_checks(ctx))
    ctx.run("export", lambda: export_check(ctx))
    if "riemannian_sgd" in zero3:
        ctx.run("launcher", lambda: launcher_check(ctx, zero3["riemannian_sgd"]))
    else:
        ctx.say("FAIL", "launcher", "no in-process riemannian_sgd zero3 run to compare with")
    print(f"{'FAILED' if ctx.failed else 'PASSED'}: {ctx.failed} check(s) failed, "
          f"{time.perf_counter() - started:.0f} s", flush=True)
    return 1 if ctx.failed else 0


if __name__ == "__main__":
    sys.exit(main())
