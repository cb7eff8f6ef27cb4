"""A tool-use task the policy cannot solve without its tool: look a key up in a table it never sees.

    prompt: [{"role": "user", "content": "value of k37?"}]     answer: "604"

Each episode has its own table, built from the row's ``seed``: 100 keys ``k00``..``k99``, each mapped
to a random 3-digit string (``000``..``999``). The table is never in the prompt, so a policy that
answers without calling ``lookup`` guesses, and is right one time in a thousand; one that calls
``lookup("k37")`` and copies the result is always right. The reward is the exact answer against the
row's ``answer`` column (``exact_answer``); the environment has no ``get_reward``.

``LookupEnvironment`` has the shape of TRL 1.16's ``environment_factory``: one instance per episode,
``reset(**row)`` called with every column of the data set's row, its public methods the tools.
The starting policy, recipes/models/agent-policy, and the data files recipes/data/agent-lookup*.jsonl
are written by ``python recipes/models/make_policies.py agent``.
"""

from __future__ import annotations

import random

KEYS = [f"k{i:02d}" for i in range(100)]


def table(seed: int) -> dict[str, str]:
    """The episode table of ``seed``: ``k00``..``k99`` -> a 3-digit string, drawn from ``random.Random(seed)``."""
    rng = random.Random(seed)
    return {key: f"{rng.randrange(1000):03d}" for key in KEYS}


def make_records(count: int, seed: int) -> list[dict]:
    """``count`` rows for the episodes of seeds ``seed``, ``seed + 1``, ..., ``seed + count - 1``
    (so two ranges that do not overlap give disjoint episodes); each asks for one key, drawn from
    ``random.Random(seed)``, and carries the table's value for it as its ``answer``."""
    rng = random.Random(seed)
    records = []
    for episode in range(seed, seed + count):
        key = rng.choice(KEYS)
        records.append({"prompt": [{"role": "user", "content": f"value of {key}?"}], "seed": episode, "key": key,
                        "answer": table(episode)[key]})
    return records


class LookupEnvironment:
    """One episode's table; its one tool, ``lookup``, reads it."""

    def __init__(self) -> None:
        self._table: dict[str, str] = {}

    def reset(self, seed: int, **row) -> None:
        """Start the episode of a data set row: its table is ``table(seed)``; the other columns
        (prompt, key, answer, ...) are not the environment's business and are ignored."""
        self._table = table(seed)

    def lookup(self, key: str) -> str:
        """Look a key up in the table.

        Args:
            key: The key, from k00 to k99.
        """
        if key not in self._table:
            raise KeyError(f"no key {key!r}; keys are k00 to k99")
        return self._table[key]
