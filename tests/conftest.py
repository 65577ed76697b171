"""Shared fixtures: tiny models built from configs, a real BPE tokenizer trained offline, small data sets."""

from __future__ import annotations

import json
import os
import random
import sys
from pathlib import Path

import pytest
import torch

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
        question = f"Which word means {target}? " + " ".join(f"{l} {o}" for l, o in zip("ABCD", options))
        records.append({"messages": [{"role": "user", "content": question},
                                     {"role": "assistant", "content": answer}]})
    return records


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A tiny Llama with its tokenizer saved as a Hugging Face directory, as a user's local model would be."""
    path = tmp_path_factory.mktemp("tiny-llama")
    build_tiny_model("llama").save_pretrained(path)
    tiny_tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_mc_data(tmp_path_factory) -> dict[str, Path]:
    """train.jsonl (64 records) and test.jsonl (16 records) of multiple-choice chat data."""
    path = tmp_path_factory.mktemp("mc-data")
    return {"train": write_jsonl(path / "train.jsonl", multiple_choice_records(64, seed=0)),
            "test": write_jsonl(path / "test.jsonl", multiple_choice_records(16, seed=1))}


@pytest.fixture(scope="session")
def subprocess_env() -> dict[str, str]:
    """Environment for launched ranks: the repo importable, offline, quiet."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    """A private two-node SLURM cluster (node1, node2) on this machine; see tests/slurm_cluster.py."""
    from slurm_cluster import SlurmCluster

    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
