"""The WordNet hypernym quiz, checked on the real WordNet 3.0 (Debian's wordnet-base)."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

import pytest

from moelora_ds.data.records import load_records
from moelora_ds.data.wordnet import DEFAULT_WORDNET_DIR, LETTERS, load_synsets
from moelora_ds.data.wordnet_hypernyms import ancestors, build_dataset, main


@pytest.fixture(scope="module")
def nouns():
    if not Path(DEFAULT_WORDNET_DIR, "data.noun").is_file():
        pytest.skip(f"WordNet is not installed at {DEFAULT_WORDNET_DIR} (Debian package wordnet-base)")
    return {s.offset: s for s in load_synsets() if s.pos == "noun"}


@pytest.fixture(scope="module")
def splits(nouns):
    return build_dataset(seed=0, synsets=list(nouns.values()))


def asked_word(record: dict) -> str:
    return re.match(r'A "([^"]+)" is ', record["messages"][0]["content"]).group(1)


def test_parsed_hypernyms(nouns):
    # WordNet 3.0: 82,115 noun synsets, all but the root (entity) with a hypernym; dog's is canine and domestic animal
    assert len(nouns) == 82115
    assert sum(not s.hypernyms for s in nouns.values()) == 1
    dog = next(s for s in nouns.values() if s.lemmas[:2] == ("dog", "domestic dog"))
    assert {nouns[h].lemmas[0] for h in dog.hypernyms} == {"canine", "domestic animal"}


def test_one_right_answer_a_direct_hypernym_and_no_ancestor_among_the_distractors(nouns, splits):
    for split, size in (("train", 2000), ("test", 500)):
        assert len(splits[split]) == size
        for record in splits[split]:
            synset = nouns[int(record["synset"].split(":")[1])]
            answer = record["options"][LETTERS.index(record["answer"])]
            assert any(answer in nouns[h].lemmas for h in synset.hypernyms), record
            lineage = {lemma for offset in ancestors(synset, nouns) for lemma in nouns[offset].lemmas}
            distractors = [o for o in record["options"] if o != answer]
            assert len(set(record["options"])) == 4 and not lineage & set(distractors), record
            assert asked_word(record) in synset.lemmas
            assert record["messages"][1]["content"] == record["answer"]


def test_no_noun_is_asked_in_both_splits_and_letters_are_balanced(splits):
    train, test = ({asked_word(r) for r in splits[s]} for s in ("train", "test"))
    assert len(train) == 2000 and len(test) == 500 and not train & test
    for split in splits.values():
        counts = Counter(r["answer"] for r in split)
        assert set(counts.values()) == {len(split) // 4}


def test_deterministic_for_a_seed_and_another_seed_differs(nouns, splits):
    synsets = list(nouns.values())
    assert build_dataset(seed=0, synsets=synsets) == splits
    assert build_dataset(seed=1, synsets=synsets)["test"] != splits["test"]


def test_cli_writes_loadable_chat_jsonl(nouns, tmp_path):
    assert main(["--out", str(tmp_path), "--train-size", "40", "--test-size", "8"]) == 0
    records, fmt = load_records(tmp_path / "train.jsonl")
    assert fmt == "chat" and len(records) == 40
