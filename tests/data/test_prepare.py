"""The prepared-data cache: the same examples as tokenizing in memory, keyed by everything that changes them,
safe against concurrent and killed builds, batched and resumed from the memory maps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from moelora_ds.config import DataConfig
from moelora_ds.data import records as records_module
from moelora_ds.data.batches import ShardedBatches
from moelora_ds.data.prepare import Preparation, cache_directory, prepare
from moelora_ds.data.prepared import PreparedExamples
from moelora_ds.data.tokenization import tokenize_records

from conftest import REPO, build_tokenizer, multiple_choice_records, write_jsonl
from harness import run_config

MULTI_TURN = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Which word means cat?"},
                           {"role": "assistant", "content": "A cat"},
                           {"role": "user", "content": "And dog?"},
                           {"role": "assistant", "content": "B dog"}]}
WORDS = ["cat", "the dog", "a tree", "river stone", "bird", "house by the cloud", "apple"]


def corpus(fmt: str, n: int) -> list[dict]:
    """n records of `fmt` of varied lengths (some longer than 24 tokens)."""
    texts = [" and ".join(WORDS[(i + j) % len(WORDS)] for j in range(1 + i % 9)) for i in range(n)]
    if fmt == "chat":
        return [MULTI_TURN if i % 5 == 0 else r for i, r in enumerate(multiple_choice_records(n))]
    if fmt == "prompt_completion":
        return [{"prompt": f"Name {i}: {t}", "completion": t[::-1]} for i, t in enumerate(texts)]
    return [{"text": t} for t in texts]


def data_config(tmp_path: Path, **values) -> DataConfig:
    return DataConfig(**{"max_length": 24, "cache_dir": str(tmp_path / "cache"), "prepare_workers": 2, **values})


def prepared(paths, data: DataConfig, tokenizer, limit=None) -> tuple[PreparedExamples, bool]:
    return prepare(Preparation.of(paths, data, limit), tokenizer, data.cache_dir, data.prepare_workers,
                   log=lambda message: None)


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 records, so every test crosses chunk (and worker) boundaries."""
    monkeypatch.setattr(records_module, "CHUNK_RECORDS", 7)


@pytest.mark.parametrize("fmt", ["chat", "prompt_completion", "text"])
@pytest.mark.parametrize("label_eos", [True, False])
@pytest.mark.parametrize("overlong", ["truncate", "drop"])
def test_prepared_examples_equal_tokenizing_in_memory(tmp_path, tiny_tokenizer, small_chunks, fmt, label_eos,
                                                      overlong):
    records = corpus(fmt, 40)
    path = write_jsonl(tmp_path / "data.jsonl", records)
    data = data_config(tmp_path, train_on_eos=label_eos, overlong=overlong, max_length=24 if fmt != "chat" else 40)
    examples, built = prepared(str(path), data, tiny_tokenizer)
    expected, stats = tokenize_records(records, fmt, tiny_tokenizer, data.max_length, overlong, label_eos)
    assert built and list(examples) == expected and len(expected) > 0
    assert examples.stats == {"format": fmt, "records": 40, "examples": stats["examples"],
                              "tokens": sum(len(e["input_ids"]) for e in expected),
                              "truncated": stats["truncated"], "dropped": stats["dropped"]}
    assert np.array_equal(examples.lengths, [len(e["input_ids"]) for e in expected])
    if fmt == "text":
        assert stats["truncated" if overlong == "truncate" else "dropped"] > 0


def test_cache_hit_miss_and_invalidation(tmp_path, tiny_tokenizer, small_chunks):
    path = write_jsonl(tmp_path / "train.jsonl", corpus("text", 30))
    data = data_config(tmp_path)
    first, built = prepared(str(path), data, tiny_tokenizer)
    again, rebuilt = prepared(str(path), data, tiny_tokenizer)
    assert built and not rebuilt and again.directory == first.directory and list(again) == list(first)
    changed_length, built = prepared(str(path), data_config(tmp_path, max_length=16), tiny_tokenizer)
    assert built and changed_length.directory != first.directory
    changed_tokenizer, built = prepared(str(path), data, build_tokenizer(vocab_size=300))
    assert built and changed_tokenizer.directory not in (first.directory, changed_length.directory)
    write_jsonl(path, corpus("text", 31))
    changed_file, built = prepared(str(path), data, tiny_tokenizer)
    assert built and changed_file.stats["records"] == 31 and changed_file.directory != first.directory
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


@pytest.mark.parametrize("damage", ["manifest", "tokens", "offsets"])
def test_a_corrupt_cache_is_rebuilt_with_a_message(tmp_path, tiny_tokenizer, damage):
    path = write_jsonl(tmp_path / "train.jsonl", corpus("text", 20))
    data = data_config(tmp_path)
    examples, _ = prepared(str(path), data, tiny_tokenizer)
    expected, directory = list(examples), examples.directory
    del examples
    if damage == "manifest":
        (directory / "manifest.json").unlink()
    elif damage == "tokens":
        with open(directory / "tokens.bin", "r+b") as handle:
            handle.truncate(8)
    else:
        offsets = np.fromfile(directory / "offsets.bin", dtype=np.int64)
        offsets[3] += 1
        offsets.tofile(directory / "offsets.bin")
    messages = []
    rebuilt, built = prepare(Preparation.of(str(path), data), tiny_tokenizer, data.cache_dir, 1, log=messages.append)
    assert built and rebuilt.directory == directory and list(rebuilt) == expected
    assert "not usable" in messages[0] and "rebuilding" in messages[0]


def test_a_list_of_sources_is_concatenated_and_each_validated(tmp_path, tiny_tokenizer, small_chunks):
    first, second = corpus("chat", 10), multiple_choice_records(9, seed=3)
    paths = [str(write_jsonl(tmp_path / "a.jsonl", first)), str(write_jsonl(tmp_path / "b.jsonl", second))]
    data = data_config(tmp_path, max_length=64)
    examples, _ = prepared(paths, data, tiny_tokenizer)
    assert list(examples) == tokenize_records(first + second, "chat", tiny_tokenizer, 64)[0]
    assert examples.stats["records"] == 19
    limited, _ = prepared(paths, data, tiny_tokenizer, limit=12)
    assert list(limited) == list(examples)[:12]
    lines = (tmp_path / "b.jsonl").read_text().splitlines()
    (tmp_path / "b.jsonl").write_text("\n".join(lines[:7] + ["{broken"] + lines[7:]) + "\n")
    with pytest.raises(ValueError, match=r"b\.jsonl:8: line 8 is not valid JSON"):
        prepared(paths, data, tiny_tokenizer)
    write_jsonl(tmp_path / "b.jsonl", [{"text": "not a chat"}])
    with pytest.raises(ValueError, match=r"b\.jsonl: record 0: missing field\(s\) \['messages'\]"):
        prepared(paths, data, tiny_tokenizer)
    with pytest.raises(ValueError, match=r"a\.jsonl: record 0 is \d+ tokens long, more than max_length=8"):
        prepared(paths, data_config(tmp_path, max_length=8, overlong="error"), tiny_tokenizer)
    assert not list((tmp_path / "cache").glob("*.tmp-*"))


@pytest.mark.parametrize("packing", [False, True])
def test_batches_from_the_memory_maps_equal_batches_from_lists_and_resume(tmp_path, tiny_tokenizer, packing):
    records = corpus("chat", 23)
    examples, _ = prepared(str(write_jsonl(tmp_path / "d.jsonl", records)), data_config(tmp_path, max_length=96),
                           tiny_tokenizer)
    in_memory = tokenize_records(records, "chat", tiny_tokenizer, 96)[0]
    make = lambda source: ShardedBatches(source, micro_batch_size=2, rank=1, world_size=2, seed=3,  # noqa: E731
                                         packing=packing, max_length=96, pad_token_id=tiny_tokenizer.pad_token_id)
    reference = iter(make(in_memory))
    expected = [next(reference) for _ in range(3 * make(examples).batches_per_epoch + 1)]
    interrupted, stop = make(examples), make(examples).batches_per_epoch + 1
    drawn = iter(interrupted)
    got = [next(drawn) for _ in range(stop)]
    resumed = make(examples)
    resumed.load_state_dict(json.loads(json.dumps(interrupted.state_dict())))
    drawn = iter(resumed)
    got += [next(drawn) for _ in expected[stop:]]
    for want, batch in zip(expected, got, strict=True):
        assert batch.keys() == want.keys() and all(torch.equal(batch[k], want[k]) for k in want)


BUILD_SCRIPT = """
import sys
from transformers import AutoTokenizer
from moelora_ds.config import DataConfig
from moelora_ds.data.prepare import Preparation, prepare
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1])
data = DataConfig(max_length=64, cache_dir=sys.argv[3], prepare_workers=1)
examples, built = prepare(Preparation.of(sys.argv[2], data), tokenizer, data.cache_dir, 1, log=lambda m: None)
print(examples.directory, built, len(examples), flush=True)
"""


def start_build(tmp_path: Path, tiny_model_dir: Path, data: Path, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", BUILD_SCRIPT, str(tiny_model_dir), str(data),
                             str(tmp_path / "cache")], cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_concurrent_builds_leave_one_valid_cache(tmp_path, tiny_model_dir, tiny_tokenizer, subprocess_env):
    records = corpus("chat", 3000)
    path = write_jsonl(tmp_path / "race.jsonl", records)
    builders = [start_build(tmp_path, tiny_model_dir, path, subprocess_env) for _ in range(2)]
    outputs = [builder.communicate(timeout=300) for builder in builders]
    assert all(b.returncode == 0 for b in builders), [err[-2000:] for _, err in outputs]
    directories = {out.split()[0] for out, _ in outputs}
    assert len(directories) == 1 and all(out.split()[2] == "3000" for out, _ in outputs)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [Path(directories.pop()).name]
    examples, built = prepared(str(path), data_config(tmp_path, max_length=64), tiny_tokenizer)
    assert not built and list(examples) == tokenize_records(records, "chat", tiny_tokenizer, 64)[0]


def test_a_killed_build_is_never_trusted_and_is_rebuilt(tmp_path, tiny_model_dir, tiny_tokenizer, subprocess_env):
    records = corpus("chat", 20000)
    path = write_jsonl(tmp_path / "big.jsonl", records)
    data = data_config(tmp_path, max_length=64)
    final, _ = cache_directory(Preparation.of(str(path), data), tiny_tokenizer, data.cache_dir)
    builder = start_build(tmp_path, tiny_model_dir, path, subprocess_env)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*.tmp-*/tokens.bin")) or \
            not any(p.stat().st_size for p in (tmp_path / "cache").glob("*.tmp-*/tokens.bin")):
        assert builder.poll() is None and time.monotonic() < deadline, "the build ended before it could be killed"
        time.sleep(0.05)
    os.kill(builder.pid, signal.SIGKILL)
    builder.wait()
    assert not final.exists() and list((tmp_path / "cache").glob("*.tmp-*"))
    examples, built = prepared(str(path), data, tiny_tokenizer)
    assert built and examples.directory == final and examples.stats["records"] == 20000
    assert list(examples) == tokenize_records(records, "chat", tiny_tokenizer, 64)[0]
    assert not list((tmp_path / "cache").glob("*.tmp-*")), "the killed build's leftovers were removed"


def test_moelora_prepare_prints_the_cache_and_its_counts(tmp_path, tiny_model_dir, tiny_mc_data, capsys):
    from moelora_ds.cli import prepare_main

    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out")
    config["data"].update(eval_path=str(tiny_mc_data["test"]), cache_dir=str(tmp_path / "cache"), max_length=16,
                          eval_max_samples=10)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert prepare_main(["--config", str(tmp_path / "config.json"), "--data.overlong=drop"]) == 0
    train, evaluation = [line for line in capsys.readouterr().out.splitlines() if line.startswith("moelora-prepare")]
    assert train.startswith(f"moelora-prepare: data.train_path: {tmp_path / 'cache'}/train-")
    assert "(prepared now): 64 chat records, " in train and "0 truncated, " in train
    assert int(train.split(" dropped")[0].rsplit(" ", 1)[1]) > 0
    assert "data.eval_path" in evaluation and "10 chat records" in evaluation
    assert prepare_main(["--config", str(tmp_path / "config.json"), "--data.overlong=drop"]) == 0
    assert capsys.readouterr().out.count("(already prepared)") == 2
    write_jsonl(tmp_path / "bad.jsonl", [{"text": "fine"}, {"txt": "typo"}])
    bad = f"--data.train_path={tmp_path / 'bad.jsonl'}"
    assert prepare_main(["--config", str(tmp_path / "config.json"), bad]) == 2
    assert "moelora-prepare: data error: data.train_path: " in capsys.readouterr().err
