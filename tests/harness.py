"""The test harness the tests and scripts/gpu_check.py share: tiny models, tokenizer and data; the tiny training run
and its single-process reference; reading trained adapters back from a checkpoint. No pytest here.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
WORDS = ["cat", "dog", "tree", "car", "river", "stone", "bird", "house", "cloud", "apple", "chair", "lamp"]


def build_tokenizer(vocab_size: int = 320):
    """A byte-level BPE tokenizer with a ChatML template, trained offline on a fixed toy corpus."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    corpus = [f"Which word means {w}? A {a} B {b} C {c} D {d}. Answer: {x}" for w, a, b, c, d, x in
              zip(WORDS, WORDS[1:], WORDS[2:], WORDS[3:], WORDS[4:], "ABCDABCDAB")] * 20
    backend.train_from_iterator(corpus, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model_config(arch: str = "llama", vocab_size: int = 320):
    """A 2-layer config of the named architecture, small enough for CPU tests."""
    import transformers as tf

    common = dict(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=256)
    if arch == "llama":
        return tf.LlamaConfig(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "qwen2":
        return tf.Qwen2Config(num_key_value_heads=2, tie_word_embeddings=False, **common)
    if arch == "mistral":
        return tf.MistralConfig(num_key_value_heads=2, sliding_window=None, **common)
    if arch == "qwen3":
        return tf.Qwen3Config(num_key_value_heads=2, head_dim=8, tie_word_embeddings=False, **common)
    tokens = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if arch == "phi3":
        return tf.Phi3Config(num_key_value_heads=2, **tokens, **common)
    if arch == "gemma2":
        return tf.Gemma2Config(num_key_value_heads=2, head_dim=8, **tokens, **common)
    if arch == "gemma3":
        return tf.Gemma3TextConfig(num_key_value_heads=2, head_dim=8, **tokens, **common)
    if arch == "olmo2":
        return tf.Olmo2Config(num_key_value_heads=2, **tokens, **common)
    if arch == "gpt_neox":
        return tf.GPTNeoXConfig(**common)
    raise ValueError(arch)


def build_tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 320):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_model_config(arch, vocab_size)).eval()


def multiple_choice_records(n: int, seed: int = 0) -> list[dict]:
    """Chat-format four-option questions whose answer is a letter, as the WordNet set has them."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        options = rng.sample(WORDS, 4)
        answer = "ABCD"[i % 4]
        target = options["ABCD".index(answer)]
        listed = " ".join(f"{letter} {option}" for letter, option in zip("ABCD", options))
        question = f"Which word means {target}? {listed}"
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def save_tiny_model_dir(path: Path, tokenizer=None) -> Path:
    """The tiny Llama and its tokenizer saved as a Hugging Face directory, as a user's local model would be."""
    build_tiny_model("llama").save_pretrained(path)
    (tokenizer or build_tokenizer()).save_pretrained(path)
    return path


def run_config(tiny_model_dir: Path, data: dict, output_dir: Path, **sections) -> dict:
    """A tiny fp32 run: 4 experts, top-2, sqrt gate rescaling, no dropout, grad accumulation 2, 10 steps.

    No plots (the tests that draw them say so). Without router loss terms: their gradients reach the routers from
    step 1 at sizes where Adam's update is nearly sign(g), so rounding (the order ranks sum in) decides signs; and
    without routing noise, which is keyed by world size and rank. The trainer tests cover both with SGD."""
    config = {
        "model": {"name_or_path": str(tiny_model_dir), "gguf_file": None, "dtype": "float32"},
        "moelora": {"num_experts": 4, "rank": 4, "alpha": 8, "dropout": 0.0, "top_k": 2, "gate_rescale": "sqrt",
                    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], "router_aux_loss_coef": 0.0,
                    "router_noise": 0.0},
        "optimizer": {"name": "riemannian_adamw", "lr": 1e-2, "reg": 1e-3, "router_lr": 5e-3},
        "scheduler": {"name": "linear", "warmup_steps": 2, "min_lr_ratio": 0.1},
        "data": {"train_path": str(data["train"]), "eval_path": None, "max_length": 64},
        "train": {"max_steps": 10, "micro_batch_size": 2, "grad_accum": 2, "grad_clip": 0.0, "seed": 7,
                  "output_dir": str(output_dir), "resume": "never", "plots": False},
        "deepspeed": "ds_configs/zero3.json",
    }
    for section, values in sections.items():
        config[section] = {**config[section], **values} if isinstance(values, dict) else values
    return config


def load_config_from_dict(config: dict):
    """A validated RunConfig from a config dict, through a YAML file as a user's would be read."""
    from moelora_ds.config import load_config

    with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as handle:
        yaml.safe_dump(config, handle)
    return load_config(handle.name)


@dataclass
class Reference:
    """What the single-process reference run ends with."""
    adapters: dict[str, torch.Tensor]
    """Final adapter weights (fp32, on the CPU), by parameter name."""
    losses: list[float]
    """Training loss of every step (token-weighted over the global batch, or the mean over its micro-batches)."""
    grad_norms: list[float]
    """Global norm of every step's gradient, what clipping (train.grad_clip) compares."""


def reference_model(config: dict, world_size: int, device: str = "cpu"):
    """The reference's parsed config, its model (the base in fp32 with the run's adapters, on `device`) and the
    ranks' batch iterators, as a run of `world_size` ranks would draw them."""
    from moelora_ds.adapters.inject import inject_moelora
    from moelora_ds.data.batches import ShardedBatches
    from moelora_ds.data.records import load_records, tokenize_as_configured
    from moelora_ds.models.loading import load_base_model, load_tokenizer
    from moelora_ds.training.trainer import seed_everything

    cfg = load_config_from_dict(config)
    tokenizer = load_tokenizer(Path(cfg.model.name_or_path))
    records, fmt = load_records(cfg.data.train_path, cfg.data.format)
    examples, _ = tokenize_as_configured(records, fmt, tokenizer, cfg.data)
    shards = [iter(ShardedBatches(examples, micro_batch_size=cfg.train.micro_batch_size, rank=r, world_size=world_size,
                                  seed=cfg.train.seed, shuffle=cfg.data.shuffle, packing=cfg.data.packing,
                                  max_length=cfg.data.max_length, pad_token_id=tokenizer.pad_token_id))
              for r in range(world_size)]
    model = load_base_model(Path(cfg.model.name_or_path), "float32")
    seed_everything(cfg.train.seed)
    inject_moelora(model, cfg.moelora, seed=cfg.train.seed)
    return cfg, model.to(device), shards


def reference_start(config: dict, device: str = "cpu") -> dict[str, torch.Tensor]:
    """The adapters the reference starts from (fp32, on the CPU), by parameter name."""
    from moelora_ds.adapters.inject import adapter_parameters

    _, model, _ = reference_model(config, 1, device)
    return {name: p.detach().float().cpu().clone() for name, p in adapter_parameters(model).items()}


def reference_micro_gradients(config: dict, device: str = "cpu") -> list[dict[str, torch.Tensor]]:
    """The gradient the reference (1 rank) has accumulated after each micro-batch of its first step (the run's
    preconditioning applied, each micro-batch's loss divided by grad_accum as DeepSpeed does), fp32 on the CPU."""
    from moelora_ds.adapters.inject import adapter_parameters
    from moelora_ds.training.optimizers import build_optimizer

    cfg, model, (shard,) = reference_model(config, 1, device)
    build_optimizer(model, cfg.optimizer, offload=False)  # sets the layers' preconditioning
    model.train()
    accumulated = []
    for _ in range(cfg.train.grad_accum):
        batch = next(shard)
        (model(**{k: v.to(device) for k, v in batch.items()}).loss / cfg.train.grad_accum).backward()
        accumulated.append({name: p.grad.detach().float().cpu().clone()
                            for name, p in adapter_parameters(model).items()})
    return accumulated


def reference_run(config: dict, world_size: int, device: str = "cpu", reverse_order: bool = False,
                  plain: bool = False, bf16_autocast: bool = False) -> Reference:
    """The same run in one process, without DeepSpeed: the global batch of every step is the union of the ranks'
    micro-batches. `reverse_order` takes the micro-batches, and the rows of each, in reverse order: the same
    sums in another order, so the result differs from the plain reference by rounding only. The optimizer is the
    run's own (build_optimizer), or with `plain` the method written out (PlainAdamW). The loss is normalised as
    train.loss_normalization says: by the labelled tokens of the whole global batch, or per micro-batch; each
    micro-batch's router loss terms are added divided by the number of micro-batches (the trainer adds them to
    every micro-batch's loss, which DeepSpeed averages); the returned losses are the task loss, as logged.
    `bf16_autocast` computes forward and backward in bf16 from the fp32 weights (what a bf16 run with fp32 master
    weights does, its noise without DeepSpeed)."""
    from moelora_ds.adapters.inject import adapter_parameters, router_aux_loss
    from moelora_ds.adapters.routing_noise import set_routing_noise_key
    from moelora_ds.training.loss import labelled_tokens
    from moelora_ds.training.optimizers import build_optimizer
    from moelora_ds.training.schedule import lr_multiplier

    cfg, model, shards = reference_model(config, world_size, device)
    if plain:
        plain_step = PlainAdamW(model, cfg)
    else:
        optimizer = build_optimizer(model, cfg.optimizer, offload=False)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_multiplier(cfg.scheduler, cfg.train.max_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    losses, grad_norms = [], []
    for index in range(cfg.train.max_steps):
        batches = [next(shard) for _ in range(cfg.train.grad_accum) for shard in shards]
        labelled = sum(labelled_tokens(batch["labels"]) for batch in batches)
        step_loss = 0.0
        for position, batch in reversed(list(enumerate(batches))) if reverse_order else enumerate(batches):
            # the routing noise's key as the trainer sets it on rank r for its micro-batch m: position m * ranks + r
            set_routing_noise_key(model, index * len(batches) + position)
            batch = {k: v.flip(0) if reverse_order else v for k, v in batch.items()}
            inputs = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16_autocast):
                if cfg.train.loss_normalization == "tokens":  # transformers' own sum over the batch's tokens / count
                    loss = model(**inputs, num_items_in_batch=labelled).loss
                else:
                    loss = model(**inputs).loss / len(batches)
            aux = router_aux_loss(model)  # each micro-batch's router loss, averaged like the ranks' and micro-batches'
            (loss if aux is None else loss + aux / len(batches)).backward()
            step_loss += loss.item()
        losses.append(step_loss)
        if plain:
            plain_step(index)
            continue
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        grad_norms.append(float(torch.nn.utils.clip_grad_norm_(trainable, clip)))
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    adapters = {name: p.detach().float().cpu().clone() for name, p in adapter_parameters(model).items()}
    return Reference(adapters, losses, grad_norms)


class PlainAdamW:
    """Riemannian AdamW as docs/METHOD.md sections 1-2 and the paper's train_llama.py state it, written out in float64.

    Every expert's summed raw gradient preconditioned with explicit inverses, the routers' gradient norm
    alone clipped to optimizer.router_clip (expert gradients unclipped), then AdamW with or without bias
    correction, linear decay to min_lr_ratio without warm-up.
    """

    def __init__(self, model, cfg) -> None:
        from moelora_ds.adapters.optimizer import set_preconditioning

        assert cfg.optimizer.name == "riemannian_adamw" and cfg.scheduler.name == "linear"
        assert cfg.scheduler.warmup_steps == 0 and cfg.train.grad_clip == 0 and cfg.optimizer.weight_decay == 0
        self.model, self.cfg = model, cfg
        set_preconditioning(model, None)  # the raw gradient: preconditioned below
        self.moments = {name: (torch.zeros_like(p, dtype=torch.float64), torch.zeros_like(p, dtype=torch.float64))
                        for name, p in model.named_parameters() if p.requires_grad}

    @torch.no_grad()
    def __call__(self, index: int) -> None:
        from moelora_ds.adapters.inject import adapter_parameters, moelora_layers

        opt, t = self.cfg.optimizer, index + 1
        params = adapter_parameters(self.model)
        grads = {name: p.grad.double() for name, p in params.items()}
        for path, layer in moelora_layers(self.model):
            A, B = layer.lora_A.double(), layer.lora_B.double()
            eye = torch.eye(A.shape[1], dtype=torch.float64)
            grad_A, grad_B = grads[f"{path}.lora_A"], grads[f"{path}.lora_B"]
            for e in range(A.shape[0]):
                grad_A[e] = torch.linalg.inv(B[e].T @ B[e] + opt.reg * eye) @ grad_A[e]
                grad_B[e] = grad_B[e] @ torch.linalg.inv(A[e] @ A[e].T + opt.reg * eye)
        routers = [name for name in grads if name.endswith(".router.weight")]
        if opt.router_clip > 0:
            norm = sum(grads[name].pow(2).sum() for name in routers).sqrt()
            for name in routers:
                grads[name] *= min(1.0, opt.router_clip / (norm.item() + 1e-6))
        decay = 1 - (1 - self.cfg.scheduler.min_lr_ratio) * index / (self.cfg.train.max_steps - 1)
        beta1, beta2 = opt.betas
        for name, p in params.items():
            lr = (opt.router_lr if name in routers else opt.lr) * decay
            m, v = self.moments[name]
            m.mul_(beta1).add_(grads[name], alpha=1 - beta1)
            v.mul_(beta2).addcmul_(grads[name], grads[name], value=1 - beta2)
            if opt.bias_correction:
                update = (m / (1 - beta1 ** t)) / ((v / (1 - beta2 ** t)).sqrt() + opt.eps)
            else:
                update = m / (v.sqrt() + opt.eps)
            p -= (lr * update).to(p.dtype)
            p.grad = None


def bf16_bound(gap: float, noise: float) -> float:
    """How far a bf16 run's final adapters may be from the fp32 reference's (global relative error).

    `noise` is the distance bf16 arithmetic itself puts between the two on this machine: the reference computed
    under bf16 autocast (fp32 weights, bf16 products) against the fp32 reference. A bf16 run also rounds what
    autocast keeps in fp32 (norms, softmax, residual sums, the weights themselves), so it lands a few times further
    (1.1x for AdamW, 2.5x for SGD measured on an AMX CPU): within 4x of it. And the bound stays under half of
    `gap`, the reference's distance to the same run without preconditioning, so a bf16 path that lost the
    preconditioning cannot pass."""
    return min(gap / 2, 4 * noise)


def checkpoint_adapters(output_dir: Path, tag: Optional[str] = None) -> dict[str, torch.Tensor]:
    """Adapter weights (fp32) of a checkpoint (default: the latest): ZeRO partitions gathered, or stage 0's module."""
    from moelora_ds.checkpoints.locate import read_run_info

    root = Path(output_dir) / "checkpoints"
    tag = tag or (root / "latest").read_text().strip()
    if read_run_info(root / tag)["zero_stage"] == 0:
        state = torch.load(root / tag / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(root), tag=tag)
    return {name: tensor.float() for name, tensor in state.items() if ".lora_" in name or ".router." in name}


def relative_errors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> dict[str, float]:
    """||got - want|| / ||want|| of every tensor."""
    assert set(got) == set(want), set(got) ^ set(want)
    return {k: ((got[k] - want[k]).norm() / want[k].norm().clamp_min(1e-12)).item() for k in want}


def max_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    return max(relative_errors(got, want).values())


def global_relative_error(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """||got - want|| / ||want|| over all adapter tensors together."""
    squared = lambda tensors: sum(t.double().pow(2).sum() for t in tensors)
    return (squared(got[k] - want[k] for k in want) / squared(want.values())).sqrt().item()


PLAIN_LOADER = """
import sys
sys.modules["moelora_ds"] = None  # whatever is installed, the export must not need it
try:
    import moelora_ds
    raise SystemExit("moelora_ds is importable")
except ImportError:
    pass
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model_dir, batch, out, remote, device = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5]
model, info = AutoModelForCausalLM.from_pretrained(model_dir, trust_remote_code=remote, output_loading_info=True)
assert not any(info.values()), info
model = model.to(device)
tokenizer = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=remote)
with torch.no_grad():
    logits = model(torch.load(batch).to(device)).logits.cpu()
prompt = tokenizer("Which word means cat?", return_tensors="pt").to(device)
generated = model.generate(**prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)
torch.save({"logits": logits, "generated": generated.shape[1] - prompt["input_ids"].shape[1],
            "class": type(model).__name__}, out)
"""


def load_in_plain_transformers(model_dir: Path, input_ids: torch.Tensor, workdir: Path, remote: bool,
                               device: str = "cpu") -> dict:
    """Load `model_dir` in a fresh Python that cannot import moelora_ds (nor the repository): logits on `input_ids`
    (on the CPU), how many tokens a greedy generation added, the model class."""
    import os
    import subprocess
    import sys

    workdir.mkdir(parents=True, exist_ok=True)
    torch.save(input_ids, workdir / "batch.pt")
    path = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p and Path(p).resolve() != REPO]
    env = {"PATH": os.environ.get("PATH", str(Path(sys.executable).parent)), "PYTHONPATH": os.pathsep.join(path),
           "HF_HOME": str(workdir / "hf-home"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run([sys.executable, "-c", PLAIN_LOADER, str(model_dir), str(workdir / "batch.pt"),
                             str(workdir / "loaded.pt"), "1" if remote else "0", device],
                            cwd=workdir, env=env, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"loading {model_dir} in plain transformers failed:\n{result.stderr[-4000:]}")
    return torch.load(workdir / "loaded.pt")


def deepspeed_command(world_size: int, *script: str, cli: bool = False) -> list[str]:
    """The command that runs `script` (a path and its arguments) on `world_size` local DeepSpeed ranks.

    `cli`: `deepspeed --num_gpus N ...`, as a user starts it. Otherwise the per-node launcher that command runs,
    `python -m deepspeed.launcher.launch`, with the arguments the CLI gives it for one node: the same ranks and
    environment, without the CLI's own start-up (it imports all of DeepSpeed to build this command: ~2.5 s of
    every launch on a 2-core CPU). Tests of what users see from the launcher use the CLI."""
    port = str(free_port())
    if cli:
        return ["deepspeed", "--num_gpus", str(world_size), "--master_port", port, *script]
    world = base64.urlsafe_b64encode(json.dumps({"localhost": list(range(world_size))}).encode()).decode()
    return [sys.executable, "-u", "-m", "deepspeed.launcher.launch", f"--world_info={world}",
            "--master_addr=127.0.0.1", f"--master_port={port}", *script]


def launch(config: dict, workdir: Path, env: dict, *extra: str, world_size: int = 2,
           check: bool = True, cli: bool = False) -> subprocess.CompletedProcess:
    """`launcher/train.py --config FILE [overrides]` on `world_size` DeepSpeed ranks (`deepspeed_command`)."""
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    command = deepspeed_command(world_size, str(REPO / "launcher" / "train.py"), "--config", str(path), *extra,
                                cli=cli)
    result = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"training failed ({result.returncode}):\n{result.stdout[-4000:]}\n"
                             f"{result.stderr[-4000:]}")
    return result


def free_port() -> int:
    """A TCP port free on this machine now (for a launcher's --master_port)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
