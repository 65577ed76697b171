"""Shared helpers of the performance benchmarks: interleaved timing, statistics, machine facts, RESULTS.md sections.

Not a library module: the benchmark scripts import it from their own directory.
"""

from __future__ import annotations

import gc
import importlib.metadata
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_TITLE = "# Benchmark results\n\nWritten by the scripts in `benchmarks/`; each section says how to rerun it.\n"


def free_port() -> int:
    """A TCP port free on this host now (for a launcher's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launch_env() -> dict[str, str]:
    """The environment of a benchmark's launches: offline, unbuffered, this repo and this venv first."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def quantiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(25th percentile, median, 75th percentile), linear interpolation."""
    data = sorted(values)
    if not data:
        raise ValueError("no values")

    def at(q: float) -> float:
        pos = q * (len(data) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(data) - 1)
        return data[lo] + (data[hi] - data[lo]) * (pos - lo)

    return at(0.25), at(0.5), at(0.75)


class Timings:
    """Per-candidate samples, seconds per call: `wall` (perf_counter) and `cpu` (this process's CPU time).

    With one torch thread the CPU time counts only the work this process did, not the time other jobs
    held the core, so it is the steadier measure on a shared machine; both are kept.
    """

    def __init__(self, names: Sequence[str]) -> None:
        self.wall: dict[str, list[float]] = {name: [] for name in names}
        self.cpu: dict[str, list[float]] = {name: [] for name in names}


def interleaved_times(candidates: dict[str, Callable[[], None]], *, reps: int, inner: dict[str, int],
                      warmup: int = 2) -> Timings:
    """`reps` samples of every candidate, taken round-robin (rotated start) so that drift hits all alike.

    Every sample times `inner[name]` back-to-back calls; the garbage collector is off while timing.
    Sample i of every candidate comes from the same round, so per-round ratios are paired.
    """
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    timings = Timings(names)
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for rep in range(reps):
            shift = rep % len(names)
            for name in names[shift:] + names[:shift]:
                fn, n = candidates[name], inner[name]
                cpu_start, wall_start = time.process_time(), time.perf_counter()
                for _ in range(n):
                    fn()
                wall, cpu = time.perf_counter() - wall_start, time.process_time() - cpu_start
                timings.wall[name].append(wall / n)
                timings.cpu[name].append(cpu / n)
    finally:
        if gc_was_enabled:
            gc.enable()
    return timings


def calibrate_inner(fn: Callable[[], None], target_s: float, cap: int = 50) -> int:
    """How many back-to-back calls make one sample last about `target_s` (at least 1)."""
    fn()
    start = time.perf_counter()
    fn()
    once = max(time.perf_counter() - start, 1e-6)
    return max(1, min(cap, round(target_s / once)))


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    return [a / b for a, b in zip(num, den)]


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 100 else f"{ms:.0f}"


def fmt_ratio(values: Sequence[float]) -> str:
    """`median [q25-q75]` of a list of ratios."""
    q1, med, q3 = quantiles(values)
    return f"{med:.2f} [{q1:.2f}-{q3:.2f}]"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        found = re.search(r"^Model name:\s*(.+)$", out, re.M)
        if found:
            return found.group(1).strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                             text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "diff", "--name-only", "HEAD", "--", "moelora_ds"],
                               cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
        return rev + (f" (uncommitted changes in {', '.join(dirty)})" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_kind() -> str:
    """The CPU's kind as it decides the precision: its bf16/AVX flags and torch's CPU capability."""
    from moelora_ds.training.precision import cpu_flags

    flags = cpu_flags()
    named = [flag for flag in ("amx_bf16", "avx512_bf16", "avx512f", "avx2") if flag in flags]
    return f"flags {' '.join(named) or 'none of amx_bf16/avx512_bf16/avx512f/avx2'}, torch CPU capability " \
           f"{torch.backends.cpu.get_cpu_capability()}"


def machine_lines(packages: Sequence[str], load_before: tuple[float, float, float]) -> list[str]:
    """Markdown bullet lines: CPU, cores, threads, versions, git revision, load average around the run."""
    load_after = os.getloadavg()
    versions = ", ".join(f"{name} {package_version(name)}" for name in packages)
    return [
        f"- machine: {cpu_model()} ({cpu_kind()}), {os.cpu_count()} logical cores, torch threads "
        f"{torch.get_num_threads()}",
        f"- software: Python {platform.python_version()}, torch {torch.__version__}, {versions}",
        f"- code: git {git_revision()}; measured {time.strftime('%Y-%m-%d %H:%M %Z')}",
        f"- load average (1/5/15 min) before: {'/'.join(f'{v:.2f}' for v in load_before)}, "
        f"after: {'/'.join(f'{v:.2f}' for v in load_after)} (other jobs share these cores: timings are noisy, "
        f"hence interleaved repetitions, medians and the [25th-75th percentile] spread of paired ratios)",
    ]


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    try:
        script_text = str(script.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return " ".join(["python", shlex.quote(script_text), *map(shlex.quote, sys.argv[1:])])


def update_results(path: Path, section: str, body: str, plot: Path | None = None) -> None:
    """Replace (or append) the `section` block of the results file, leaving the other sections alone.

    With `plot`, the block ends with a line naming the PNG written next to the results file."""
    if plot is not None:
        body = body.rstrip() + f"\n\nPlot: `{plot.name}`"
    begin, end = f"<!-- BEGIN {section} -->", f"<!-- END {section} -->"
    block = f"{begin}\n{body.rstrip()}\n{end}\n"
    text = path.read_text() if path.exists() else RESULTS_TITLE
    pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end) + r"\n?", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_figure(fig, title: str, path: Path) -> None:
    """Title, lay out, write (PNG, 110 dpi) and close a matplotlib figure."""
    import matplotlib.pyplot as plt

    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


TINY_LLAMA_NAME = "tiny random Llama (hidden 64, 2 layers)"


def tiny_llama():
    """The --smoke model of the benchmarks: a tiny random LlamaForCausalLM (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
