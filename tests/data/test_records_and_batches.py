"""Data layer: loading every file form, tokenization masks, padding/packing, sharded resumable batches."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moelora_ds.data.batches import ShardedBatches
from moelora_ds.data.collate import IGNORE_INDEX, pack_examples, pad_batch
from moelora_ds.data.records import load_records
from moelora_ds.data.tokenization import tokenize_records

from conftest import multiple_choice_records, write_jsonl

MULTI_TURN = {"messages": [{"role": "system", "content": "Be brief."},
                           {"role": "user", "content": "Which word means cat?"},
                           {"role": "assistant", "content": "A cat"},
                           {"role": "user", "content": "And dog?"},
                           {"role": "assistant", "content": "B dog"}]}


def labelled_text(tokenizer, example: dict) -> str:
    return tokenizer.decode([t for t, l in zip(example["input_ids"], example["labels"]) if l != IGNORE_INDEX])


def batches(tokenizer, examples, **overrides) -> ShardedBatches:
    kwargs = dict(micro_batch_size=4, rank=0, world_size=1, seed=0, shuffle=True, packing=False, max_length=64,
                  pad_token_id=tokenizer.pad_token_id)
    return ShardedBatches(examples, **{**kwargs, **overrides})


def indexed_examples(n: int, seed: int = 0) -> list[dict]:
    """Examples whose first token is their index + 1 (0 is the pad id), of varying lengths."""
    return [{"input_ids": [i + 1] + [7] * ((i * 7 + seed) % 5), "labels": [i + 1] + [7] * ((i * 7 + seed) % 5)}
            for i in range(n)]


def segment_lengths(position_ids: list[int]) -> list[int]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [b - a for a, b in zip(starts, starts[1:])]


def first_tokens(batch: dict) -> list[int]:
    return batch["input_ids"][:, 0].tolist()


# --- formats end to end -------------------------------------------------------------------------------------

def test_chat_end_to_end(tmp_path, tiny_tokenizer):
    records = [MULTI_TURN] + multiple_choice_records(7)
    loaded, fmt = load_records(str(write_jsonl(tmp_path / "chat.jsonl", records)))
    assert fmt == "chat" and len(loaded) == 8
    examples, stats = tokenize_records(loaded, fmt, tiny_tokenizer, max_length=128)
    assert stats == {"examples": 8, "truncated": 0, "dropped": 0}
    for record, example in zip(records, examples):
        assert example["input_ids"] == tiny_tokenizer.apply_chat_template(record["messages"], tokenize=True,
                                                                          return_dict=False)
    assert labelled_text(tiny_tokenizer, examples[0]) == "A cat<|im_end|>B dog<|im_end|>"
    assert labelled_text(tiny_tokenizer, examples[1]) == records[1]["messages"][1]["content"] + "<|im_end|>"
    prompt = tiny_tokenizer.apply_chat_template(records[1]["messages"][:1], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    assert examples[1]["labels"][:len(prompt)] == [IGNORE_INDEX] * len(prompt)

    batch = next(iter(batches(tiny_tokenizer, examples, shuffle=False, max_length=128)))
    lengths = [len(e["input_ids"]) for e in examples[:4]]
    assert batch["input_ids"].shape == (4, max(lengths)) and batch["input_ids"].dtype == torch.long
    assert batch["attention_mask"].sum(1).tolist() == lengths
    assert set(batch) == {"input_ids", "attention_mask", "labels"}


def test_prompt_completion_end_to_end_from_csv(tmp_path, tiny_tokenizer):
    path = tmp_path / "pc.csv"
    path.write_text("prompt,completion\nWhich word means cat?,A cat\nAnd dog?,B dog\n")
    records, fmt = load_records(str(path))
    assert fmt == "prompt_completion"
    examples, _ = tokenize_records(records, fmt, tiny_tokenizer, max_length=64)
    prompt_len = len(tiny_tokenizer("Which word means cat?")["input_ids"])
    assert examples[0]["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert labelled_text(tiny_tokenizer, examples[0]) == "A cat<|im_end|>"
    assert examples[0]["input_ids"][-1] == tiny_tokenizer.eos_token_id
    batch = next(iter(batches(tiny_tokenizer, examples, micro_batch_size=2, shuffle=False)))
    assert (batch["labels"] != IGNORE_INDEX).sum(1).tolist() == [len(tiny_tokenizer("A cat")["input_ids"]) + 1,
                                                                 len(tiny_tokenizer("B dog")["input_ids"]) + 1]


def test_text_end_to_end_from_parquet(tmp_path, tiny_tokenizer):
    import datasets

    path = tmp_path / "text.parquet"
    datasets.Dataset.from_list([{"text": "the cat and the dog"}, {"text": "a river of stone"}]).to_parquet(str(path))
    records, fmt = load_records(str(path))
    assert fmt == "text"
    examples, _ = tokenize_records(records, fmt, tiny_tokenizer, max_length=64)
    assert all(e["labels"] == e["input_ids"] and e["input_ids"][-1] == tiny_tokenizer.eos_token_id for e in examples)
    assert tiny_tokenizer.decode(examples[1]["input_ids"]) == "a river of stone<|im_end|>"


def test_label_eos_off_trains_the_answer_tokens_only(tiny_tokenizer):
    records = [MULTI_TURN, {"prompt": "Which word means cat?", "completion": "A cat"}, {"text": "a river of stone"}]
    formats = ["chat", "prompt_completion", "text"]
    for record, fmt, answer in zip(records, formats, ["A catB dog", "A cat", "a river of stone"]):
        with_eos = tokenize_records([record], fmt, tiny_tokenizer, 128)[0][0]
        without = tokenize_records([record], fmt, tiny_tokenizer, 128, label_eos=False)[0][0]
        assert without["input_ids"] == with_eos["input_ids"]
        assert labelled_text(tiny_tokenizer, without) == answer
        assert labelled_text(tiny_tokenizer, with_eos).replace("<|im_end|>", "") == answer
    letter = tokenize_records(multiple_choice_records(1), "chat", tiny_tokenizer, 128, label_eos=False)[0][0]
    assert sum(label != IGNORE_INDEX for label in letter["labels"]) == 1
    with pytest.raises(ValueError, match="record 0 has no answer token besides eos"):
        tokenize_records([{"prompt": "Q?", "completion": ""}], "prompt_completion", tiny_tokenizer, 64, label_eos=False)


@pytest.mark.parametrize("as_dict", [False, True])
def test_save_to_disk_directory_and_json_array(tmp_path, as_dict):
    import datasets

    dataset = datasets.Dataset.from_list(multiple_choice_records(5))
    (datasets.DatasetDict({"train": dataset}) if as_dict else dataset).save_to_disk(str(tmp_path / "saved"))
    records, fmt = load_records(str(tmp_path / "saved"), "chat")
    assert fmt == "chat" and records == multiple_choice_records(5)
    (tmp_path / "array.json").write_text(json.dumps(multiple_choice_records(3)))
    assert load_records(str(tmp_path / "array.json")) == (multiple_choice_records(3), "chat")


# --- errors ---------------------------------------------------------------------------------------------------

def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "fine"}\n{"text": broken\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: line 3 is not valid JSON"):
        load_records(str(path))
    path.write_text('{"text": "fine"}\n["a list"]\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: .*not an object"):
        load_records(str(path))


@pytest.mark.parametrize("records, fmt, message", [
    ([{"text": "ok"}, {"txt": "typo"}], "auto", r"record 1: missing field\(s\) \['text'\]"),
    ([{"prompt": "p", "completion": "c"}, {"prompt": "p"}], "auto", r"record 1: missing field\(s\) \['completion'\]"),
    ([{"prompt": "p"}], "auto", "cannot detect the data format"),
    ([{"text": "only text"}], "chat", r"record 0: missing field\(s\) \['messages'\]"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "auto", "record 0: chat record has no assistant turn"),
    ([{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}], "auto", "message 0 needs"),
])
def test_unusable_records_name_file_and_index(tmp_path, records, fmt, message):
    path = write_jsonl(tmp_path / "data.jsonl", records)
    with pytest.raises(ValueError, match=message) as error:
        load_records(str(path), fmt)
    assert str(path) in str(error.value)


def test_empty_missing_and_unsupported_files(tmp_path):
    import datasets

    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty.jsonl: the data set is empty"):
        load_records(str(tmp_path / "empty.jsonl"))
    datasets.Dataset.from_dict({"text": []}).to_parquet(str(tmp_path / "empty.parquet"))
    with pytest.raises(ValueError, match="empty.parquet: the data set is empty"):
        load_records(str(tmp_path / "empty.parquet"))
    with pytest.raises(FileNotFoundError, match="nowhere.jsonl"):
        load_records(str(tmp_path / "nowhere.jsonl"))
    (tmp_path / "plain_dir").mkdir()
    with pytest.raises(ValueError, match="plain_dir: a directory that is not a datasets.save_to_disk data set"):
        load_records(str(tmp_path / "plain_dir"))
    (tmp_path / "data.txt").write_text("hello")
    with pytest.raises(ValueError, match="unsupported file type '.txt'"):
        load_records(str(tmp_path / "data.txt"))


# --- overlong policies ----------------------------------------------------------------------------------------

def test_overlong_truncate_drop_error(tiny_tokenizer):
    records = [{"text": "cat"}, {"text": "the cat and the dog and the bird and the house"}]
    long_len = len(tokenize_records(records, "text", tiny_tokenizer, 10_000)[0][1]["input_ids"])
    examples, stats = tokenize_records(records, "text", tiny_tokenizer, 8, "truncate")
    assert stats == {"examples": 2, "truncated": 1, "dropped": 0} and len(examples[1]["input_ids"]) == 8
    examples, stats = tokenize_records(records, "text", tiny_tokenizer, 8, "drop")
    assert stats == {"examples": 1, "truncated": 0, "dropped": 1} and examples[0]["labels"][0] != IGNORE_INDEX
    with pytest.raises(ValueError, match=f"record 1 is {long_len} tokens long, more than max_length=8"):
        tokenize_records(records, "text", tiny_tokenizer, 8, "error")


def test_truncation_that_cuts_off_the_answer_drops_the_example(tiny_tokenizer):
    records = multiple_choice_records(2)
    examples, stats = tokenize_records(records, "chat", tiny_tokenizer, 10, "truncate")
    assert examples == [] and stats == {"examples": 0, "truncated": 0, "dropped": 2}


# --- packing --------------------------------------------------------------------------------------------------

def test_packing_boundaries_positions_and_labels(tiny_tokenizer):
    examples, _ = tokenize_records([{"text": w} for w in ["cat", "the dog", "a tree", "river stone", "bird"] * 3],
                                   "text", tiny_tokenizer, 16)
    packed = batches(tiny_tokenizer, examples, packing=True, max_length=16, micro_batch_size=2, shuffle=False)
    rows = packed.units
    assert all(len(r["input_ids"]) <= 16 for r in rows) and len(rows) < len(examples)
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e["input_ids"]]
    starts = [i for r in rows for i, p in enumerate(r["position_ids"]) if p == 0]
    assert len(starts) == len(examples)
    for row in rows:
        for i, position in enumerate(row["position_ids"]):
            assert position == 0 or row["position_ids"][i - 1] == position - 1
            if position == 0:
                assert row["labels"][i] == IGNORE_INDEX
    batch = next(iter(packed))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "position_ids"}


def test_packed_rows_without_attention_mask_match_separate_examples(tiny_tokenizer):
    """The documented way to isolate packed examples: position_ids, no attention_mask, no cache."""
    from conftest import build_tiny_model

    model = build_tiny_model("llama")
    examples, _ = tokenize_records([{"text": "cat and dog"}, {"text": "a tree by the river"}], "text",
                                   tiny_tokenizer, 32)
    row = pack_examples(examples, 32)[0]
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                       use_cache=False).logits
        separate = torch.cat([model(input_ids=torch.tensor([e["input_ids"]])).logits for e in examples], dim=1)
    torch.testing.assert_close(packed, separate, atol=1e-5, rtol=1e-4)


# --- sharding, shuffling, resume ------------------------------------------------------------------------------

def test_shards_are_disjoint_and_cover_the_epoch(tiny_tokenizer):
    examples = indexed_examples(24)
    ranks = [batches(tiny_tokenizer, examples, rank=r, world_size=3, micro_batch_size=2) for r in range(3)]
    assert {r.batches_per_epoch for r in ranks} == {4}
    seen = [[t for i in range(4) for t in first_tokens(r.batch(0, i))] for r in ranks]
    assert sum(map(len, seen)) == 24 and set().union(*map(set, seen)) == set(range(1, 25))


def test_global_batch_is_independent_of_world_size(tiny_tokenizer):
    examples = indexed_examples(20)
    single = iter(batches(tiny_tokenizer, examples, micro_batch_size=4))
    pair = [iter(batches(tiny_tokenizer, examples, micro_batch_size=2, rank=r, world_size=2)) for r in range(2)]
    for _ in range(12):  # more than two epochs (5 batches each)
        assert first_tokens(next(single)) == first_tokens(next(pair[0])) + first_tokens(next(pair[1]))


def test_uneven_data_gives_every_rank_the_same_number_of_batches(tiny_tokenizer):
    examples = indexed_examples(7)
    ranks = [batches(tiny_tokenizer, examples, rank=r, world_size=2, micro_batch_size=3) for r in range(2)]
    assert [r.batches_per_epoch for r in ranks] == [2, 2]
    seen = [t for r in ranks for i in range(2) for t in first_tokens(r.batch(0, i))]
    assert len(seen) == 12 and set(seen) == set(range(1, 8))


def test_shuffle_is_deterministic_per_epoch(tiny_tokenizer):
    examples = indexed_examples(32)

    def epochs(seed: int, shuffle: bool = True) -> list[list[int]]:
        it = iter(batches(tiny_tokenizer, examples, micro_batch_size=8, seed=seed, shuffle=shuffle))
        return [[t for _ in range(4) for t in first_tokens(next(it))] for _ in range(3)]

    first = epochs(seed=5)
    assert first == epochs(seed=5)
    assert first != epochs(seed=6)
    assert len({tuple(e) for e in first}) == 3 and all(sorted(e) == list(range(1, 33)) for e in first)
    assert epochs(seed=5, shuffle=False) == [list(range(1, 33))] * 3


@pytest.mark.parametrize("packing", [False, True])
def test_resume_continues_exactly(tiny_tokenizer, packing):
    examples, _ = tokenize_records(multiple_choice_records(21) + [{"messages": MULTI_TURN["messages"]}], "chat",
                                   tiny_tokenizer, 96)
    make = lambda: batches(tiny_tokenizer, examples, micro_batch_size=2, rank=1, world_size=2, seed=3,  # noqa: E731
                           packing=packing, max_length=96)
    reference = make()
    it = iter(reference)
    expected = [next(it) for _ in range(3 * reference.batches_per_epoch + 2)]
    for stop in (1, reference.batches_per_epoch, 2 * reference.batches_per_epoch + 1):
        interrupted = make()
        it = iter(interrupted)
        for _ in range(stop):
            next(it)
        state = interrupted.state_dict()
        epoch, index = divmod(stop, reference.batches_per_epoch)
        assert state == {"epoch": epoch, "batch_index": index}
        resumed = make()
        resumed.load_state_dict(json.loads(json.dumps(state)))
        it = iter(resumed)
        for want in expected[stop:]:
            got = next(it)
            assert all(torch.equal(got[k], want[k]) for k in want)


def test_bad_positions_and_arguments_are_errors(tiny_tokenizer):
    sharded = batches(tiny_tokenizer, indexed_examples(8))
    with pytest.raises(ValueError, match="data position"):
        sharded.load_state_dict({"epoch": 0, "batch_index": 2})
    with pytest.raises(ValueError, match="rank < world_size"):
        batches(tiny_tokenizer, indexed_examples(8), rank=2, world_size=2)
    with pytest.raises(ValueError, match="more than max_length=2"):
        batches(tiny_tokenizer, indexed_examples(8), max_length=2)


# --- property-based: collator invariants ----------------------------------------------------------------------

token_lists = st.lists(st.integers(1, 300), min_size=1, max_size=12)
example_lists = st.lists(token_lists.flatmap(lambda ids: st.lists(st.sampled_from([IGNORE_INDEX, 1]), min_size=len(ids),
                                                                  max_size=len(ids)).map(
    lambda mask: {"input_ids": ids, "labels": [t if m == 1 else IGNORE_INDEX for t, m in zip(ids, mask)]})),
    min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(example_lists)
def test_pad_batch_invariants(examples):
    batch = pad_batch(examples, pad_token_id=0)
    width = max(len(e["input_ids"]) for e in examples)
    assert all(t.shape == (len(examples), width) and t.dtype == torch.long for t in batch.values())
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["input_ids"][row].tolist() == example["input_ids"] + [0] * (width - n)
        assert batch["labels"][row].tolist() == example["labels"] + [IGNORE_INDEX] * (width - n)


@settings(max_examples=60, deadline=None)
@given(example_lists, st.integers(12, 30))
def test_pack_then_pad_invariants(examples, max_length):
    rows = pack_examples(examples, max_length)
    assert all(0 < len(r["input_ids"]) <= max_length for r in rows)
    assert [t for r in rows for t in r["input_ids"]] == [t for e in examples for t in e["input_ids"]]
    assert [l for r in rows for l in r["labels"]] == [l for e in examples for l in [IGNORE_INDEX, *e["labels"][1:]]]
    for a, b in zip(rows, rows[1:]):  # next fit: a row is closed only when the next example does not fit
        assert len(a["input_ids"]) + segment_lengths(b["position_ids"])[0] > max_length
    batch = pad_batch(rows, pad_token_id=0)
    real = batch["attention_mask"].bool()
    assert int(real.sum()) == sum(len(e["input_ids"]) for e in examples)
    assert (batch["labels"][~real] == IGNORE_INDEX).all()
    starts = (batch["position_ids"] == 0) & real
    assert int(starts.sum()) == len(examples) and (batch["labels"][starts] == IGNORE_INDEX).all()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 5), st.integers(1, 4), st.integers(0, 3))
def test_every_rank_gets_equal_batches_covering_the_data(n, micro_batch_size, world_size, epoch):
    examples = indexed_examples(n)
    ranks = [ShardedBatches(examples, micro_batch_size=micro_batch_size, rank=r, world_size=world_size, seed=1,
                            max_length=8, pad_token_id=0) for r in range(world_size)]
    per_epoch = ranks[0].batches_per_epoch
    assert all(r.batches_per_epoch == per_epoch for r in ranks)
    seen = [t for r in ranks for i in range(per_epoch) for t in first_tokens(r.batch(epoch, i))]
    assert len(seen) == per_epoch * micro_batch_size * world_size and set(seen) == set(range(1, n + 1))
    if n % (micro_batch_size * world_size) == 0:
        assert len(seen) == n
