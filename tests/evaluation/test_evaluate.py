"""Evaluation: multiple-choice accuracy against known answers and a brute-force scorer, token-weighted loss,
and the distributed protocol (sharded scoring, all-reduced sums, equal forward passes on every rank)."""

from __future__ import annotations

import json
import math
import os
import subprocess

import pytest
import torch

from moelora_ds.config import DataConfig
from moelora_ds.data.tokenization import tokenize_records
from moelora_ds.evaluation.evaluate import (
    choice_token_ids,
    eval_batches,
    evaluate_loss,
    evaluate_run,
    multiple_choice_accuracy,
    multiple_choice_predictions,
    prepare_eval_set,
)

from conftest import REPO, build_tiny_model, build_tokenizer, multiple_choice_records, write_jsonl
from harness import deepspeed_command

LETTERS = ("A", "B", "C", "D")


@pytest.fixture(scope="module")
def model():
    return build_tiny_model("llama", seed=3)


def rigged_model(token_id: int):
    """A tiny Llama whose output head ignores the input and always prefers `token_id`."""
    model = build_tiny_model("llama")
    head = torch.nn.Linear(model.config.hidden_size, model.config.vocab_size, bias=True)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.bias[token_id] = 1.0
    model.lm_head = head
    return model


def brute_force_predictions(model, tokenizer, records) -> list[str]:
    """One unpadded forward per record, argmax over the letters' tokens at the last position."""
    predictions = []
    for record in records:
        prompt = tokenizer.apply_chat_template(record["messages"][:-1], add_generation_prompt=True,
                                               tokenize=True, return_dict=False)
        letter_ids = [tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
        predictions.append(LETTERS[int(logits[letter_ids].argmax())])
    return predictions


def test_rigged_model_scores_exactly_the_answers_it_prefers(tiny_tokenizer):
    records = multiple_choice_records(16)  # answers cycle A, B, C, D
    c_token = tiny_tokenizer.convert_tokens_to_ids("C")
    result = multiple_choice_accuracy(rigged_model(c_token), tiny_tokenizer, records, micro_batch_size=5)
    assert result == {"accuracy": 0.25, "correct": 4, "total": 16, "predicted": {"A": 0, "B": 0, "C": 16, "D": 0}}
    only_c = [r for r in records if r["messages"][-1]["content"] == "C"]
    assert multiple_choice_accuracy(rigged_model(c_token), tiny_tokenizer, only_c)["accuracy"] == 1.0


def test_batched_accuracy_matches_brute_force(model, tiny_tokenizer):
    records = multiple_choice_records(13, seed=4)
    gold = [r["messages"][-1]["content"] for r in records]
    predicted = brute_force_predictions(model, tiny_tokenizer, records)
    expected = sum(p == g for p, g in zip(predicted, gold))
    for micro_batch_size in (1, 4, 13):
        result = multiple_choice_accuracy(model, tiny_tokenizer, records, micro_batch_size=micro_batch_size)
        assert result == {"accuracy": expected / 13, "correct": expected, "total": 13,
                          "predicted": {letter: predicted.count(letter) for letter in LETTERS}}
    assert multiple_choice_predictions(model, tiny_tokenizer, records) == predicted


def test_choice_tokens_are_checked(tiny_tokenizer):
    prompt = tiny_tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                                tokenize=False)
    expected = [tiny_tokenizer.convert_tokens_to_ids(letter) for letter in LETTERS]
    assert choice_token_ids(tiny_tokenizer, prompt, LETTERS) == expected
    with pytest.raises(ValueError, match="not a single token"):
        choice_token_ids(tiny_tokenizer, prompt, ["A", "zebra"])
    with pytest.raises(ValueError, match="distinct"):
        choice_token_ids(tiny_tokenizer, prompt, ["A", "A"])
    records = multiple_choice_records(2)
    records[1]["messages"][-1]["content"] = "E"
    with pytest.raises(ValueError, match="record 1: the answer 'E' is not one of the choices"):
        multiple_choice_accuracy(build_tiny_model(), tiny_tokenizer, records)


def test_loss_is_token_weighted_and_independent_of_batching(model, tiny_tokenizer):
    records = [{"text": "cat"}, {"text": "the dog and the bird by the river"}, {"text": "a stone house"}]
    examples, _ = tokenize_records(records, "text", tiny_tokenizer, 64)
    sums, counts = 0.0, 0
    with torch.no_grad():
        for e in examples:
            n = len(e["input_ids"]) - 1
            sums += float(model(input_ids=torch.tensor([e["input_ids"]]), labels=torch.tensor([e["labels"]])).loss) * n
            counts += n
    for micro_batch_size in (1, 2, 3):
        batches = eval_batches(examples, micro_batch_size=micro_batch_size, rank=0, world_size=1,
                               pad_token_id=tiny_tokenizer.pad_token_id)
        assert evaluate_loss(model, batches) == pytest.approx(sums / counts, rel=1e-5)


def test_model_mode_is_restored(tiny_tokenizer):
    model = build_tiny_model().train()
    multiple_choice_accuracy(model, tiny_tokenizer, multiple_choice_records(2))
    assert model.training


def test_eval_batches_pad_short_shards_without_adding_tokens():
    examples = [{"input_ids": [i + 1, 5], "labels": [i + 1, 5]} for i in range(5)]
    shards = [eval_batches(examples, micro_batch_size=2, rank=r, world_size=3, pad_token_id=0) for r in range(3)]
    assert [len(s) for s in shards] == [1, 1, 1]
    shards = [eval_batches(examples, micro_batch_size=1, rank=r, world_size=3, pad_token_id=0) for r in range(3)]
    assert [len(s) for s in shards] == [2, 2, 2]
    assert (shards[2][1]["labels"] == -100).all()
    scored = [int(b["input_ids"][0, 0]) for s in shards for b in s if (b["labels"] != -100).any()]
    assert sorted(scored) == [1, 2, 3, 4, 5]


def test_evaluate_run_on_multiple_choice_and_text(tmp_path, model, tiny_tokenizer):
    records = multiple_choice_records(6)
    config = DataConfig(eval_path=str(write_jsonl(tmp_path / "mc.jsonl", records)), format="auto",
                        max_length=64, overlong="truncate", choices=list(LETTERS), eval_max_samples=5,
                        cache_dir=str(tmp_path / "cache"), prepare_workers=1)
    result = evaluate_run(model, prepare_eval_set(config, tiny_tokenizer), tiny_tokenizer, rank=0, world_size=1,
                          micro_batch_size=2)
    assert set(result) == {"eval_loss", "accuracy", "predicted"} and math.isfinite(result["eval_loss"])
    first_five = multiple_choice_accuracy(model, tiny_tokenizer, records[:5])
    assert result["accuracy"] == first_five["accuracy"] and result["predicted"] == first_five["predicted"]
    assert sum(result["predicted"].values()) == 5
    config.eval_path = str(write_jsonl(tmp_path / "text.jsonl", [{"text": "cat and dog"}]))
    text_set = prepare_eval_set(config, tiny_tokenizer)
    assert text_set.multiple_choice is None and len(text_set.examples) == 1
    assert set(evaluate_run(model, text_set, tiny_tokenizer, rank=0, world_size=1, micro_batch_size=2)) == {"eval_loss"}


def _rank_main(rank: int, world_size: int, init_file: str, results) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        tokenizer, model = build_tokenizer(), build_tiny_model("llama", seed=3)
        calls = []
        model.register_forward_pre_hook(lambda *_: calls.append(1))
        records = multiple_choice_records(11, seed=4)
        accuracy = multiple_choice_accuracy(model, tokenizer, records, micro_batch_size=2, rank=rank,
                                            world_size=world_size)
        examples, _ = tokenize_records(records, "chat", tokenizer, 96)
        batches = eval_batches(examples, micro_batch_size=2, rank=rank, world_size=world_size,
                               pad_token_id=tokenizer.pad_token_id)
        loss = evaluate_loss(model, batches, world_size=world_size)
        results[rank] = (accuracy, loss, len(calls))
    finally:
        dist.destroy_process_group()


def test_distributed_evaluation_matches_single_process(tmp_path, model, tiny_tokenizer):
    """Two gloo ranks: counts summed over shards, same numbers as one process, equal forward passes."""
    import torch.multiprocessing as mp

    world_size = 2
    results = mp.Manager().dict()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # fork: the ranks start in well under a second (spawn re-imports torch and transformers: ~10 s);
    # safe here because each child uses one thread and builds its own model and tokenizer.
    mp.start_processes(_rank_main, args=(world_size, str(tmp_path / "init"), results), nprocs=world_size,
                       start_method="fork")
    records = multiple_choice_records(11, seed=4)
    examples, _ = tokenize_records(records, "chat", tiny_tokenizer, 96)
    single_accuracy = multiple_choice_accuracy(model, tiny_tokenizer, records, micro_batch_size=2)
    single_loss = evaluate_loss(model, eval_batches(examples, micro_batch_size=4, rank=0, world_size=1,
                                                    pad_token_id=tiny_tokenizer.pad_token_id))
    for rank in range(world_size):
        accuracy, loss, calls = results[rank]
        assert accuracy == single_accuracy
        assert loss == pytest.approx(single_loss, rel=1e-5)
        assert calls == 2 * math.ceil(math.ceil(11 / world_size) / 2)  # 3 accuracy + 3 loss forwards, rank 1 padded


@pytest.mark.distributed
def test_zero3_engine_evaluation_matches_single_process(tmp_path, model, tiny_tokenizer, subprocess_env):
    """Two DeepSpeed ranks with the tiny model partitioned by ZeRO-3 and an uneven shard (11 records)."""
    probe = REPO / "tests" / "evaluate_zero3_probe.py"
    run = subprocess.run(deepspeed_command(2, str(probe), str(tmp_path)),
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    reports = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in range(2)]
    assert [r["rank"] for r in reports] == [0, 1]
    records = multiple_choice_records(11, seed=4)
    examples, _ = tokenize_records(records, "chat", tiny_tokenizer, 96)
    accuracy = multiple_choice_accuracy(model, tiny_tokenizer, records, micro_batch_size=2)
    loss = evaluate_loss(model, eval_batches(examples, micro_batch_size=2, rank=0, world_size=1,
                                             pad_token_id=tiny_tokenizer.pad_token_id))
    for report in reports:
        assert report["partitioned"]
        for target in ("engine", "module"):
            assert report[target]["accuracy"] == accuracy
            assert report[target]["loss"] == pytest.approx(loss, rel=1e-5)
    assert reports[0]["forward_calls"] == reports[1]["forward_calls"] == 2 * (3 + 3)


@pytest.mark.distributed
def test_checkpoint_evaluated_partitioned_like_training(tmp_path, tiny_model_dir, tiny_mc_data, subprocess_env):
    """`moelora-eval --checkpoint` of a ZeRO-3 run on 2 ranks evaluates through a ZeRO-3 engine (each rank holds half
    of the weights) and gets what one unpartitioned process gets from the same checkpoint."""
    import yaml

    from moelora_ds.evaluation.models import load_for_eval

    from harness import launch, load_config_from_dict, run_config

    config = run_config(tiny_model_dir, tiny_mc_data, tmp_path / "out", train={"max_steps": 3})
    config["data"]["eval_path"] = str(tiny_mc_data["test"])
    launch(config, tmp_path, subprocess_env)
    (tmp_path / "eval.yaml").write_text(yaml.safe_dump(config))
    run = subprocess.run(deepspeed_command(2, str(REPO / "launcher" / "eval.py"), "--config",
                                           str(tmp_path / "eval.yaml"),
                          "--checkpoint", str(tmp_path / "out"), "--json-out", str(tmp_path / "eval.json")),
                         cwd=tmp_path, env=subprocess_env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    sharded = json.loads((tmp_path / "eval.json").read_text())
    assert sharded["model"].endswith("(ZeRO-3 partitioned)"), sharded["model"]

    single = load_config_from_dict({**config, "deepspeed": "ds_configs/zero0.json"})
    model, tokenizer, what = load_for_eval(single, checkpoint=tmp_path / "out")
    assert "partitioned" not in what
    expected = evaluate_run(model, prepare_eval_set(single.data, tokenizer), tokenizer, rank=0, world_size=1,
                            micro_batch_size=2)
    assert sharded["accuracy"] == expected["accuracy"] and sharded["predicted"] == expected["predicted"]
    assert sharded["eval_loss"] == pytest.approx(expected["eval_loss"], rel=1e-5)  # fp32, sums in another order
