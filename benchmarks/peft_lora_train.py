"""Baseline trainers for benchmarks/throughput.py: the launcher's model, data, ZeRO config and loop; other adapters.

    deepspeed --num_gpus 2 benchmarks/peft_lora_train.py --mode peft   --config CFG [--section.key=value ...]
    deepspeed --num_gpus 2 benchmarks/peft_lora_train.py --mode frozen --config CFG [--section.key=value ...]

The same configuration file and overrides as launcher/train.py, and the same moelora_ds pieces: config
loading, DeepSpeed config (ZeRO stage, bf16, batch sizes), base model loading (ZeRO-3 partitioned at
build time), tokenization, sharded batches, learning-rate schedule. Only the trainable part differs:
  peft    PEFT LoRA (rank --lora-rank, alpha --lora-alpha, the config's dropout) on the config's
          moelora.target_modules, trained with torch AdamW (lr, betas, eps, weight decay from the config)
  frozen  no adapters: one trainable scalar multiplies the input embeddings' output, so backward runs
          the input-gradient pass through every frozen layer and nothing else (plain SGD on the scalar)
Writes OUTPUT_DIR/metrics.jsonl (rank 0): {"step", "loss", "lr", "tokens_per_s"} per step, tokens_per_s
measured as in moelora_ds/training/trainer.py (non-padding tokens of all ranks / wall time of the step), with one
host read per step as there. No
checkpoints, no evaluation.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True)
    parser.add_argument("--mode", choices=["peft", "frozen"], required=True)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_known_args(argv)


def add_peft_lora(model: nn.Module, targets, rank: int, alpha: float, dropout: float, dtype: torch.dtype) -> None:
    """PEFT LoRA on the linears `targets` (moelora.target_modules, its presets resolved for this model) selects."""
    from peft import LoraConfig, inject_adapter_in_model

    from moelora_ds.adapters.config import MoELoRAConfig
    from moelora_ds.adapters.inject import find_target_linears
    from moelora_ds.adapters.targets import PRESETS

    if targets in PRESETS:
        targets = sorted({path.rsplit(".", 1)[-1] for path in find_target_linears(model, MoELoRAConfig(
            target_modules=targets))})
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                                       bias="none"), model)
    for name, param in model.named_parameters():
        if "lora_" in name:
            param.data = param.data.to(dtype)
            param.requires_grad_(True)
        else:
            param.requires_grad_(False)


def add_trainable_scalar(model: nn.Module, dtype: torch.dtype) -> None:
    """A scalar (shape (1,), value 1) multiplying the input embeddings: gradients flow back through every layer."""
    embeddings = model.get_input_embeddings()
    embeddings.bench_scale = nn.Parameter(torch.ones(1, dtype=dtype))
    embeddings.register_forward_hook(lambda module, inputs, output: output * module.bench_scale)


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    from moelora_ds.config import load_config
    from moelora_ds.data.batches import ShardedBatches
    from moelora_ds.data.records import load_records, tokenize_as_configured
    from moelora_ds.distributed.process_group import all_sum, init_distributed
    from moelora_ds.models.loading import DTYPES, load_base_model, load_tokenizer, local_model_dir
    from moelora_ds.training.deepspeed_config import build_deepspeed_config
    from moelora_ds.training.loss import causal_lm_loss
    from moelora_ds.training.precision import resolve_dtype
    from moelora_ds.training.schedule import scheduler_factory
    from moelora_ds.training.trainer import seed_everything

    config = load_config(args.config, overrides)
    train = config.train
    rank, world_size = init_distributed(timeout_s=train.collective_timeout_s)
    device = torch.device(get_accelerator().device_name(get_accelerator().current_device()))
    ds_config = build_deepspeed_config(config, world_size)
    seed_everything(train.seed)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    model_dir = local_model_dir(config.model, is_converter=local_rank == 0, barrier=dist.barrier)
    tokenizer = load_tokenizer(model_dir)
    records, fmt = load_records(config.data.train_path, config.data.format)
    examples, _ = tokenize_as_configured(records, fmt, tokenizer, config.data)
    batches = ShardedBatches(examples, micro_batch_size=train.micro_batch_size, rank=rank, world_size=world_size,
                             seed=train.seed, shuffle=config.data.shuffle, packing=config.data.packing,
                             max_length=config.data.max_length, pad_token_id=tokenizer.pad_token_id)

    model = load_base_model(model_dir, config.model.dtype, ds_config, config.model.attn_implementation)
    seed_everything(train.seed)
    dtype = DTYPES[resolve_dtype(config.model.dtype, announce=False)]
    opt = config.optimizer
    if args.mode == "peft":
        add_peft_lora(model, config.moelora.target_modules, args.lora_rank, args.lora_alpha,
                      config.moelora.dropout, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps,
                                      weight_decay=opt.weight_decay)
    else:
        add_trainable_scalar(model, dtype)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=1e-6)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    total_steps = train.max_steps
    engine, _, _, scheduler = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config,
                                                   lr_scheduler=scheduler_factory(config.scheduler, total_steps))
    trainable = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
    output_dir = Path(train.output_dir)
    metrics = None
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        metrics = open(output_dir / "metrics.jsonl", "w")
        print(f"[peft_lora_train] mode={args.mode}: {trainable} trainable parameters, {total_steps} steps", flush=True)
    engine.train()
    batch_iter = iter(batches)
    for step in range(1, total_steps + 1):
        lr = scheduler.get_last_lr()[0]
        started = time.perf_counter()
        losses, tokens = [], 0
        for _ in range(train.grad_accum):
            batch = next(batch_iter)
            tokens += int(batch["attention_mask"].numpy().sum())
            loss = causal_lm_loss(engine, batch, device)
            losses.append(loss.detach().double())
            engine.backward(loss)
            engine.step()
        loss_sum, tokens = all_sum([torch.stack(losses).sum(), tokens], device)  # the step's one host read
        tokens_per_s = tokens / (time.perf_counter() - started)
        if metrics is not None:
            metrics.write(json.dumps({"step": step, "loss": loss_sum / (len(losses) * world_size), "lr": lr,
                                      "tokens_per_s": tokens_per_s, "trainable_params": trainable}) + "\n")
            metrics.flush()
    if metrics is not None:
        metrics.close()
    dist.barrier()
    return 0


if __name__ == "__main__":
    from moelora_ds.distributed.process_group import end_rank_process

    end_rank_process(main())
