"""A multiple-choice "which word has this definition?" data set built from Princeton WordNet 3.0.

Each question shows one synset's definition and four words labelled A-D: one lemma of the synset and
three distractors from the same lexicographer file (noun.animal, verb.motion, ...), so the options are
of the same part of speech and topic. The lemma vocabulary is split between train and test first, so
no word appears in both splits, as answer or as option. Answers are spread evenly over the letters;
everything is deterministic for a seed. Output is chat-format JSONL (see `question_record`).

    python -m moelora_ds.data.wordnet --out data/wordnet --seed 0
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import time
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

DEFAULT_WORDNET_DIR = "/usr/share/wordnet"
LETTERS = ("A", "B", "C", "D")
DATA_FILES = {"noun": "data.noun", "verb": "data.verb", "adjective": "data.adj", "adverb": "data.adv"}
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl").split()
"""Lexicographer file names by number (lexnames(5))."""

_CLEAN_LEMMA = re.compile(r"^[a-z]{3,}(?:-[a-z]+)*$")
_WORD = re.compile(r"[a-z]+(?:-[a-z]+)*")
_DISTRACTOR_TRIES = 24


class WordNetNotFoundError(FileNotFoundError):
    pass


@dataclass(frozen=True)
class Synset:
    pos: str
    offset: int
    lexname: str
    lemmas: tuple[str, ...]
    definition: str
    hypernyms: tuple[int, ...] = ()
    """Offsets of the synset's hypernyms and instance hypernyms (same part of speech)."""


def _definition(gloss: str) -> str:
    """The gloss without its quoted examples (`definition; "example"; "example"`)."""
    return re.split(r';?\s*"', gloss, maxsplit=1)[0].strip().rstrip(";").strip()


def load_synsets(wordnet_dir: str = DEFAULT_WORDNET_DIR) -> list[Synset]:
    """Every synset with a non-empty definition, from the data.* files (format: wndb(5))."""
    root = Path(wordnet_dir)
    missing = [name for name in DATA_FILES.values() if not (root / name).is_file()]
    if missing:
        raise WordNetNotFoundError(
            f"WordNet 3.0 data files not found: searched {root} for {', '.join(DATA_FILES.values())} "
            f"(missing: {', '.join(missing)}). Install Debian's wordnet-base package "
            f"(apt-get install wordnet-base) or pass --wordnet-dir")
    synsets = []
    for pos, name in DATA_FILES.items():
        with open(root / name, encoding="utf-8") as handle:
            for line in handle:
                if line.startswith("  "):  # license header
                    continue
                head, _, gloss = line.partition(" | ")
                fields = head.split()
                count = int(fields[3], 16)
                words = [re.sub(r"\([a-z]+\)$", "", w).replace("_", " ") for w in fields[4:4 + 2 * count:2]]
                definition = _definition(gloss)
                pointer_count = int(fields[4 + 2 * count])
                pointers = fields[5 + 2 * count:5 + 2 * count + 4 * pointer_count]
                hypernyms = tuple(int(pointers[i + 1]) for i in range(0, len(pointers), 4) if pointers[i] in ("@", "@i"))
                if definition:
                    synsets.append(Synset(pos, int(fields[0]), LEXNAMES[int(fields[1])], tuple(words), definition,
                                          hypernyms))
    return synsets


def _shares_stem(lemma: str, words: set[str]) -> bool:
    """Whether the definition gives the word away (dog/dogs, accurate/accuracy)."""
    need = min(len(lemma), 4)
    return any(len(_common_prefix(lemma, w)) >= need for w in words)


def _common_prefix(a: str, b: str) -> str:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return a[:n]


def split_vocabulary(synsets: Sequence[Synset], test_fraction: float, rng: random.Random) -> tuple[set[str], set[str]]:
    """Partition the usable lemmas (lower-case words, hyphens allowed) into (train, test) sets."""
    vocabulary = sorted({lemma for s in synsets for lemma in s.lemmas if _CLEAN_LEMMA.match(lemma)})
    rng.shuffle(vocabulary)
    cut = round(len(vocabulary) * test_fraction)
    return set(vocabulary[cut:]), set(vocabulary[:cut])


def build_questions(synsets: Sequence[Synset], vocabulary: set[str], count: int,
                    rng: random.Random) -> list[dict]:
    """`count` questions whose every option is in `vocabulary`, one per synset and answer word.

    Distractors come from the synset's lexicographer file and are neither lemmas of the synset, nor
    words with a sense defined by the same definition, nor words of the definition. Question i has its
    answer at letter i mod 4, so letters are balanced.
    """
    pool: dict[str, list[str]] = defaultdict(list)
    for lexname, lemma in sorted({(s.lexname, l) for s in synsets for l in s.lemmas if l in vocabulary}):
        pool[lexname].append(lemma)
    same_definition: dict[str, set[str]] = defaultdict(set)
    for s in synsets:
        same_definition[s.definition].update(s.lemmas)
    order = list(synsets)
    rng.shuffle(order)
    used_answers: set[str] = set()
    questions: list[dict] = []
    for synset in order:
        if len(questions) == count:
            break
        words = set(_WORD.findall(synset.definition.lower()))
        answers = [l for l in synset.lemmas
                   if l in vocabulary and l not in used_answers and not _shares_stem(l, words)]
        if not answers:
            continue
        answer = rng.choice(answers)
        excluded = same_definition[synset.definition] | set(synset.lemmas) | words
        candidates = pool[synset.lexname]
        tries = rng.sample(candidates, min(_DISTRACTOR_TRIES, len(candidates)))
        distractors = [w for w in dict.fromkeys(tries) if w not in excluded][:len(LETTERS) - 1]
        if len(distractors) < len(LETTERS) - 1:
            continue
        used_answers.add(answer)
        questions.append(question_record(synset, answer, distractors, LETTERS[len(questions) % len(LETTERS)], rng))
    if len(questions) < count:
        raise ValueError(f"only {len(questions)} questions could be built from this vocabulary, {count} requested")
    return questions


def question_record(synset: Synset, answer: str, distractors: list[str], letter: str, rng: random.Random) -> dict:
    """A chat record asking for the word with this synset's definition."""
    return multiple_choice_record(synset, f'Which {synset.pos} has this definition: "{synset.definition}"?', answer,
                                  distractors, letter, rng)


def multiple_choice_record(synset: Synset, stem: str, answer: str, distractors: list[str], letter: str,
                           rng: random.Random) -> dict:
    """A chat record: the user asks `stem` with the options A-D (`answer` at `letter`), the assistant answers with
    the letter alone."""
    options = list(distractors)
    rng.shuffle(options)
    options.insert(LETTERS.index(letter), answer)
    lines = "\n".join(f"{l}. {o}" for l, o in zip(LETTERS, options))
    question = f"{stem}\n{lines}\nAnswer with the letter of the correct option (A, B, C or D)."
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": letter}],
            "answer": letter, "options": options, "lexname": synset.lexname,
            "synset": f"{synset.pos}:{synset.offset:08d}"}


def build_dataset(seed: int = 0, train_size: int = 2000, test_size: int = 500,
                  wordnet_dir: str = DEFAULT_WORDNET_DIR,
                  synsets: Optional[Sequence[Synset]] = None) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} questions; pass `synsets` to reuse an already parsed WordNet."""
    synsets = load_synsets(wordnet_dir) if synsets is None else synsets
    rng = random.Random(seed)
    train_vocabulary, test_vocabulary = split_vocabulary(synsets, test_size / (train_size + test_size), rng)
    return {"train": build_questions(synsets, train_vocabulary, train_size, rng),
            "test": build_questions(synsets, test_vocabulary, test_size, rng)}


def write_jsonl(path: Path, records: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")


def build_and_write(argv: Optional[list[str]], build: Callable[..., dict[str, list[dict]]], name: str,
                    default_out: str) -> int:
    """The command line of a WordNet quiz builder: `build(seed, train_size, test_size, wordnet_dir)` into
    OUT/train.jsonl and OUT/test.jsonl."""
    parser = argparse.ArgumentParser(description=f"Build the WordNet {name} multiple-choice data set "
                                                 "(train.jsonl and test.jsonl, chat format).")
    parser.add_argument("--out", default=default_out, help=f"output directory (default: {default_out})")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--wordnet-dir", default=DEFAULT_WORDNET_DIR,
                        help=f"directory of WordNet's data.* files (default: {DEFAULT_WORDNET_DIR})")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        splits = build(args.seed, args.train_size, args.test_size, args.wordnet_dir)
    except (WordNetNotFoundError, ValueError) as error:
        print(f"wordnet {name} quiz: {error}", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for split, records in splits.items():
        write_jsonl(out / f"{split}.jsonl", records)
    print(f"wrote {len(splits['train'])} train and {len(splits['test'])} test questions to {out} "
          f"in {time.perf_counter() - started:.1f} s")
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    return build_and_write(argv, build_dataset, "definition", "data/wordnet")

if __name__ == "__main__":
    sys.exit(main())
