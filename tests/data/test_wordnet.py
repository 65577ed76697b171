"""The WordNet multiple-choice builder, checked on the real WordNet 3.0 (Debian's wordnet-base)."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

import pytest

from moelora_ds.data.records import load_records
from moelora_ds.data.wordnet import (
    DEFAULT_WORDNET_DIR,
    LETTERS,
    WordNetNotFoundError,
    build_dataset,
    load_synsets,
    main,
)

from conftest import REPO


@pytest.fixture(scope="module")
def synsets():
    if not Path(DEFAULT_WORDNET_DIR, "data.noun").is_file():
        pytest.skip(f"WordNet is not installed at {DEFAULT_WORDNET_DIR} (Debian package wordnet-base)")
    return load_synsets()


@pytest.fixture(scope="module")
def splits(synsets):
    return build_dataset(seed=0, synsets=synsets)


def options(record: dict) -> list[str]:
    return record["options"]


def test_parsed_wordnet_looks_like_wordnet_3(synsets):
    assert len(synsets) > 117_000
    by_pos = Counter(s.pos for s in synsets)
    assert by_pos["noun"] == 82_115 and by_pos["verb"] == 13_767
    dog = next(s for s in synsets if s.pos == "noun" and s.offset == 2084071)
    assert dog.lexname == "noun.animal" and "dog" in dog.lemmas and "domestic dog" in dog.lemmas
    assert dog.definition.startswith("a member of the genus Canis") and '"' not in dog.definition
    assert not any("(" in lemma and lemma.endswith(")") for s in synsets if s.pos == "adjective" for lemma in s.lemmas)


def test_sizes_format_and_one_right_answer(synsets, splits):
    index = {f"{s.pos}:{s.offset:08d}": s for s in synsets}
    lexname_lemmas: dict[str, set[str]] = defaultdict(set)
    for s in synsets:
        lexname_lemmas[s.lexname].update(s.lemmas)
    assert (len(splits["train"]), len(splits["test"])) == (2000, 500)
    for record in splits["train"] + splits["test"]:
        user, assistant = record["messages"]
        assert (user["role"], assistant["role"]) == ("user", "assistant")
        assert assistant["content"] == record["answer"] and record["answer"] in LETTERS
        assert len(set(options(record))) == 4
        for letter, option in zip(LETTERS, options(record)):
            assert f"\n{letter}. {option}\n" in user["content"]
        assert "Answer with the letter" in user["content"]
        synset = index[record["synset"]]
        assert f'"{synset.definition}"' in user["content"] and record["lexname"] == synset.lexname
        right = [o for o in options(record) if o in synset.lemmas]
        assert right == [options(record)[LETTERS.index(record["answer"])]]
        assert all(o in lexname_lemmas[synset.lexname] for o in options(record))


def test_no_word_is_shared_between_splits(splits):
    train_words = {o for r in splits["train"] for o in options(r)}
    test_words = {o for r in splits["test"] for o in options(r)}
    assert not train_words & test_words


def test_answers_are_balanced_over_letters(splits):
    for records in splits.values():
        counts = Counter(r["answer"] for r in records)
        assert set(counts) == set(LETTERS)
        assert all(abs(c / (len(records) / 4) - 1) <= 0.05 for c in counts.values()), counts


def test_deterministic_for_a_seed(synsets, splits):
    assert build_dataset(seed=0, synsets=synsets) == splits
    assert build_dataset(seed=1, synsets=synsets)["test"] != splits["test"]


def test_cli_writes_loadable_chat_jsonl(synsets, tmp_path):
    script = REPO / "scripts" / "build_wordnet_data.py"
    run = subprocess.run([sys.executable, str(script), "--out", str(tmp_path), "--seed", "0",
                          "--train-size", "40", "--test-size", "12"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    assert "wrote 40 train and 12 test questions" in run.stdout
    records, fmt = load_records(str(tmp_path / "test.jsonl"))
    assert fmt == "chat" and len(records) == 12
    first = json.loads((tmp_path / "train.jsonl").read_text().splitlines()[0])
    assert first["messages"][1] == {"role": "assistant", "content": "A"} and len(first["options"]) == 4


def test_missing_wordnet_names_the_path_and_the_package(tmp_path, capsys):
    with pytest.raises(WordNetNotFoundError, match=f"searched {tmp_path}.*wordnet-base"):
        load_synsets(str(tmp_path))
    assert main(["--out", str(tmp_path / "out"), "--wordnet-dir", str(tmp_path)]) == 1
    assert "wordnet-base" in capsys.readouterr().err
