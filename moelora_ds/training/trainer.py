"""The DeepSpeed trainer: a frozen (ZeRO-3 sharded) causal LM with injected MoE-LoRA experts.

`train(config)` reads top to bottom like the algorithm: set up ranks, data, model, optimizer and
DeepSpeed; resume; then for every step run `grad_accum` micro-batches, step, log, evaluate and
checkpoint; finally checkpoint, evaluate and tear down.
"""

from __future__ import annotations

import random
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator

from moelora_ds.adapters.dropout import dropout_generator, use_dropout_generator
from moelora_ds.adapters.inject import inject_moelora, router_aux_loss
from moelora_ds.adapters.routing_noise import set_routing_noise_key
from moelora_ds.checkpoints.compatibility import data_fingerprint
from moelora_ds.checkpoints.locate import CHECKPOINTS, read_run_info
from moelora_ds.checkpoints.reshard import convert_data_position, saved_units_per_batch
from moelora_ds.checkpoints.save_load import save_checkpoint
from moelora_ds.config import RunConfig, advisories, config_to_dict
from moelora_ds.data.batches import ShardedBatches
from moelora_ds.data.prepare import Preparation
from moelora_ds.data.records import DataError
from moelora_ds.data.shared import prepare_for_ranks
from moelora_ds.distributed.process_group import all_sum, all_sum_tensor, init_distributed, local_rank
from moelora_ds.evaluation.evaluate import evaluate_run, prepare_eval_set
from moelora_ds.models.loading import load_base_model, load_tokenizer, local_model_dir
from moelora_ds.telemetry.expert_health import ExpertHealth
from moelora_ds.telemetry.metrics import MetricsLogger
from moelora_ds.telemetry.step_figures import StepFigures
from moelora_ds.telemetry.trackers import open_trackers
from moelora_ds.training.cadence import SaveCadence
from moelora_ds.training.deepspeed_config import build_deepspeed_config, offloads_optimizer, zero_stage
from moelora_ds.training.grad_norm import grad_norm_share, own_grad_norm
from moelora_ds.training.loss import causal_lm_loss, host_to_device, labelled_tokens
from moelora_ds.training.nonfinite import StepGuard, check_finite_state, discard_gradients, nonfinite_gradients
from moelora_ds.training.optimizers import build_optimizer, undo_state_initialization_step
from moelora_ds.training.resume import find_resume_point, restore
from moelora_ds.training.schedule import scheduler_factory
from moelora_ds.training.signals import EXIT_CHECKPOINTED_ON_SIGNAL, PreemptionFlag


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    get_accelerator().manual_seed_all(seed)


def build_model(config: RunConfig, ds_config: dict, model_dir: Path):
    """Frozen base (partitioned at build time under ZeRO-3) with MoE-LoRA injected from `train.seed`."""
    model = load_base_model(model_dir, config.model.dtype, ds_config, config.model.attn_implementation)
    seed_everything(config.train.seed)
    inject_moelora(model, config.moelora, seed=config.train.seed)
    if config.model.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


@dataclass
class StepStats:
    loss: float
    """The task loss (mean over micro-batches and ranks; token-weighted under loss_normalization=tokens)."""
    router_loss: Optional[float]
    """The router loss terms added to it (moelora.router_aux_loss_coef, router_z_loss_coef), same mean; None: off."""
    tokens: int
    """This rank's non-padding tokens."""
    labelled: int
    """This rank's tokens the loss is taken over."""
    grad_norm: Optional[torch.Tensor | float]
    """This rank's share of the global gradient norm before clipping (grad_norm.grad_norm_share), or None."""
    skipped: Optional[str]
    """Why the step's update was discarded (nonfinite.StepGuard.outcome), or None."""


class Trainer:
    def __init__(self, config: RunConfig) -> None:
        self.config = config
        self.rank, self.world_size = init_distributed(timeout_s=config.train.collective_timeout_s)
        if self.rank == 0:
            for note in advisories(config):
                print(f"[moelora-ds] warning: {note}", flush=True)
        self.device = torch.device(get_accelerator().device_name(get_accelerator().current_device()))
        self.ds_config = build_deepspeed_config(config, self.world_size)
        self.output_dir = Path(config.train.output_dir)
        self.checkpoint_root = self.output_dir / CHECKPOINTS
        seed_everything(config.train.seed)

        self.model_dir = local_model_dir(config.model, is_converter=local_rank() == 0, barrier=dist.barrier)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.batches = self._batches_or_error_on_every_rank()
        self.eval_set = prepare_eval_set(config.data, self.tokenizer) if config.data.eval_path else None
        self.total_steps = self._total_steps()
        self.data_fingerprint = data_fingerprint(config.data.train_path)
        self.resume_point = find_resume_point(config, self.world_size, self.data_fingerprint, self.rank == 0)
        if self.resume_point is not None and self.resume_point.universal:
            self.ds_config.setdefault("checkpoint", {})["load_universal"] = True

        model = build_model(config, self.ds_config, self.model_dir)
        self.dropout = dropout_generator(config.train.seed, self.rank, self.device)
        """This rank's dropout stream (adapters/dropout.py), saved and restored with its checkpoint files."""
        use_dropout_generator(model, self.dropout)
        optimizer = build_optimizer(model, config.optimizer, offload=offloads_optimizer(self.ds_config),
                                    partitioned=zero_stage(self.ds_config) > 0, device=self.device)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler_factory(config.scheduler, self.total_steps),
            config=self.ds_config)
        undo_state_initialization_step(self.engine.optimizer)
        self.figures = StepFigures(self.engine.module, self.engine.bfloat16_enabled() or self.engine.fp16_enabled(),
                                   self.world_size)
        self.step = 0
        self.preemption = PreemptionFlag()
        self.cadence = SaveCadence(config.train, self.rank)
        self.health: Optional[ExpertHealth] = None
        """Routing telemetry (health.enabled), attached in train() once the first step is known."""

    def _batches_or_error_on_every_rank(self) -> ShardedBatches:
        """This rank's batches; if loading failed on any rank, a DataError on all of them (each names its own
        cause), so every rank reports it before the launcher sees one exit and kills the rest."""
        try:
            batches, failure = self._build_batches(), None
        except DataError as error:
            batches, failure = None, error
        if all_sum([float(failure is not None)], self.device)[0]:
            raise failure or DataError(f"rank {self.rank}: another rank could not load its data (see its message)")
        return batches

    def _build_batches(self) -> ShardedBatches:
        data = self.config.data
        examples = prepare_for_ranks(Preparation.of(data.train_path, data), self.tokenizer, data, "data.train_path")
        stats = examples.stats
        try:
            if not len(examples):
                raise ValueError(f"all {stats['records']} records were dropped as longer than "
                                 f"data.max_length={data.max_length} (data.overlong={data.overlong})")
            batches = ShardedBatches(examples, micro_batch_size=self.config.train.micro_batch_size, rank=self.rank,
                                     world_size=self.world_size, seed=self.config.train.seed, shuffle=data.shuffle,
                                     packing=data.packing, max_length=data.max_length,
                                     pad_token_id=self.tokenizer.pad_token_id)
        except ValueError as error:
            raise DataError(f"data.train_path: {data.train_path}: {error}") from None
        if self.rank == 0:
            print(f"[moelora-ds] {data.train_path}: {stats['records']} {stats['format']} records, {stats['examples']} "
                  f"examples of {stats['tokens']} tokens ({stats['truncated']} truncated, {stats['dropped']} dropped "
                  f"as longer than data.max_length={data.max_length}, data.overlong={data.overlong}), prepared in "
                  f"{examples.directory}", flush=True)
        return batches

    def _total_steps(self) -> int:
        train = self.config.train
        if train.max_steps is not None:
            return train.max_steps
        return max(1, train.epochs * self.batches.batches_per_epoch // train.grad_accum)

    def run_info(self) -> dict:
        return {"world_size": self.world_size, "zero_stage": zero_stage(self.ds_config),
                "model_dir": str(self.model_dir), "data_fingerprint": self.data_fingerprint,
                "config": config_to_dict(self.config)}

    def resume(self) -> None:
        """Continue from the checkpoint found at start-up (if any): weights, optimizer, schedule, data, RNG."""
        if self.resume_point is None:
            return
        client_state = restore(self.engine, self.scheduler, self.resume_point, self.checkpoint_root, self.dropout,
                               self.device)
        self.step = client_state["step"]
        units = self.config.train.micro_batch_size * self.world_size
        saved_units = saved_units_per_batch(read_run_info(self.resume_point.directory))
        self.batches.load_state_dict(convert_data_position(client_state["data"], saved_units, units))
        if self.rank == 0:
            print(f"[moelora-ds] resumed from {self.resume_point.directory} at step {self.step}")

    def save(self) -> Path:
        client_state = {"step": self.step, "data": self.batches.state_dict()}
        path = save_checkpoint(self.engine, self.checkpoint_root, self.step, client_state, self.run_info(),
                               keep=self.config.train.keep_checkpoints, dropout=self.dropout)
        self.cadence.saved()
        return path

    def train_step(self, batch_iter) -> StepStats:
        """`grad_accum` micro-batches and one optimizer step, discarded whole or stopped if anything is non-finite.

        The step's micro-batches are drawn first: under `train.loss_normalization=tokens` each one's summed token
        losses are weighted by `token_weight`, so that the step's gradient is that of the mean over every labelled
        token of the global batch. The losses stay on the device; one all-reduce before the boundary
        `engine.step()` brings every micro-batch's loss and finiteness (and at stage 0 the gradients' finiteness)
        to all ranks, the step's only wait for the device (nonfinite.py says how a step is discarded under
        `train.nonfinite=skip`). The logged loss is the mean over micro-batches and ranks: token-weighted under
        `tokens`.
        """
        guard = StepGuard(self.config.train.nonfinite, self.step + 1)
        micro_batches = self.config.train.grad_accum
        batches = [next(batch_iter) for _ in range(micro_batches)]
        labelled = sum(labelled_tokens(batch["labels"]) for batch in batches)
        weight = self.token_weight(labelled)
        losses, router_losses, tokens = [], [], 0
        for micro, batch in enumerate(batches):
            set_routing_noise_key(self.engine.module, (self.step * micro_batches + micro) * self.world_size + self.rank)
            tokens += int(np.count_nonzero(batch["attention_mask"].numpy()))
            recording = (self.health.recording(host_to_device(batch["attention_mask"], self.device))
                         if self.health is not None else nullcontext())
            with recording:
                chunk = self.config.train.loss_chunk_tokens
                if weight is None:
                    loss = causal_lm_loss(self.engine, batch, self.device, chunk_tokens=chunk)
                else:
                    loss = causal_lm_loss(self.engine, batch, self.device, reduction="sum", chunk_tokens=chunk) * weight
            losses.append(loss.detach().double())
            aux = router_aux_loss(self.engine.module)
            if aux is not None:
                router_losses.append(aux.detach().double())
                loss = loss + aux.to(loss.dtype)
            self.engine.backward(loss)
            if micro < micro_batches - 1:
                self.engine.step()
        step_losses = torch.stack(losses)
        if router_losses:
            step_losses = step_losses + torch.stack(router_losses)  # a non-finite router loss discards the step too
        nonfinite_losses = (~torch.isfinite(step_losses)).unbind()
        router_sum = torch.stack(router_losses).sum() if router_losses else torch.zeros((), dtype=torch.float64)
        loss_sum, router_sum, *nonfinite, bad_grads = all_sum(
            [torch.stack(losses).sum(), router_sum, *nonfinite_losses, nonfinite_gradients(self.engine, self.device)],
            self.device)
        guard.losses(nonfinite, self.world_size)
        own_norm = own_grad_norm(self.engine)
        if bad_grads:
            discard_gradients(self.engine)
        self.engine.step()
        skipped = guard.outcome(self.engine.was_step_applied(), bool(bad_grads), self.engine.get_global_grad_norm(),
                                self.engine.fp16_enabled(), self.scheduler.step)
        count = micro_batches * self.world_size
        return StepStats(loss=loss_sum / count, router_loss=router_sum / count if router_losses else None,
                         tokens=tokens, labelled=labelled,
                         grad_norm=grad_norm_share(self.engine, own_norm, self.rank), skipped=skipped)

    def token_weight(self, labelled: int) -> Optional[torch.Tensor]:
        """Under `train.loss_normalization=tokens`: grad_accum x ranks / the global batch's labelled tokens (this
        rank's `labelled` summed over ranks by one all-reduce into an fp32 device scalar, never read back to the
        host), as DeepSpeed divides each micro-batch's loss by grad_accum and averages over ranks; None under
        `sequences`."""
        if self.config.train.loss_normalization != "tokens":
            return None
        total = all_sum_tensor(host_to_device(torch.tensor(float(labelled), dtype=torch.float64), self.device))
        return (self.config.train.grad_accum * self.world_size / total.clamp_min(1.0)).float()

    def train(self) -> int:
        """Resume, run the steps (update, record, evaluate, log, checkpoint), then checkpoint and evaluate the end."""
        self.resume()
        logger = None
        if self.rank == 0:
            trackers = open_trackers(self.config.train, self.output_dir, self.run_info())
            logger = MetricsLogger(self.output_dir, self.total_steps, self.step, trackers=trackers,
                                   plots=self.config.train.plots)
        if self.config.health.enabled:
            self.health = ExpertHealth(self.engine.module, self.config.health, self.device, first_step=self.step + 1)
        batch_iter = iter(self.batches)
        self.engine.train()
        stop = min(self.total_steps, self.config.train.stop_at or self.total_steps)
        exit_code = 0
        while self.step < stop:
            preempted, clock_votes = self.step_and_record(batch_iter, logger, last=self.step + 1 == stop)
            if preempted:
                self.save()
                if logger is not None:
                    signal_name = self.preemption.name or "a preemption signal (on another rank)"
                    logger.write(f"[moelora-ds] {signal_name}: checkpointed step {self.step}; exiting for requeue")
                exit_code = EXIT_CHECKPOINTED_ON_SIGNAL
                break
            if self.step < stop and self.cadence.due(self.step, clock_votes):
                self.save()
        if exit_code == 0:
            self.finish(logger)
        if logger is not None:
            if self.health is not None:
                self.health.finish(self.output_dir, logger)
            logger.close()
        dist.barrier()  # leave together: a rank tearing its process group down while another still used it aborted
        return exit_code

    def step_and_record(self, batch_iter, logger: Optional[MetricsLogger], last: bool) -> tuple[bool, float]:
        """One optimizer step and its metrics record (evaluated and logged when due); returns whether a preemption
        signal arrived on any rank and the summed wall-clock save votes (cadence.py), agreed on by every rank."""
        train = self.config.train
        lr = self.scheduler.get_last_lr()[0]
        started = time.perf_counter()
        stats = self.train_step(batch_iter)
        self.step += 1
        known_norm = stats.grad_norm is not None  # the same on every rank
        tokens, labelled, preempted, grad_norm, clock_votes = check_finite_state(
            self.engine, self.device, f"after step {self.step}", also_sum=[
                stats.tokens, stats.labelled, float(self.preemption.raised), stats.grad_norm if known_norm else 0.0,
                self.cadence.clock_vote()])
        record = {"step": self.step, "loss": stats.loss, **({} if stats.router_loss is None else
                                                            {"router_loss": stats.router_loss}),
                  "lr": lr, "epoch": self.batches.state_dict()["epoch"],
                  **self.figures.step(time.perf_counter() - started, tokens, labelled,
                                      grad_norm if known_norm else None)}
        if stats.skipped:
            record["skipped"] = stats.skipped
            if logger is not None:
                logger.write(f"[moelora-ds] step {self.step}: {stats.skipped}; the update was discarded")
        evaluated = bool(self.config.data.eval_path and train.eval_every and self.step % train.eval_every == 0
                         and not last)
        if evaluated:
            record.update(self.evaluate())
        health_due = self.health is not None and (self.step % self.config.health.every == 0 or last)
        if health_due:
            self.health.interval(self.step, record, logger)
        logged = self.step % train.log_every == 0 or last or evaluated or health_due
        if logger is not None:
            logger.advance(self.step, stats.loss, lr, record["tokens_per_s"])
            if logged:
                self.figures.logged(record)
                logger.log(record)
        return bool(preempted), clock_votes

    def finish(self, logger: Optional[MetricsLogger]) -> None:
        """The final checkpoint and evaluation."""
        self.save()
        if self.config.data.eval_path:
            final = self.evaluate()
            if logger is not None:
                logger.log({"step": self.step, **final})
                logger.write(f"[moelora-ds] final evaluation: {final}")

    def evaluate(self) -> dict:
        return evaluate_run(self.engine, self.eval_set, self.tokenizer, rank=self.rank, world_size=self.world_size,
                            micro_batch_size=self.config.train.micro_batch_size,
                            chunk_tokens=self.config.train.loss_chunk_tokens)


def train(config: RunConfig) -> int:
    """Run training; returns the process exit status (0, or EXIT_CHECKPOINTED_ON_SIGNAL after a preemption)."""
    try:
        return Trainer(config).train()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
