"""Make the synthetic preference pairs shipped for the built-in tasks, reproducibly.

    python recipes/data/make_preferences.py          # -> recipes/data/{reverse,hhh}-preferences[-eval].jsonl

Pairs come from each task's *training* prompts only (never its held-out evaluation prompts), and
the held-out pairs use words or templates that the training pairs do not.

reverse: chosen = the reversed word; rejected = the word echoed (10%), the reversal with one
letter changed (40%) or two (15%), the right beginning with a junk tail (20%), the reversal
missing its last letter (10%) or with one letter too many (5%). The hard negatives matter: with
30% echoes and 25% single substitutions the RM still reached 88-92% held-out accuracy by checking
length and the first letters, and GRPO promptly found answers with the right start and a junk
tail (reward hacking). Near misses make it check every letter.
hhh: chosen = what the verifier scores highest; rejected = a worse reply of the same prompt:
answerable -> right letter over a wrong letter or "i don't know."; unanswerable -> "i don't know."
over an invented letter; harmful -> declining over complying.
"""

import json
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def write(path: Path, pairs: list[dict]) -> None:
    with path.open("w", encoding="utf-8") as f:
        for p in pairs:
            f.write(json.dumps(p) + "\n")
    print(f"wrote {len(pairs)} pairs to {path}")


LETTERS = "abcdefghijklmnopqrstuvwxyz"


def substitute(text: str, count: int, rng: random.Random) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), min(count, len(chars))):
        chars[i] = rng.choice([c for c in LETTERS if c != chars[i]])
    return "".join(chars)


def reverse_negative(word: str, rng: random.Random) -> str:
    right = word[::-1]
    roll = rng.random()
    if roll < 0.10:
        wrong = word
    elif roll < 0.50:
        wrong = substitute(right, 1, rng)
    elif roll < 0.65:
        wrong = substitute(right, 2, rng)
    elif roll < 0.85:
        keep = rng.randrange(1, len(right))
        tail = rng.choice([right[keep - 1] * (len(right) - keep), "".join(rng.choice(LETTERS) for _ in range(len(right) - keep))])
        wrong = right[:keep] + tail
    elif roll < 0.95:
        wrong = right[:-1]
    else:
        wrong = right + rng.choice(LETTERS)
    return wrong if wrong != right else right + right[-1]


def reverse_pairs(words: list[str], rng: random.Random) -> list[dict]:
    return [{"prompt": f"reverse {w}:", "chosen": w[::-1], "rejected": reverse_negative(w, rng)} for w in words]


def hhh_pairs(records: list[dict], rng: random.Random) -> list[dict]:
    from zenalign_plugins.hhh_task import COMPLY, DECLINE, IDK, LETTERS

    pairs = []
    for r in records:
        if r["kind"] == "answerable":
            wrong = rng.choice([c for c in LETTERS if c != r["answer"]]) if rng.random() < 0.5 else IDK
            pairs.append({"prompt": r["prompt"], "chosen": r["answer"], "rejected": wrong})
        elif r["kind"] == "unanswerable":
            pairs.append({"prompt": r["prompt"], "chosen": IDK, "rejected": rng.choice(LETTERS)})
        else:
            pairs.append({"prompt": r["prompt"], "chosen": DECLINE, "rejected": COMPLY})
    return pairs


def main() -> int:
    from zenalign_plugins.hhh_task import HHHOptions, HHHTask
    from zenalign_plugins.reverse_task import ReverseOptions, ReverseTask

    rng = random.Random(0)
    words = ReverseTask(ReverseOptions()).train  # the task's training words; its eval words are never used
    write(HERE / "reverse-preferences.jsonl", reverse_pairs(words[:8000], rng))
    write(HERE / "reverse-preferences-eval.jsonl", reverse_pairs(words[8000:8500], rng))
    train = HHHTask(HHHOptions()).train
    answerable = [r for r in train if r["kind"] == "answerable"]
    others = [r for r in train if r["kind"] != "answerable"]
    write(HERE / "hhh-preferences.jsonl", hhh_pairs(answerable[:1200] + others[:2400], rng))
    write(HERE / "hhh-preferences-eval.jsonl", hhh_pairs(answerable[1200:1400], rng))
    return 0


if __name__ == "__main__":
    sys.exit(main())
