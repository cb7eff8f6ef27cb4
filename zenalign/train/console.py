"""What a run shows while it trains, the same for ``zenalign run`` and ``GRPOTrainer.train()``:
zenalign's log lines on stderr (a step line every ``run.log_interval`` steps, evaluation lines,
warnings), a progress bar when stderr is a terminal (the lines then print above it), and a summary
of the first and last evaluations on stdout at the end.

``run.log_level`` (TRL's ``log_level``) says how much: ``info`` all of it; ``warning`` warnings and
the summary (``zenalign run -q``); ``error`` nothing. ``run.progress_bar: false`` (TRL's
``disable_tqdm``) leaves out the bar alone. Only rank 0 reports; other ranks show their warnings.
run.log always gets every line.
"""

from __future__ import annotations

import logging
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

from tqdm.contrib.logging import logging_redirect_tqdm

log = logging.getLogger("zenalign")

LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class AtLeast(logging.Filter):
    """Passes records of ``level`` and above. A filter rather than the handler's level, because
    tqdm's redirection copies a handler's filters and not its level."""

    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= self.level


class StderrHandler(logging.StreamHandler):
    """zenalign's own console handler, known by its class. It writes to whatever ``sys.stderr`` is
    when a message comes, so a caller that redirects stderr gets the messages."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value) -> None:
        pass


def console_handler() -> tuple[logging.Handler, bool]:
    """zenalign's handler for its messages on stderr (plain text), on the ``zenalign`` logger: the
    one there, or a new one. Returns it and whether it is new."""
    for handler in log.handlers:
        if isinstance(handler, StderrHandler):
            return handler, False
    handler = StderrHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    return handler, True


def prints_to_console(logger: logging.Logger) -> bool:
    return any(isinstance(h, logging.StreamHandler) and h.stream in (sys.stdout, sys.stderr) for h in logger.handlers)


@contextmanager
def console(level: str) -> Iterator[None]:
    """zenalign's messages of ``level`` and above on stderr while a run trains (warnings and above
    on ranks other than 0), kept clear of the progress bar. A handler added here is removed
    afterwards; while it is there, records do not also reach a root handler that prints to the
    console (no line twice), as the CLI's never do."""
    handler, added = console_handler()
    only = AtLeast(LEVELS[level] if rank_zero() else max(LEVELS[level], logging.WARNING))
    handler.addFilter(only)
    saved_level, saved_propagate = log.level, log.propagate
    wanted = min(LEVELS[level], logging.INFO)  # run.log gets every line, whatever the console shows
    if log.getEffectiveLevel() > wanted:
        log.setLevel(wanted)
    if added and prints_to_console(logging.getLogger()):
        log.propagate = False
    try:
        with logging_redirect_tqdm(loggers=[log]), quiet_transformers():
            yield
    finally:
        handler.removeFilter(only)
        log.setLevel(saved_level)
        log.propagate = saved_propagate
        if added:
            log.removeHandler(handler)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers' own progress bars ("Loading weights") and notices stay out of the run's output,
    as the CLI keeps them out of every command's; restored afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def print_summary(result: Any, level: str) -> Any:
    """Print a training run's summary on stdout (rank 0, at ``level`` warning and below); returns ``result``."""
    if rank_zero() and shows_summary(level):
        print(summary(result), flush=True)
    return result


def rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def open_run_log(path: Path) -> logging.Handler:
    """Every zenalign line, with its time and level, into ``path`` (a run's run.log) too."""
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    return handler


def close_run_log(handler: Optional[logging.Handler]) -> None:
    if handler is not None:
        log.removeHandler(handler)
        handler.close()


def shows_summary(level: str) -> bool:
    return LEVELS[level] <= logging.WARNING


def shows_progress_bar(run: Any) -> bool:
    """The bar shows on a terminal, with ``run.progress_bar`` and at ``run.log_level`` info or debug."""
    return run.progress_bar and LEVELS[run.log_level] <= logging.INFO and sys.stderr.isatty()


def summary(result: Any) -> str:
    """The first and last evaluation of each objective, and where the run is."""
    lines = []
    before, after = result.initial_eval, result.final_eval
    for key in sorted(k for k in after if k.startswith("eval/reward_mean/")):
        name = key.removeprefix("eval/reward_mean/")
        lines.append(f"eval {name}: {before.get(key, float('nan')):.3f} -> {after[key]:.3f} (step 0 -> {result.steps})")
    lines.append(f"run directory: {result.output_dir} (final policy in {result.output_dir / 'final'})")
    return "\n".join(lines)
