"""The default recipe against its alternatives, per task and seed: accuracy (worst and mean) and expert use at the end.

Reads the cells `benchmarks/quality.py` wrote (OUT/CELL/result.json: 150 steps of 16 questions, 1 rank, ZeRO-0,
bf16, accuracy on the first 200 test questions) and the base model's accuracy on the same questions
(`launcher/eval.py --data.eval_max_samples=200 --json-out ...`), and writes the `recipe` section of
benchmarks/RESULTS.md. The runs themselves: benchmarks/recipe/runs-*.sh and transfer*.sh (in the order they ran)
list their commands.

Run:  python benchmarks/recipe_report.py
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH_DIR))

from bench_utils import cpu_kind, update_results  # noqa: E402

SEEDS = (42, 1, 2)
CELL = "adamw-ours-{method}-lr0.002-seed{seed}"
TASKS = {"definition quiz (data/wordnet)": "recipe/wordnet-base.json",
         "hypernym quiz (data/wordnet-hypernyms)": "recipe/hypernyms-base.json"}
DEF, HYP = TASKS
ARMS = [  # (task, arm, directory of its cells, method)
    (DEF, "MoE-LoRA 4 x r8 top-2, Riemannian AdamW + sqrt, no load balancing (the earlier default)",
     "quality_sweep", "riemannian+sqrt"),
    (DEF, "**the default**: the same + load balancing 0.01", "recipe/wordnet-aux0.01", "riemannian+sqrt"),
    (DEF, "load balancing 0.01 + routing noise 0.3", "recipe/wordnet-aux0.01-noise0.3", "riemannian+sqrt"),
    (DEF, "LoRA in the same trainer: 1 expert of rank 8", "recipe/wordnet-e1r8", "riemannian+sqrt"),
    (DEF, "LoRA in the same trainer: 1 expert of rank 32 (alpha 64)", "recipe/wordnet-e1r32", "riemannian+sqrt"),
    (HYP, "**the default**", "recipe/hypernyms-default", "riemannian+sqrt"),
    (HYP, "LoRA in the same trainer: 1 expert of rank 8", "recipe/hypernyms-e1r8", "riemannian+sqrt"),
    (HYP, "LoRA in the same trainer: 1 expert of rank 32 (alpha 64)", "recipe/hypernyms-e1r32", "riemannian+sqrt"),
    (HYP, "the default without the preconditioner (plain AdamW, no gate rescaling)", "recipe/hypernyms-plain",
     "plain"),
]


def cell_file(directory: str, method: str, seed: int, name: str) -> Path:
    return BENCH_DIR / directory / CELL.format(method=method, seed=seed) / name


def cell(directory: str, method: str, seed: int) -> dict | None:
    path = cell_file(directory, method, seed, "result.json")
    return json.loads(path.read_text()) if path.is_file() else None


def steps_with_dead(directory: str, method: str, seed: int) -> str:
    """How many logged steps had some expert under 1% of its layer's routed slots in that step, from the cell's
    metrics.jsonl (health every step: the quickstart's config); "-" where the cell kept no metrics."""
    path = cell_file(directory, method, seed, "metrics.jsonl")
    if not path.is_file():
        return "-"
    return str(sum(1 for r in map(json.loads, path.read_text().splitlines()) if r.get("dead_experts")))


def longest_collapsed(directory: str, method: str, seed: int) -> str:
    """The most steps in a row any layer had an expert under 1% (expert_health.json, health every step); "-" where
    the cell's run did not record it."""
    path = cell_file(directory, method, seed, "expert_health.json")
    layers = json.loads(path.read_text())["layers"] if path.is_file() else []
    return str(max(layer["longest_collapsed_intervals"] for layer in layers)) if layers and \
        "longest_collapsed_intervals" in layers[0] else "-"


def base_accuracy(task: str) -> float | None:
    path = BENCH_DIR / TASKS[task]
    return json.loads(path.read_text())["accuracy"] if path.is_file() else None


def row(task: str, arm: str, directory: str, method: str) -> str | None:
    results = {seed: cell(directory, method, seed) for seed in SEEDS}
    done = {seed: r for seed, r in results.items() if r is not None and r.get("accuracy") is not None}
    if not done:
        return None
    accuracy = {seed: r["accuracy"] for seed, r in done.items()}
    base = base_accuracy(task)
    worst = min(accuracy.values())
    gain = "-" if base is None else f"{100 * (worst - base):+.1f}"

    def per_seed(figure) -> str:
        """`figure(seed)` for the seeds that ran, "-" for the others, joined as the table's seed columns."""
        return " / ".join(figure(s) if s in done else "-" for s in SEEDS)

    accuracies = per_seed(lambda s: f"{100 * accuracy[s]:.1f}")
    dead = per_seed(lambda s: str(done[s]["health"].get("dead_experts", "-")))
    dead_steps = per_seed(lambda s: steps_with_dead(directory, method, s))
    longest = per_seed(lambda s: longest_collapsed(directory, method, s))
    return (f"| {task} | {arm} | {'-' if base is None else f'{100 * base:.1f}'} | {accuracies} | {100 * worst:.1f} | "
            f"{100 * statistics.mean(accuracy.values()):.1f} | {gain} | {dead} | {dead_steps} | {longest} |")


def main() -> None:
    header = ("| task | arm | base model | accuracy after, seed 42 / 1 / 2 | worst | mean | worst - base (points) | "
              "dead experts at step 150 | steps with a dead expert | longest run of such steps in one layer |\n"
              "|---|---|---|---|---|---|---|---|---|---|")
    rows = [r for r in (row(*arm) for arm in ARMS) if r is not None]
    body = ("The default recipe (launcher/configs/quickstart.yaml) against its alternatives: 150 steps of 16 questions "
            "(1 rank, ZeRO-0, bf16), lr 2e-3, accuracy (%) on the first 200 test questions (chance 25%); every other "
            f"setting the quickstart's. Machine: Intel Xeon with AMX, 2 cores ({cpu_kind()}). "
            "`python benchmarks/recipe_report.py`; the runs: benchmarks/recipe/runs-*.sh, transfer*.sh. Dead experts: "
            "experts under 1% of their layer's routed slots, of 480 (120 layers x 4; one expert takes every slot); "
            "steps with a dead expert: of the 150, those in which some expert got under 1% (a step routes ~1,600 "
            "tokens, so one expert's dip below 1% of a step's slots counts); longest run: the most steps in a row "
            "one layer had such an expert (the quickstart's collapse alarm goes off at 30; recorded since the runs "
            "of transfer-4.sh).\n\n"
            + header + "\n" + "\n".join(rows))
    update_results(BENCH_DIR / "RESULTS.md", "recipe", body)
    print(body)


if __name__ == "__main__":
    main()
