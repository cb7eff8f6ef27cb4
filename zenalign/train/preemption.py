"""Preemption: SIGTERM, SIGINT and SIGUSR1 stop a run at the next step boundary, with a checkpoint.

Cluster schedulers send SIGTERM (SLURM with ``--signal``: SIGUSR1; a terminal: SIGINT) some time
before they kill a job. On the first of these signals a run finishes the step in progress (a step
is never abandoned half-way, so the checkpoint is exact), writes a checkpoint, releases its run
directory and exits with ``128 + the signal's number`` (SIGTERM 143, SIGINT 130, SIGUSR1 138),
after one line: ``zenalign: stopped by SIGTERM at step N; resume with --resume auto``. A second
signal exits at once (the checkpoints already written are intact; ``run.lock`` is released).

The CLI installs the handlers when it starts, so a signal that arrives while the run loads stops it
before its first step (a new run then starts again with ``--resume auto``; there is nothing to
keep). Several processes: the signal may reach one rank only, so at each step boundary the ranks take the
largest signal number any of them received (one small all-reduce) and all stop at the same step.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from typing import TYPE_CHECKING, Callable, Optional

from zenalign.errors import ZenalignError

if TYPE_CHECKING:
    from zenalign.train.distributed import Dist

log = logging.getLogger("zenalign")

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


class Stopped(ZenalignError):
    """The run stopped at a step boundary on a signal, after writing a checkpoint."""

    def __init__(self, signum: int, step: int):
        self.signum, self.step = signum, step
        self.exit_code = 128 + signum
        super().__init__(f"stopped by {signal.Signals(signum).name} at step {step}; resume with --resume auto")


class StopSignals:
    """While entered (in the main thread only: Python delivers signals there), the first stop
    signal is remembered in ``received`` and the second ends the process at once, after
    ``on_exit`` (which releases the run's lock). Earlier handlers come back on exit."""

    def __init__(self, on_exit: Optional[Callable[[], None]] = None):
        self.received: Optional[int] = None
        self._on_exit = on_exit
        self._previous: dict[int, object] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        outer = self._outer()
        if outer is not None:  # entered inside another (the CLI's, from its start): what it received counts
            self.received = self.received or outer.received
        return self

    def __exit__(self, *exc) -> None:
        outer = self._outer()
        if outer is not None:
            outer.received = outer.received or self.received
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _outer(self) -> Optional["StopSignals"]:
        handler = self._previous.get(STOP_SIGNALS[0]) if STOP_SIGNALS else None
        outer = getattr(handler, "__self__", None)
        return outer if isinstance(outer, StopSignals) else None

    def stop_here(self, dist: "Dist", step: int, saved: Optional[int], save_checkpoint: Callable[[], object]) -> None:
        """At a step boundary: if any rank received a stop signal, checkpoint ``step`` (unless
        ``saved``, the step of the newest checkpoint, is it) and raise :class:`Stopped`."""
        signum = int(dist.max([float(self.received or 0)])[0])  # every rank stops at the same step
        if not signum:
            return
        if step > 0 and saved != step:  # at step 0 of a new run there is nothing to keep: it starts again
            save_checkpoint()
        raise Stopped(signum, step)

    def _handle(self, signum: int, frame) -> None:
        name = signal.Signals(signum).name
        if self.received is None:
            self.received = signum
            log.warning("zenalign: %s received: stopping after the current step with a checkpoint "
                        "(send it again to exit at once)", name)
            return
        if self._on_exit is not None:
            self._on_exit()
        print(f"zenalign: second {name}: exiting at once; the checkpoints already written are intact "
              f"(--resume auto continues from the newest)", file=sys.stderr, flush=True)
        os._exit(128 + signum)
