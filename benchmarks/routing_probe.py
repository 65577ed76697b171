"""Why experts die: per-layer routing and gradients over the first steps of a run, in one process.

The run's own model, data order, adapters, optimizer, loss and schedule (as `train.py` with one rank and
`train.micro_batch_size` x `train.grad_accum` sequences per step), without DeepSpeed: fp32 adapters with bf16
products under autocast (what a bf16 run with fp32 master weights computes), so every gradient is at hand.
Per layer and step it records
  dead       experts under health.dead_share of the layer's routed slots in that step
  entropy    mean router entropy (nats; ln E is uniform)
  router_g   norm of the router's gradient; experts_g: of the experts' (A and B, as the optimizer sees them:
             preconditioned)
  spread     logit spread across tokens (std over tokens, mean over experts): what tells tokens apart;
  offset     std over experts of the mean logit: the preference all tokens share. offset >> spread routes
             every token to the same experts.
and writes OUT.json: per step the sums/medians over layers, per layer at a few steps.

Run:  python benchmarks/routing_probe.py --steps 50 --out OUT [--config FILE] [--key=value ...]
      python benchmarks/routing_probe.py --report [DIR]   (the table of DIR/*.json into RESULTS.md, `routing_probe`)
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(0, str(REPO_ROOT / "benchmarks"))

from moelora_ds.adapters.dropout import dropout_generator, use_dropout_generator  # noqa: E402
from moelora_ds.adapters.inject import inject_moelora, moelora_layers, router_aux_loss  # noqa: E402
from moelora_ds.adapters.routing_noise import set_routing_noise_key  # noqa: E402
from moelora_ds.adapters.routing_stats import attach_routing_stats, routing_summary  # noqa: E402
from moelora_ds.config import load_config  # noqa: E402
from moelora_ds.data.batches import ShardedBatches  # noqa: E402
from moelora_ds.data.prepare import Preparation, prepare  # noqa: E402
from moelora_ds.models.loading import load_base_model, load_tokenizer, local_model_dir  # noqa: E402
from moelora_ds.training.loss import causal_lm_loss, labelled_tokens  # noqa: E402
from moelora_ds.training.optimizers import build_optimizer  # noqa: E402
from moelora_ds.training.schedule import lr_multiplier  # noqa: E402
from moelora_ds.training.trainer import seed_everything  # noqa: E402

PER_LAYER_STEPS = (1, 10, 25, 50, 100, 150)


class LogitSpread:
    """Per layer, the logit spread across tokens and the spread of the mean logit across experts (forward hooks)."""

    def __init__(self, layers) -> None:
        self.values: dict[str, tuple[float, float]] = {}
        for name, layer in layers:
            layer.router.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(module, inputs, logits):
            if module.training:
                logits = logits.detach().float().reshape(-1, logits.shape[-1])
                self.values[name] = (float(logits.std(0).mean()), float(logits.mean(0).std()))
        return hook


def probe(config, steps: int, log=print) -> dict:
    device = torch.device("cpu")
    model_dir = local_model_dir(config.model)
    tokenizer = load_tokenizer(model_dir)
    data = config.data
    examples, _ = prepare(Preparation.of(data.train_path, data), tokenizer, data.cache_dir, log=lambda *_: None)
    train = config.train
    batches = iter(ShardedBatches(examples, micro_batch_size=train.micro_batch_size, rank=0, world_size=1,
                                  seed=train.seed, shuffle=data.shuffle, packing=data.packing,
                                  max_length=data.max_length, pad_token_id=tokenizer.pad_token_id))
    model = load_base_model(model_dir, "float32", None, config.model.attn_implementation)
    seed_everything(train.seed)
    inject_moelora(model, config.moelora, seed=train.seed)
    use_dropout_generator(model, dropout_generator(train.seed, 0, device))
    optimizer = build_optimizer(model, config.optimizer, offload=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(config.scheduler, train.max_steps or steps))
    layers = list(moelora_layers(model))
    stats = attach_routing_stats(model, device)
    spread = LogitSpread(layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    records, per_layer = [], {}
    started = time.perf_counter()
    for step in range(1, steps + 1):
        micro = [next(batches) for _ in range(train.grad_accum)]
        labelled = sum(labelled_tokens(b["labels"]) for b in micro)
        loss_value = 0.0
        for index, batch in enumerate(micro):
            set_routing_noise_key(model, (step - 1) * len(micro) + index)
            with stats.recording(batch["attention_mask"]), torch.autocast("cpu", dtype=torch.bfloat16):
                loss = causal_lm_loss(model, batch, device, reduction="sum", chunk_tokens=train.loss_chunk_tokens)
                loss = loss / labelled
            aux = router_aux_loss(model)
            (loss if aux is None else loss + aux / len(micro)).backward()
            loss_value += float(loss.detach())
        router_g = [float(layer.router.weight.grad.norm()) for _, layer in layers]
        experts_g = [float(torch.cat([layer.lora_A.grad.flatten(), layer.lora_B.grad.flatten()]).norm())
                     for _, layer in layers]
        if train.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, train.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        summary = routing_summary(stats.sums, config.health.dead_share)
        stats.reset()
        spreads = [spread.values[name] for name, _ in layers]
        ratio = [r / max(e, 1e-30) for r, e in zip(router_g, experts_g)]
        records.append({
            "step": step, "loss": loss_value, "dead": int(summary["dead"].sum()),
            "layers_with_dead": int((summary["dead"] > 0).sum()),
            "dead_layers": [i for i in range(len(layers)) if summary["dead"][i] > 0],
            "entropy": float(summary["entropy"].mean()),
            "router_g": statistics.median(router_g), "experts_g": statistics.median(experts_g),
            "router_over_experts": statistics.median(ratio),
            "spread": statistics.median(s for s, _ in spreads), "offset": statistics.median(o for _, o in spreads)})
        if step in PER_LAYER_STEPS or step == steps:
            per_layer[step] = {name: {"dead": int(summary["dead"][i]), "entropy": float(summary["entropy"][i]),
                                      "share": [round(float(v), 4) for v in summary["share"][i]],
                                      "router_g": router_g[i], "experts_g": experts_g[i],
                                      "spread": spreads[i][0], "offset": spreads[i][1]}
                               for i, (name, _) in enumerate(layers)}
        r = records[-1]
        log(f"step {step}: loss {r['loss']:.3f} dead {r['dead']} entropy {r['entropy']:.3f} "
            f"router/experts grad {r['router_over_experts']:.3g} spread {r['spread']:.3g} offset {r['offset']:.3g} "
            f"({time.perf_counter() - started:.0f} s)")
    return {"steps": records, "per_layer": per_layer}


def report_rows(directory: Path) -> list[str]:
    """One markdown row per probe file: arm (its overrides), seed, and its figures at steps 1, 10, 25 and 50."""
    rows = []
    for path in sorted(directory.glob("*.json")):
        result = json.loads(path.read_text())
        by_step = {r["step"]: r for r in result["steps"]}
        last = max(by_step)
        at = [s for s in (1, 10, 25, last) if s in by_step]
        overrides = " ".join(o for o in result["config"]["overrides"]
                             if not o.startswith(("--train.seed", "--train.micro_batch_size"))) or "quickstart"
        if "moelora" not in result["config"] and "router_aux_loss_coef" not in overrides:
            overrides = "--moelora.router_aux_loss_coef=0" + ("" if overrides == "quickstart" else " " + overrides)
        seed = next((o.split("=")[1] for o in result["config"]["overrides"] if o.startswith("--train.seed")), "42")
        late = [r["loss"] for r in result["steps"][-10:]]
        rows.append(f"| {overrides} | {seed} | " + " / ".join(str(by_step[s]["dead"]) for s in at)
                    + f" | {by_step[last]['layers_with_dead']} | {by_step[last]['entropy']:.3f} | "
                    + " / ".join(f"{by_step[s]['router_over_experts']:.2g}" for s in at[1:])
                    + f" | {by_step[last]['spread']:.3f} / {by_step[last]['offset']:.3f} | "
                    + f"{sum(late) / len(late):.3f} |")
    return rows


def write_report(directory: Path) -> None:
    from bench_utils import cpu_kind, update_results

    header = ("| arm (overrides of the quickstart recipe) | seed | dead experts of 480 at step 1 / 10 / 25 / 50 | "
              "layers with "
              "a dead expert (50) | router entropy (50; ln 4 = 1.386) | router / expert gradient norm, median "
              "layer, step 10 / 25 / 50 | logit spread / shared offset (50) | loss, steps 41-50 |\n"
              "|---|---|---|---|---|---|---|---|")
    command = f"python benchmarks/routing_probe.py --report {directory.relative_to(REPO_ROOT)}"
    body = (f"Routing over the first 50 steps of the quickstart recipe, one process, batch 16 (`{command}`; "
            f"machine: {cpu_kind()}). "
            "Dead: under 1% of the layer's routed slots in that step's batch. Spread: the std of a logit over the "
            "batch's tokens (what tells tokens apart); offset: the std over experts of the mean logit (a preference "
            "every token shares). Gradients as the optimizer sees them (experts preconditioned).\n\n"
            + header + "\n" + "\n".join(report_rows(directory)))
    update_results(REPO_ROOT / "benchmarks" / "RESULTS.md", "routing_probe", body)
    print(body)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(REPO_ROOT / "launcher/configs/quickstart.yaml"))
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--out", type=Path, help="writes OUT.json")
    parser.add_argument("--report", type=Path, nargs="?", const=REPO_ROOT / "benchmarks" / "routing_probe")
    args, overrides = parser.parse_known_args(argv)
    if args.report:
        write_report(args.report.resolve())
        return
    if args.out is None:
        parser.error("--out is required unless --report")
    config = load_config(args.config, overrides)
    result = probe(config, args.steps)
    result["config"] = {"file": args.config, "overrides": overrides, "moelora": config.moelora.to_dict(),
                        "optimizer": asdict(config.optimizer)}
    out = args.out.parent / f"{args.out.name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
