"""Console scripts: moelora-train, moelora-eval, moelora-export, moelora-prepare."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from moelora_ds.config import ConfigError, RunConfig, load_config
from moelora_ds.distributed.process_group import end_rank_process, say, wait_for_every_rank_to_report
from moelora_ds.distributed.rendezvous import LaunchEnvironmentError, rendezvous_from_env
from moelora_ds.training.precision import resolve_dtype


def _run_config(path: str | None, overrides: list[str]) -> RunConfig:
    """The validated configuration with `model.dtype: auto` resolved for this machine (announced by rank 0)."""
    config = load_config(path, overrides)
    try:
        rank = rendezvous_from_env(os.environ).get("RANK", "0")
    except LaunchEnvironmentError:
        rank = "0"
    try:
        config.model.dtype = resolve_dtype(config.model.dtype, announce=rank == "0")
    except ValueError as error:
        raise ConfigError(f"{config.source}: model.dtype: auto: {error}") from None
    return config


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora-train",
        description="Fine-tune a causal LM with MoE-LoRA under DeepSpeed. Any configuration key can be "
                    "overridden as --section.key=value (e.g. --train.max_steps=100 --optimizer.lr=1e-3).")
    parser.add_argument("--config", help="YAML or JSON configuration file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    """Exit status: 0 done, 2 configuration or data error, 3 non-finite values, 75 checkpointed on a signal."""
    args, overrides = _train_parser().parse_known_args(argv)
    try:
        config = _run_config(args.config, overrides)
        from moelora_ds.training.preflight import preflight

        preflight(config)
    except ConfigError as error:
        say(f"moelora-train: configuration error: {error}", sys.stderr)
        wait_for_every_rank_to_report()  # or the launcher may kill a rank before it has printed its message
        return 2
    from moelora_ds.checkpoints.locate import CheckpointError
    from moelora_ds.data.records import DataError
    from moelora_ds.training.nonfinite import NonFiniteError
    from moelora_ds.training.trainer import train

    try:
        return train(config)
    except ConfigError as error:
        say(f"moelora-train: configuration error: {error}", sys.stderr)
        return 2
    except DataError as error:
        say(f"moelora-train: data error: {error}", sys.stderr)
        return 2
    except CheckpointError as error:
        say(f"moelora-train: checkpoint error: {error}", sys.stderr)
        return 2
    except NonFiniteError as error:
        say(f"moelora-train: stopped: {error}", sys.stderr)
        return 3


def _export_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora-export",
        description="Export a training checkpoint (any ZeRO stage, any world size) as a Hugging Face model "
                    "directory with the adapters merged (loads with AutoModelForCausalLM.from_pretrained), "
                    "or as the adapter weights alone (loads with moelora_ds.load_adapter).")
    parser.add_argument("--checkpoint", required=True, help="the training run's output_dir (holding checkpoints/)")
    parser.add_argument("--tag", default=None, help="checkpoint tag, e.g. step_200 (default: checkpoints/latest)")
    parser.add_argument("--out", required=True, help="directory to create (must not exist, or be empty)")
    parser.add_argument("--mode", choices=["merged", "adapter"], default="merged",
                        help="merged: self-contained model directory (default); adapter: adapter weights only")
    parser.add_argument("--max-shard-size", default="2GB", help="largest weight file of a merged export (default 2GB)")
    return parser


def export_main(argv: list[str] | None = None) -> int:
    args = _export_parser().parse_args(argv)
    from moelora_ds.checkpoints.locate import CheckpointError
    from moelora_ds.export.exporter import ExportError, export_checkpoint

    try:
        out = export_checkpoint(Path(args.checkpoint), Path(args.out), mode=args.mode, tag=args.tag,
                                max_shard_size=args.max_shard_size)
    except (CheckpointError, ExportError, OSError) as error:
        say(f"moelora-export: error: {error}", sys.stderr)
        return 2
    print(f"moelora-export: wrote {out}")
    return 0


def _prepare_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora-prepare",
        description="Tokenize a config's training and evaluation data once into data.cache_dir, where training "
                    "and evaluation memory-map it (say, on a CPU node before the GPU job starts). "
                    "--section.key=value overrides apply as in training.")
    parser.add_argument("--config", help="YAML or JSON configuration file (model and data sections are used)")
    return parser


def prepare_main(argv: list[str] | None = None) -> int:
    """Exit status: 0 prepared (or already prepared), 2 configuration or data error."""
    args, overrides = _prepare_parser().parse_known_args(argv)
    from moelora_ds.data.prepare import Preparation, prepare
    from moelora_ds.models.loading import load_tokenizer, local_model_dir

    try:
        config = load_config(args.config, overrides)
        tokenizer = load_tokenizer(local_model_dir(config.model))
    except ConfigError as error:
        say(f"moelora-prepare: configuration error: {error}", sys.stderr)
        return 2
    data = config.data
    for key, paths, limit in (("data.train_path", data.train_path, None),
                              ("data.eval_path", data.eval_path, data.eval_max_samples)):
        if not paths:
            continue
        try:
            examples, built = prepare(Preparation.of(paths, data, limit), tokenizer, data.cache_dir,
                                      data.prepare_workers)
        except (OSError, ValueError) as error:
            say(f"moelora-prepare: data error: {key}: {error}", sys.stderr)
            return 2
        stats = examples.stats
        print(f"moelora-prepare: {key}: {examples.directory} ({'prepared now' if built else 'already prepared'}): "
              f"{stats['records']} {stats['format']} records, {stats['examples']} examples, {stats['tokens']} tokens, "
              f"{stats['truncated']} truncated, {stats['dropped']} dropped (data.max_length={data.max_length}, "
              f"data.overlong={data.overlong})", flush=True)
    return 0


def _eval_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora-eval",
        description="Loss and multiple-choice accuracy on the config's data.eval_path, for the config's base "
                    "model, a training checkpoint (--checkpoint) or an exported model (--model); sharded over "
                    "ranks when started by a launcher. --section.key=value overrides apply as in training.")
    parser.add_argument("--config", help="YAML or JSON configuration file (model and data sections are used)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--checkpoint", help="a training run's output_dir (or a checkpoint tag directory)")
    source.add_argument("--model", help="an exported directory: merged model or adapter export")
    parser.add_argument("--tag", default=None, help="checkpoint tag (default: checkpoints/latest)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow --model to run the modeling code its directory ships (a merged MoE-LoRA export "
                             "with several experts per layer has such code); without it, such a model is refused")
    parser.add_argument("--json-out", default=None, help="also write the result as JSON to this file")
    parser.add_argument("--routing-report", metavar="OUT", default=None,
                        help="also write how the MoE-LoRA layers route the data (per layer and expert; per answer "
                             "class for multiple-choice data) to OUT.json and a heat map to OUT.png")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def eval_main(argv: list[str] | None = None) -> int:
    args, overrides = _eval_parser().parse_known_args(argv)
    try:
        config = _run_config(args.config, overrides)
    except ConfigError as error:
        say(f"moelora-eval: configuration error: {error}", sys.stderr)
        return 2
    if not config.data.eval_path:
        say("moelora-eval: configuration error: data.eval_path is not set", sys.stderr)
        return 2
    import json

    import torch.distributed as dist

    from moelora_ds.checkpoints.locate import CheckpointError
    from moelora_ds.distributed.process_group import init_distributed, local_rank
    from moelora_ds.evaluation.evaluate import evaluate_run, prepare_eval_set
    from moelora_ds.evaluation.models import load_for_eval

    rank, world_size = init_distributed()
    try:
        model, tokenizer, what = load_for_eval(
            config, checkpoint=Path(args.checkpoint) if args.checkpoint else None, tag=args.tag,
            exported=Path(args.model) if args.model else None,
            is_converter=local_rank() == 0, barrier=dist.barrier, trust_remote_code=args.trust_remote_code)
        if args.routing_report:  # first: a model without routed layers fails before the evaluation's time is spent
            _routing_report(args.routing_report, config, getattr(model, "module", model), tokenizer, what, rank,
                            world_size)
        eval_set = prepare_eval_set(config.data, tokenizer)
        result = evaluate_run(model, eval_set, tokenizer, rank=rank, world_size=world_size,
                              micro_batch_size=config.train.micro_batch_size,
                              chunk_tokens=config.train.loss_chunk_tokens)
        if rank == 0:
            print(f"moelora-eval: {what} on {config.data.eval_path}: " + json.dumps(result), flush=True)
            if args.json_out:
                Path(args.json_out).write_text(json.dumps({"model": what, **result}, indent=2))
        return 0
    except (CheckpointError, OSError, ValueError) as error:
        say(f"moelora-eval: error: {error}", sys.stderr)
        return 2
    finally:
        dist.destroy_process_group()


def _routing_report(out: str, config, model, tokenizer, what: str, rank: int, world_size: int) -> None:
    """`moelora-eval --routing-report OUT`: every rank routes its share; rank 0 writes OUT.json and OUT.png."""
    from moelora_ds.telemetry.routing_report import ALL, routing_report

    report = routing_report(model, config.data, tokenizer, dead_share=config.health.dead_share, rank=rank,
                            world_size=world_size, micro_batch_size=config.train.micro_batch_size)
    if rank == 0:
        json_path, png = report.write(Path(out), what)
        overall = report.summaries[ALL]
        print(f"moelora-eval: routing of {len(report.names)} layers over {int(overall['tokens'][0])} {report.counted}: "
              f"expert shares {float(overall['share'].min()):.1%}-{float(overall['share'].max()):.1%}, "
              f"{int(overall['dead'].sum())} dead expert(s); wrote {json_path}"
              + (f" and {png}" if png else " (no PNG: matplotlib is not installed)"), flush=True)


def train_command() -> NoReturn:
    """`moelora-train` and launcher/train.py: run on this rank, then end the process (see end_rank_process)."""
    end_rank_process(train_main())


def eval_command() -> NoReturn:
    """`moelora-eval` and launcher/eval.py."""
    end_rank_process(eval_main())
