"""Math answers checked by value with Hugging Face's math-verify library (``pip install 'zenalign[math]'``),
the check TRL's and open-r1's math recipes reward with.

    rewards:
      - type: math_answer
        name: accuracy
        answer_field: answer        # the prompt record's reference: "\\frac{1}{2}", "0.5", "[0, 1)", ...

The completion's final answer is the content of its last ``\\boxed{...}`` (braces balanced), else
its last number (``-1,234.5`` or a plain fraction ``3/4``). It is parsed by math-verify's LaTeX
parser (a boxed answer) or expression parser (a number), the reference by its LaTeX and expression
parsers (wrapped in ``\\boxed{}`` unless it holds ``$`` or ``\\boxed`` already), and
``verify(reference, answer)`` decides: 1.0 when they are equal as values (``\\frac{1}{2}``, ``0.5``,
``1/2`` and ``\\dfrac{1}{2}`` are one answer; ``\\sqrt{4}`` is 2; sets ignore order), else 0.0.
A completion with no answer scores 0.0; a record without a reference, or with one math-verify
cannot read, abstains. math-verify drops
``\\text{...}`` units, so ``5 \\text{ cm}`` equals 5 and ``5 \\text{ m}`` (docs/rewards.md lists
what it does with units, intervals and rounding).
"""

from __future__ import annotations

import re
import threading
from typing import Any, Optional

from pydantic import Field

from zenalign import Options, RewardSourceType, hookimpl
from zenalign.errors import RecipeError

BOXED = re.compile(r"\\boxed\s*\{")
NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?")


class MathAnswerOptions(Options):
    answer_field: str = Field("answer", description="Prompt-record field holding the reference answer (or a list of "
                                                    "accepted answers).")
    float_rounding: int = Field(6, ge=0, description="math-verify: decimal places floats are rounded to before "
                                                     "comparing (6: 1/3 equals 0.333333, not 0.333).")
    numeric_precision: int = Field(15, ge=1, description="math-verify: significant digits of numeric comparisons.")
    strict: bool = Field(True, description="math-verify: variables must match by name, and a set never equals a "
                                           "tuple; false matches variables by position.")
    answer_timeout_s: Optional[int] = Field(
        5, ge=1, description="math-verify's own limit on parsing and comparing one answer, in whole seconds "
        "(signal.alarm: only in the main thread; elsewhere, and with null, rewards[].timeout_s alone applies). "
        "An answer that runs over scores 0.")


def last_boxed(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` whose braces close, or None."""
    for start in reversed([m.end() for m in BOXED.finditer(text)]):
        depth = 1
        for i in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[i], 0)
            if depth == 0:
                return text[start:i]
    return None


def final_answer(completion: str) -> Optional[tuple[str, str]]:
    """``("boxed", content)``, ``("number", text)`` or None: what the completion answers."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return "boxed", boxed
    numbers = NUMBER.findall(completion)
    return ("number", numbers[-1]) if numbers else None


class MathAnswer:
    """1.0 when the final answer (last \\boxed{}, else last number) equals the reference by math-verify, else 0.0."""

    def __init__(self, options: MathAnswerOptions):
        try:
            import math_verify
        except ImportError:
            raise RecipeError("math_answer needs the math-verify library: pip install 'zenalign[math]'") from None
        self.mv = math_verify
        self.options = options
        self.reads_fields = (options.answer_field,)  # records without it abstain (warned about at start)

    def _timeout(self) -> Optional[int]:
        main = threading.current_thread() is threading.main_thread()  # math-verify's alarm needs the main thread
        return self.options.answer_timeout_s if main else None

    def parse_reference(self, reference: str) -> list[Any]:
        mv = self.mv
        text = reference if ("$" in reference or "\\boxed" in reference) else f"\\boxed{{{reference}}}"
        return mv.parse(text, [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()],
                        parsing_timeout=self._timeout())

    def parse_answer(self, completion: str) -> list[Any]:
        mv, found = self.mv, final_answer(completion)
        if found is None:
            return []
        kind, text = found
        if kind == "boxed":
            return mv.parse(f"\\boxed{{{text}}}", [mv.LatexExtractionConfig(boxed_match_priority=0)],
                            parsing_timeout=self._timeout())
        return mv.parse(text.replace(" ", ""), [mv.ExprExtractionConfig()], parsing_timeout=self._timeout())

    def equal(self, references: list[list[Any]], answer: list[Any]) -> bool:
        o = self.options
        return bool(answer) and any(
            self.mv.verify(reference, answer, float_rounding=o.float_rounding, numeric_precision=o.numeric_precision,
                           strict=o.strict, timeout_seconds=self._timeout())
            for reference in references)

    def score(self, batch) -> list[Optional[float]]:
        column = batch.columns.get(self.options.answer_field, [None] * len(batch))
        parsed: dict[str, list[Any]] = {}  # a group shares its reference: parse it once
        scores: list[Optional[float]] = []
        for completion, reference in zip(batch.completions, column):
            accepted = [] if reference is None else [str(r) for r in (reference if isinstance(reference, (list, tuple))
                                                                       else [reference])]
            for text in accepted:
                if text not in parsed:
                    parsed[text] = self.parse_reference(text)
            references = [parsed[text] for text in accepted if parsed[text]]
            if not references:  # no reference, or none math-verify can read: no verdict
                scores.append(None)
                continue
            scores.append(1.0 if self.equal(references, self.parse_answer(completion)) else 0.0)
        return scores


@hookimpl
def zenalign_reward_source_types():
    return [RewardSourceType("math_answer", MathAnswerOptions, MathAnswer)]
