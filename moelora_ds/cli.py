"""Console scripts: moelora-train, moelora-eval, moelora-export."""

from __future__ import annotations

import argparse
import sys

from .config import ConfigError, load_config


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moelora-train",
        description="Fine-tune a causal LM with MoE-LoRA under DeepSpeed. Any configuration key can be "
                    "overridden as --section.key=value (e.g. --train.max_steps=100 --optimizer.lr=1e-3).")
    parser.add_argument("--config", help="YAML or JSON configuration file")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser


def train_main(argv: list[str] | None = None) -> int:
    args, overrides = _train_parser().parse_known_args(argv)
    try:
        config = load_config(args.config, overrides)
    except ConfigError as error:
        print(f"moelora-train: configuration error: {error}", file=sys.stderr)
        return 2
    from .engine import train

    return train(config)
