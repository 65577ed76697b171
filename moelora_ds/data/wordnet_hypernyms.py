"""A second multiple-choice quiz from WordNet 3.0: "what is this noun a kind of?" (its hypernym).

Each question shows a noun and its definition and four words labelled A-D: a lemma of one of the noun's direct
hypernyms (or instance hypernyms) and three distractors, lemmas of other category nouns (synsets that are some
noun's hypernym) from the same lexicographer file that are none of the noun's ancestors, nor words of them. Questions whose
definition contains the answer (or a word of its stem) are left out, so the definition hints but does not
say it. The nouns asked about are split between train and test first (no noun is asked about in both); the
categories, being the answers, recur. Answers are spread evenly over the letters; everything is deterministic
for a seed; the output is chat-format JSONL like the definition quiz's (wordnet.py).

    python -m moelora_ds.data.wordnet_hypernyms --out data/wordnet-hypernyms --seed 0
"""

from __future__ import annotations

import random
import sys
from collections import defaultdict
from typing import Optional, Sequence

from moelora_ds.data.wordnet import (
    _CLEAN_LEMMA,
    _WORD,
    DEFAULT_WORDNET_DIR,
    LETTERS,
    Synset,
    _shares_stem,
    build_and_write,
    load_synsets,
    multiple_choice_record,
    split_vocabulary,
)

_DISTRACTOR_TRIES = 24


def ancestors(synset: Synset, by_offset: dict[int, Synset]) -> set[int]:
    """Offsets of every hypernym of `synset`, transitively."""
    seen: set[int] = set()
    pending = list(synset.hypernyms)
    while pending:
        offset = pending.pop()
        if offset not in seen and offset in by_offset:
            seen.add(offset)
            pending.extend(by_offset[offset].hypernyms)
    return seen


def _clean(lemmas: Sequence[str]) -> list[str]:
    return [lemma for lemma in lemmas if _CLEAN_LEMMA.match(lemma)]


def build_questions(nouns: Sequence[Synset], vocabulary: set[str], count: int, rng: random.Random) -> list[dict]:
    """`count` questions about nouns in `vocabulary`, one per noun, answer letters balanced (question i at i mod 4)."""
    by_offset = {s.offset: s for s in nouns}
    category_offsets = sorted({h for s in nouns for h in s.hypernyms if h in by_offset})
    pool: dict[str, list[int]] = defaultdict(list)
    for offset in category_offsets:
        if _clean(by_offset[offset].lemmas):
            pool[by_offset[offset].lexname].append(offset)
    order = list(nouns)
    rng.shuffle(order)
    asked: set[str] = set()
    questions: list[dict] = []
    for synset in order:
        if len(questions) == count:
            break
        words = [w for w in _clean(synset.lemmas) if w in vocabulary and w not in asked]
        definition_words = set(_WORD.findall(synset.definition.lower()))
        answers = [(lemma, h) for h in synset.hypernyms if h in by_offset for lemma in _clean(by_offset[h].lemmas)
                   if not _shares_stem(lemma, definition_words)]
        if not words or not answers:
            continue
        word = rng.choice(words)
        answer, _ = rng.choice(answers)
        excluded_offsets = ancestors(synset, by_offset) | {synset.offset}
        excluded_words = ({word, answer} | set(synset.lemmas)
                          | {lemma for offset in excluded_offsets for lemma in by_offset[offset].lemmas})
        candidates = pool[synset.lexname]
        distractors: list[str] = []
        for offset in rng.sample(candidates, min(_DISTRACTOR_TRIES, len(candidates))):
            lemmas = [w for w in _clean(by_offset[offset].lemmas) if w not in excluded_words]
            if offset in excluded_offsets or not lemmas or lemmas[0] in distractors:
                continue
            distractors.append(lemmas[0])
            if len(distractors) == len(LETTERS) - 1:
                break
        if len(distractors) < len(LETTERS) - 1:
            continue
        asked.add(word)
        letter = LETTERS[len(questions) % len(LETTERS)]
        stem = f'A "{word}" is {synset.definition}. What is a "{word}" a kind of?'
        questions.append(multiple_choice_record(synset, stem, answer, distractors, letter, rng))
    if len(questions) < count:
        raise ValueError(f"only {len(questions)} questions could be built from this vocabulary, {count} requested")
    return questions


def build_dataset(seed: int = 0, train_size: int = 2000, test_size: int = 500,
                  wordnet_dir: str = DEFAULT_WORDNET_DIR,
                  synsets: Optional[Sequence[Synset]] = None) -> dict[str, list[dict]]:
    """{"train": [...], "test": [...]} questions; pass `synsets` to reuse an already parsed WordNet."""
    synsets = load_synsets(wordnet_dir) if synsets is None else synsets
    nouns = [s for s in synsets if s.pos == "noun"]
    rng = random.Random(seed)
    train_vocabulary, test_vocabulary = split_vocabulary(nouns, test_size / (train_size + test_size), rng)
    return {"train": build_questions(nouns, train_vocabulary, train_size, rng),
            "test": build_questions(nouns, test_vocabulary, test_size, rng)}


def main(argv: Optional[list[str]] = None) -> int:
    return build_and_write(argv, build_dataset, "hypernym", "data/wordnet-hypernyms")

if __name__ == "__main__":
    sys.exit(main())
