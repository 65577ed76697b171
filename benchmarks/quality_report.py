"""Benchmark 4's files and report: a cell's result.json, the sweep's sweep.json, the tables and the plot.

`python benchmarks/quality.py --report` calls `write_report`; the driver (quality.py) writes the files.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from statistics import mean
from typing import Optional

from bench_utils import command_line, machine_lines, markdown_table, save_figure, update_results

METHODS = {  # name -> (riemannian optimizer?, gate_rescale)
    "plain": (False, "none"),
    "riemannian": (True, "none"),
    "riemannian+sqrt": (True, "sqrt"),
}
OPTIMIZERS = ("sgd", "adamw")
_PAPER_ROUTER_LR = ["--optimizer.router_lr=3e-8", "--optimizer.router_clip=1.0"]
_PAPER_UNCLIPPED = ["--train.grad_clip=0", "--optimizer.router_clip=1.0"]
_PAPER_DROPOUT = ["--moelora.dropout_per_expert=true"]
_PAPER_ROUTING = [*_PAPER_ROUTER_LR, "--train.grad_clip=0", *_PAPER_DROPOUT, "--moelora.router_aux_loss_coef=0",
                  "--moelora.router_noise=0"]
_PAPER_OPTIMIZER = {"sgd": ["--optimizer.momentum=0"],
                    "adamw": ["--optimizer.bias_correction=false", "--optimizer.betas=[0.9,0.999]",
                              "--optimizer.eps=1e-6"]}
FORMS = {  # name -> optimizer -> overrides: "ours" is the configuration as it is, "paper" launcher/configs/paper.yaml;
    # the two halves of "paper" apart, and the routing half's three parts apart, to tell which difference matters
    "ours": {"sgd": [], "adamw": []},
    "paper": {opt: [*_PAPER_ROUTING, *_PAPER_OPTIMIZER[opt]] for opt in OPTIMIZERS},
    "paper_optimizer": {opt: _PAPER_OPTIMIZER[opt] for opt in OPTIMIZERS},
    "paper_routing": {opt: _PAPER_ROUTING for opt in OPTIMIZERS},
    "paper_router_lr": {opt: _PAPER_ROUTER_LR for opt in OPTIMIZERS},
    "paper_unclipped": {opt: _PAPER_UNCLIPPED for opt in OPTIMIZERS},
    "paper_dropout": {opt: _PAPER_DROPOUT for opt in OPTIMIZERS},
}
RESULT_FILE = "result.json"
SWEEP_FILE = "sweep.json"  # the sweep's settings, written by the driver and read by --report
COLLAPSED_SHARE = 0.9  # a cell that gave one answer this often is reported as collapsed
LEARNED_MARGIN = 0.15  # a cell this far above chance learned the task (5 standard errors at 200 questions, 4 choices)


def fmt_acc(value: Optional[float]) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}"


def cell_accuracy(result: dict, chance: float) -> float:
    """A diverged cell counts as chance level (it answers no better than guessing)."""
    return chance if result.get("diverged") or result.get("accuracy") is None else result["accuracy"]


def collect(out_dir: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(out_dir.glob(f"*/{RESULT_FILE}"))]


def arm(result: dict) -> tuple[str, str, str]:
    """(optimizer, form, method) of a result; results from before forms existed ran the configuration as it is."""
    return result["optimizer"], result.get("form", "ours"), result["method"]


def arms_of(optimizer: str, present) -> list[tuple[str, str, str]]:
    """The arms of `optimizer` among `present`, in form then method order."""
    return [(optimizer, form, method) for form in FORMS for method in METHODS if (optimizer, form, method) in present]


def summarize(results: list[dict], chance: float):
    """{(optimizer, form, method): {lr: mean accuracy over seeds}}."""
    table: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for r in results:
        table.setdefault(arm(r), {}).setdefault(r["lr"], []).append(cell_accuracy(r, chance))
    return {key: {lr: mean(v) for lr, v in sorted(by_lr.items())} for key, by_lr in table.items()}


def report_lines(results: list[dict], chance: float) -> tuple[str, list[str], dict]:
    """One markdown table per optimizer (arms x rates, mean, worst, best-worst, cells that learned) and summary
    lines. Best-worst alone reads an arm that learns at no rate as the least sensitive; the cells that learned
    tell the two apart."""
    summary = summarize(results, chance)
    learned_at = chance + LEARNED_MARGIN
    tables, notes = [], []
    for opt in OPTIMIZERS:
        keys = arms_of(opt, summary)
        if not keys:
            continue
        rates = sorted({lr for k in keys for lr in summary[k]})
        header = ["optimizer", "form", "method", *[f"lr {lr:g}" for lr in rates], "mean", "worst", "best-worst",
                  f"cells >= {100 * learned_at:.3g}%"]
        rows, learned = [], {}
        for key in keys:
            accs = summary[key]
            values = [accs[lr] for lr in rates if lr in accs]
            complete = len(values) == len(rates)
            cells = [cell_accuracy(r, chance) for r in results if arm(r) == key]
            learned[key] = (sum(a >= learned_at - 1e-9 for a in cells), len(cells))
            rows.append([*key, *[fmt_acc(accs.get(lr)) for lr in rates],
                         fmt_acc(mean(values)) + ("" if complete else "*"), fmt_acc(min(values)),
                         f"{100 * (max(values) - min(values)):.1f}",
                         "{} of {}".format(*learned[key])])
            if not complete:
                notes.append(f"- {' '.join(key)}: {len(values)} of {len(rates)} rates finished (* mean of those)")
        tables.append(markdown_table(header, rows))
        best = max(keys, key=lambda k: mean(summary[k].values()))
        robust = max(keys, key=lambda k: min(summary[k].values()))
        notes.append(f"- {opt}: highest mean accuracy: {' '.join(best[1:])} ({fmt_acc(mean(summary[best].values()))}); "
                     f"highest worst-case accuracy: {' '.join(robust[1:])} ({fmt_acc(min(summary[robust].values()))}); "
                     + most_learned(learned))
    collapsed = [f"{' '.join(arm(r))} lr {r['lr']:g} seed {r['seed']} ({letter} {100 * share:.0f}%)"
                 for r in results for letter, share in [dominant_answer(r)] if share >= COLLAPSED_SHARE]
    if collapsed:
        notes.append(f"- collapsed onto one answer (>= {100 * COLLAPSED_SHARE:.0f}% of the questions): "
                     + "; ".join(collapsed))
    return "\n\n".join(tables), notes, summary


def most_learned(learned: dict[tuple[str, str, str], tuple[int, int]]) -> str:
    """Which arms have the largest share of cells that learned ({arm: (learned, cells)}), ties all named."""
    share = {key: k / n for key, (k, n) in learned.items()}
    top = max(share.values())
    if top == 0:
        return "no cell learned"
    return "most cells that learned: " + ", ".join(
        "{} ({} of {})".format(" ".join(key[1:]), *learned[key]) for key in learned if share[key] == top)


def dominant_answer(result: dict) -> tuple[str, float]:
    """The choice the final evaluation gave most often and its share of the answers ("", 0 if not recorded)."""
    predicted = result.get("predicted") or {}
    total = sum(predicted.values())
    if not total:
        return "", 0.0
    letter = max(predicted, key=predicted.get)
    return letter, predicted[letter] / total


def eval_loss_table(results: list[dict]) -> str:
    """Final eval loss per cell (mean over seeds), one table per optimizer: learning shows here first."""
    losses: dict[tuple[str, str, str], dict[float, list[float]]] = {}
    for r in results:
        if r.get("eval_loss") is not None and not r.get("diverged"):
            losses.setdefault(arm(r), {}).setdefault(r["lr"], []).append(r["eval_loss"])
    tables = []
    for opt in OPTIMIZERS:
        keys = arms_of(opt, losses)
        rates = sorted({lr for key in keys for lr in losses[key]})
        if keys:
            rows = [[*key, *[f"{mean(losses[key][lr]):.3f}" if lr in losses[key] else "-" for lr in rates]]
                    for key in keys]
            tables.append(markdown_table(["optimizer", "form", "method", *[f"lr {lr:g}" for lr in rates]], rows))
    return "\n\n".join(tables)


def expert_use_table(results: list[dict]) -> str:
    """Dead experts and the largest expert share at the last step per cell (means over seeds), one table per
    optimizer; empty when no cell recorded expert health."""
    use: dict[tuple[str, str, str], dict[float, list[tuple[float, float]]]] = {}
    for r in results:
        health = r.get("health") or {}
        if "dead_experts" in health:
            use.setdefault(arm(r), {}).setdefault(r["lr"], []).append(
                (health["dead_experts"], health["expert_share_max"]))
    tables = []
    for opt in OPTIMIZERS:
        keys = arms_of(opt, use)
        rates = sorted({lr for key in keys for lr in use[key]})
        if keys:
            def cell(values: list[tuple[float, float]]) -> str:
                return f"{mean(v[0] for v in values):.0f} dead, max {mean(v[1] for v in values):.0%}"
            rows = [[*key, *[cell(use[key][lr]) if lr in use[key] else "-" for lr in rates]] for key in keys]
            tables.append(markdown_table(["optimizer", "form", "method", *[f"lr {lr:g}" for lr in rates]], rows))
    return "\n\n".join(tables)


def per_seed_table(results: list[dict], chance: float) -> str:
    """Accuracy (%) of every seed, one row per (arm, lr), with the spread over seeds (best minus worst seed)."""
    by_cell: dict[tuple, dict[int, float]] = {}
    for r in results:
        by_cell.setdefault((*arm(r), r["lr"]), {})[r["seed"]] = cell_accuracy(r, chance)
    seeds = sorted({r["seed"] for r in results})
    if len(seeds) < 2:
        return ""
    order = {key: (OPTIMIZERS.index(key[0]), list(FORMS).index(key[1]), list(METHODS).index(key[2]), key[3])
             for key in by_cell}
    rows = []
    for key in sorted(by_cell, key=order.get):
        accs = by_cell[key]
        spread = f"{100 * (max(accs.values()) - min(accs.values())):.1f}" if len(accs) > 1 else "-"
        rows.append([*key[:3], f"{key[3]:g}", *[fmt_acc(accs.get(s)) for s in seeds], spread])
    return markdown_table(["optimizer", "form", "method", "lr", *[f"seed {s}" for s in seeds], "seed spread"], rows)


def accuracy_by_step_table(out_dir: Path) -> str:
    """Accuracy (%) at every evaluation during training, one row per cell (cells run with train.eval_every > 0)."""
    from moelora_ds.telemetry.metrics import read_metrics

    rows, steps = [], set()
    for result_path in sorted(out_dir.glob(f"*/{RESULT_FILE}")):
        r = json.loads(result_path.read_text())
        curve = {e["step"]: e["accuracy"] for e in read_metrics(result_path.parent) if "accuracy" in e}
        steps |= curve.keys()
        optimizer, form, method = arm(r)
        rows.append(((OPTIMIZERS.index(optimizer), list(FORMS).index(form), r["lr"], list(METHODS).index(method),
                      r["seed"]), [optimizer, form, method, f"{r['lr']:g}", str(r["seed"])], curve))
    if len(steps) < 2:
        return ""
    steps = sorted(steps)
    return markdown_table(["optimizer", "form", "method", "lr", "seed", *[f"step {s}" for s in steps]],
                          [[*cells, *[fmt_acc(curve.get(s)) for s in steps]] for _, cells, curve in sorted(rows)])


def plot(summary: dict, results: list[dict], path: Path, chance: float) -> None:
    """One panel per (optimizer, form): mean accuracy over seeds against the rate per method, each seed a dot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [(opt, form) for opt in OPTIMIZERS for form in FORMS if any(k[:2] == (opt, form) for k in summary)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), squeeze=False)
    for ax, (opt, form) in zip(axes[0], panels):
        for method, marker, color in zip(METHODS, "osD", ("C0", "C1", "C2")):
            accs = summary.get((opt, form, method))
            if accs:
                ax.plot(list(accs), [100 * a for a in accs.values()], marker=marker, color=color, label=method)
                seeds = [(r["lr"], 100 * cell_accuracy(r, chance)) for r in results if arm(r) == (opt, form, method)]
                ax.scatter(*zip(*seeds), marker=marker, color=color, alpha=0.35, s=14)
        ax.axhline(100 * chance, ls="--", lw=0.8, color="grey", label="chance")
        ax.set_ylim(0, 100)  # the same scale everywhere: a few points around chance must not look like a trend
        ax.set_xscale("log")
        rates = sorted({lr for k, accs in summary.items() if k[:2] == (opt, form) for lr in accs})
        ax.set_xticks(rates, [f"{lr:g}" for lr in rates], minor=False)
        ax.set_xticks([], minor=True)  # the swept rates only: log-axis minor labels overlap over a short range
        ax.set_xlabel("learning rate")
        ax.set_ylabel("final eval accuracy (%)")
        ax.set_title(f"{opt}, {form} form (line: mean over seeds; dots: seeds)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    save_figure(fig, "Benchmark 4: final accuracy vs learning rate", path)


def device_counts(results: list[dict]) -> str:
    """How many cells ran on each device (cells from before devices were recorded ran on a CPU)."""
    counts = Counter(r.get("device", "cpu (not recorded)") for r in results)
    return "; ".join(f"{device}: {n}" for device, n in counts.most_common())


def sweep_settings(args, overrides: list[str]) -> dict:
    """What --report needs to describe a sweep: its commands, the cells' common overrides, ranks, momentum."""
    return {"commands": [args.sweep_args], "overrides": overrides, "num_ranks": args.num_ranks,
            "parallel": args.parallel, "sgd_momentum": args.sgd_momentum}


def record_sweep(out_dir: Path, settings: dict) -> None:
    """Writes `settings` to OUT/sweep.json, keeping the commands of earlier runs into the same directory (a sweep
    run in parts, such as its AdamW and its SGD cells, is reported with every part's command)."""
    path = out_dir / SWEEP_FILE
    earlier = sweep_commands(json.loads(path.read_text())) if path.is_file() else []
    commands = earlier + [c for c in settings["commands"] if c not in earlier]
    path.write_text(json.dumps({**settings, "commands": commands}, indent=2))


def sweep_commands(sweep: dict) -> list[list[str]]:
    """The argument lists of the runs that made a sweep's cells (a file from before "commands" has one "argv")."""
    return sweep.get("commands") or [sweep["argv"]]


def write_report(args, config_path: Path) -> None:
    results = collect(args.out_dir)
    if not results:
        raise SystemExit(f"no {RESULT_FILE} under {args.out_dir}: nothing to report")
    from moelora_ds.config import load_config

    sweep_file = args.out_dir / SWEEP_FILE
    sweep = json.loads(sweep_file.read_text()) if sweep_file.is_file() else sweep_settings(args, [])
    run_config = load_config(config_path, sweep["overrides"])
    chance = 1.0 / len(run_config.data.choices)
    tables, notes, summary = report_lines(results, chance)
    print(tables + "\n\n" + "\n".join(notes))
    if args.plot is not None:
        plot(summary, results, args.plot, chance)
        print(f"wrote {args.plot}")
    if args.results is None:
        return
    sample = results[0]
    seeds = sorted({r["seed"] for r in results})
    optimizers = {r["optimizer"] for r in results}
    walls = [r["wall_s"] for r in results if r.get("wall_s")]
    m = run_config.moelora
    body = [
        f"## Benchmark 4: accuracy across learning rates ({', '.join(o for o in OPTIMIZERS if o in optimizers)}), "
        "plain MoE-LoRA vs Riemannian vs Riemannian + sqrt",
        "",
        f"Command: `{command_line()}`" + (" (the cells: " + "; ".join(f"`python benchmarks/quality.py {' '.join(c)}`"
                                                                         for c in sweep_commands(sweep)) + ")"
                                          if args.report else ""),
        "",
        *machine_lines(["deepspeed", "transformers"], os.getloadavg())[:3],
        f"- cells per device: {device_counts(results)}",
        f"- training: {config_path.name} ({run_config.model.name_or_path} {run_config.model.gguf_file or ''}, "
        f"{run_config.model.dtype}, MoE-LoRA {m.num_experts}x r{m.rank} top-{m.top_k} on "
        f"{', '.join(m.target_modules)}, "
        f"{run_config.scheduler.name} schedule after {run_config.scheduler.warmup_steps} warm-up steps), "
        f"{sweep['num_ranks']} rank(s), ZeRO from {run_config.deepspeed}; {sample['steps']} steps of "
        f"{sweep['num_ranks'] * run_config.train.micro_batch_size} questions, gradient clipping "
        f"{run_config.train.grad_clip or 'off'}; seeds {seeds}; same data order, "
        f"adapter initialisation and steps in every cell",
        "- methods: `plain` optimizer.name=sgd|adamw with gate_rescale=none; `riemannian` riemannian_sgd|adamw "
        "with gate_rescale=none; `riemannian+sqrt` riemannian_* with gate_rescale=sqrt",
        f"- forms: `ours` the configuration's own optimizer settings (AdamW betas {tuple(run_config.optimizer.betas)}, "
        f"eps {run_config.optimizer.eps:g}, bias correction {'on' if run_config.optimizer.bias_correction else 'off'}, "
        f"router lr {run_config.optimizer.router_lr or 'the expert lr'}; SGD momentum {sweep['sgd_momentum']:g}); "
        f"`paper` the paper's recipe (launcher/configs/paper.yaml): AdamW `{' '.join(FORMS['paper']['adamw'])}`, "
        f"SGD `{' '.join(FORMS['paper']['sgd'])}`"
        + "".join(f"; `{form}` ours with AdamW `{' '.join(FORMS[form]['adamw'])}`, SGD `{' '.join(FORMS[form]['sgd'])}`"
                  for form in FORMS if form.startswith("paper_") and any(arm(r)[1] == form for r in results)),
        f"- accuracy: multiple-choice accuracy (%) of the final evaluation on {run_config.data.eval_path} "
        f"(first {run_config.data.eval_max_samples} records)" if run_config.data.eval_max_samples else
        f"- accuracy: multiple-choice accuracy (%) of the final evaluation on {run_config.data.eval_path}",
        f"- per method: mean and worst over the rates, best minus worst (lower: less sensitive, among arms that "
        f"learn), and the cells that learned ({100 * LEARNED_MARGIN:.0f} points above chance or more); a cell "
        f"stopped on non-finite values counts as chance ({100 * chance:.0f}%); {len(results)} cells, "
        f"{sum(walls) / 3600:.1f} h of training",
        "",
        tables,
        "",
        *notes,
        "",
        "Final eval loss per cell (per labelled token; guessing the letter uniformly gives "
        + ("about ln(4)/2 = 0.69 with the end-of-turn token learned):" if run_config.data.train_on_eos
           else "ln(4) = 1.39):"),
        "",
        eval_loss_table(results),
    ]
    seeds_table = per_seed_table(results, chance)
    if seeds_table:
        body += ["", "Accuracy (%) per seed (a diverged cell counts as chance):", "", seeds_table]
    experts = expert_use_table(results)
    if experts:
        body += ["", "Expert use at the last step (expert health: experts below health.dead_share of their layer's "
                 "routed slots, in all layers; the largest share of one expert in any layer):", "", experts]
    curves = accuracy_by_step_table(args.out_dir)
    if curves:
        body += ["", "Accuracy (%) at each evaluation during training (when learning sets in):", "", curves]
    update_results(args.results, args.section, "\n".join(body), plot=args.plot)
    print(f"wrote {args.results}")
