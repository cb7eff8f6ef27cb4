"""The quickstart task: reverse a lowercase word.

    prompt: "reverse kqzt:"      answer: "tzqk"

Words are 3-6 random letters. Training and held-out words come from one seeded stream and never
overlap, so evaluation measures whether the policy learned to reverse, not what it memorised.
The quickstart policy (recipes/models/reverse-policy) was pre-trained on a corpus in which most
"reversals" simply echo the word, so it samples the right answer only now and then and almost never
greedily: GRPO with an exact-answer verifier turns the occasional success into the habit.
"""

import random

from pydantic import Field

from zenalign import hookimpl
from zenalign.plugins import Options, TaskType


# The words are drawn one by one in Python (a million take about 10 s), so the counts and lengths
# are bounded: a recipe asking for a billion would hang at validate instead of failing.
MAX_WORDS = 1_000_000
MAX_LENGTH = 100


class ReverseOptions(Options):
    train_size: int = Field(20000, ge=1, le=MAX_WORDS, description="Number of distinct training words.")
    eval_size: int = Field(200, ge=0, le=MAX_WORDS, description="Number of held-out words for evaluation.")
    min_length: int = Field(3, ge=1, le=MAX_LENGTH, description="Shortest word.")
    max_length: int = Field(6, ge=1, le=MAX_LENGTH, description="Longest word.")
    alphabet: str = Field("abcdefghijklmnopqrstuvwxyz", min_length=2, description="Letters words are made of.")
    seed: int = Field(1234, description="Seed of the word lists (fixed, so every run evaluates on the same words).")


def make_words(options: ReverseOptions, count: int, rng: random.Random, exclude=frozenset()) -> list[str]:
    words, seen = [], set(exclude)
    attempts = 0
    while len(words) < count:
        attempts += 1
        if attempts > 50 * count + 1000:
            raise ValueError("reverse: too few distinct words for train_size + eval_size; widen the lengths or alphabet")
        length = rng.randint(options.min_length, options.max_length)
        word = "".join(rng.choice(options.alphabet) for _ in range(length))
        if word not in seen:
            seen.add(word)
            words.append(word)
    return words


def record(word: str) -> dict:
    return {"prompt": f"reverse {word}:", "answer": word[::-1]}


class ReverseTask:
    """Reverse a word of random letters; the answer is checked exactly."""

    def __init__(self, options: ReverseOptions):
        if options.max_length < options.min_length:
            raise ValueError("max_length must be >= min_length")
        letters = len(set(options.alphabet))
        distinct = sum(letters**length for length in range(options.min_length, options.max_length + 1))
        if options.train_size + options.eval_size > distinct:
            raise ValueError(f"train_size + eval_size = {options.train_size + options.eval_size:,} words, but "
                             f"{letters} letters make only {distinct:,} distinct words of {options.min_length}-"
                             f"{options.max_length} letters; widen the lengths or the alphabet")
        rng = random.Random(options.seed)
        self.eval = make_words(options, options.eval_size, rng)
        self.train = make_words(options, options.train_size, rng, exclude=frozenset(self.eval))

    def train_prompts(self):
        return [record(w) for w in self.train]

    def eval_prompts(self):
        return [record(w) for w in self.eval]


@hookimpl
def zenalign_task_types():
    return [TaskType("reverse", ReverseOptions, ReverseTask)]
