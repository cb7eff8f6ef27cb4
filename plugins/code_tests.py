"""Code checked by running it: the completion's program against the prompt record's test cases,
scored by the fraction that pass.

    rewards:
      - type: code_tests
        tests_field: tests           # the record's test cases (below)
        sandbox: {timeout_s: 10, memory_mb: 1024}

The program is the completion's last fenced code block (```python ... ``` or ``` ... ```), or the
whole completion when it has none. The record's tests are one of:

- a list of Python statements, each a test (MBPP's ``assert add(1, 2) == 3``): the program runs
  once, then each statement after it in the same process; a statement that raises fails;
- a list of ``{"input": ..., "output": ...}`` cases (programs reading stdin, as in programming
  contests): the program runs once per case with that input, and passes when its stdout equals the
  output, both stripped of surrounding whitespace;
- one string, a test program run after the code (HumanEval's ``check(candidate)``): 1 if it runs
  to the end, else 0.

A program that does not compile, raises, runs out of time or memory scores what passed before
(0 for most). A record without tests abstains. Every run is a child process with the limits of
``sandbox`` (:mod:`zenalign.plugins.sandbox`, which says plainly what it does and does not stop:
it is not a security boundary against a hostile model).
"""

from __future__ import annotations

import re
import secrets
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Optional

from pydantic import Field

from zenalign import Options, RewardSourceType, hookimpl
from zenalign.plugins.sandbox import SandboxOptions, run_python

FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)```", re.S)

# Runs the program, then each test statement after it, printing "<nonce> <i> pass" for each that
# passes. The nonce keeps a line the program prints from counting as a pass.
HARNESS = '''import sys
def __zen_run(source, tests, nonce, write=sys.stdout.write, flush=sys.stdout.flush):
    namespace = {{"__name__": "__main__"}}  # the program's and its tests' globals, without these names
    exec(compile(source, "solution.py", "exec"), namespace)
    for i, test in enumerate(tests):
        try:
            exec(compile(test, "test_%d.py" % i, "exec"), namespace)
        except BaseException:
            continue
        write("\\n%s %d pass\\n" % (nonce, i))
        flush()
__zen_run({source!r}, {tests!r}, {nonce!r})
'''


class CodeTestsOptions(Options):
    tests_field: str = Field("tests", description="Prompt-record field holding the test cases: a list of Python "
                             "statements, a list of {input, output} cases, or one test program.")
    workers: int = Field(2, ge=1, le=256, description="Programs run at once (each a child process).")
    sandbox: SandboxOptions = Field(default_factory=SandboxOptions, description="The limits each run has.")


def program(completion: str) -> str:
    """The completion's last fenced code block, or the whole completion."""
    blocks = FENCE.findall(completion)
    return blocks[-1][1] if blocks else completion


class CodeTests:
    """The fraction of the record's test cases the completion's program passes."""

    def __init__(self, options: CodeTestsOptions):
        self.options = options
        self.reads_fields = (options.tests_field,)
        self._lock = threading.Lock()
        self._counts = {"runs": 0.0, "timeouts": 0.0, "killed": 0.0}

    def score(self, batch) -> list[Optional[float]]:
        column = batch.columns.get(self.options.tests_field, [None] * len(batch))
        with ThreadPoolExecutor(self.options.workers) as pool:
            return list(pool.map(self.score_one, batch.completions, column))

    def score_one(self, completion: str, tests: Any) -> Optional[float]:
        if not tests:
            return None
        code = program(completion)
        if isinstance(tests, str):
            return 1.0 if self.run(f"{code}\n\n{tests}\n").status == "ok" else 0.0
        if all(isinstance(t, dict) for t in tests):
            return sum(self.passes(code, case) for case in tests) / len(tests)
        nonce = secrets.token_hex(8)
        out = self.run(HARNESS.format(source=code, tests=[str(t) for t in tests], nonce=nonce)).stdout
        passed = {line.split()[1] for line in out.splitlines() if line.startswith(nonce + " ") and line.endswith(" pass")}
        return len(passed) / len(tests)

    def passes(self, code: str, case: dict[str, Any]) -> bool:
        """An input/output case: the program, given the input, ends normally and prints the output."""
        result = self.run(code, str(case.get("input", "")))
        return result.status == "ok" and result.stdout.strip() == str(case.get("output", "")).strip()

    def run(self, code: str, stdin: str = ""):
        result = run_python(code, self.options.sandbox, stdin)
        with self._lock:
            self._counts["runs"] += 1
            self._counts["timeouts"] += result.status == "timeout"
            self._counts["killed"] += result.status == "killed"
        return result

    def metrics(self) -> dict[str, float]:
        """Runs since the last call, and how many timed out or were killed (CPU or memory limit)."""
        with self._lock:
            out, self._counts = self._counts, {key: 0.0 for key in self._counts}
        return out


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("code_tests", CodeTestsOptions, CodeTests)]
