"""A deadline for a call into user code (a reward, a judge, a tool) that must not hang a run.

The call runs in the calling thread, so code that needs the main thread keeps working (math-verify
and other libraries time themselves out with ``signal.alarm``, which only works there). A watchdog
thread waits for the deadline; when it passes, it sends the main thread a signal of its own (a
real-time signal on Linux, SIGALRM elsewhere) whose handler raises :class:`DeadlineExceeded`
inside the call, which interrupts Python code and blocking system calls (a sleep, a socket read).
A call that does not come back (it swallows the exception with a bare ``except``, or is stuck in
C code that releases the GIL but never returns to Python): after ``grace_s`` more seconds the
watchdog calls ``on_stuck`` (the run releases its lock and exits there, with one line). C code
that holds the GIL (a catastrophic regular expression) stops every Python thread, the watchdog's
too: for it, faulthandler's own C thread prints every thread's stack and ends the process one
second later (exit code 1; the run's lock is then taken over by the next run, its process being gone).

Outside the main thread (the Python API run from a worker thread) no signal can reach the call;
it then runs in a daemon thread that is abandoned at the deadline.
"""

from __future__ import annotations

import faulthandler
import signal
import sys
import threading
from typing import Any, Callable, Optional

# A signal nobody else uses: the first real-time signals are glibc's own, Python's SIGRTMIN is past them.
DEADLINE_SIGNAL = signal.SIGRTMIN + 5 if hasattr(signal, "SIGRTMIN") else signal.SIGALRM


class DeadlineExceeded(Exception):
    """Raised inside a call that ran past its deadline."""


class _Expired:
    """The call under a deadline (``current``, one at a time: calls are not nested) and the
    deadlines whose time ran out while their call had not returned (``pending``)."""

    lock = threading.Lock()  # between the watchdog and the call's end; never taken by the handler
    pending: set[int] = set()
    current: Optional[int] = None
    installed = False


def _raise_if_expired(signum, frame) -> None:
    token = _Expired.current
    if token is None or token not in _Expired.pending:
        return  # a late signal: its call already returned
    _Expired.pending.discard(token)  # once: the call's cleanup below cannot be interrupted twice
    raise DeadlineExceeded()


def _install() -> None:
    # kept for the life of the process, so a signal that arrives after its call returned is harmless
    if not _Expired.installed:
        signal.signal(DEADLINE_SIGNAL, _raise_if_expired)
        _Expired.installed = True


def call_with_deadline(fn: Callable[[], Any], seconds: Optional[float], grace_s: float = 30.0,
                       on_stuck: Optional[Callable[[], None]] = None) -> Any:
    """``fn()``, raising :class:`DeadlineExceeded` if it takes longer than ``seconds`` (None: no limit)."""
    if seconds is None:
        return fn()
    if threading.current_thread() is not threading.main_thread() or not hasattr(signal, "pthread_kill"):
        return _in_daemon_thread(fn, seconds)
    _install()
    done = threading.Event()
    token = id(done)
    target = threading.main_thread().ident

    def watch() -> None:
        if done.wait(seconds):
            return
        with _Expired.lock:  # either the call has ended, or it will see the deadline as passed
            if done.is_set():
                return
            _Expired.pending.add(token)
        signal.pthread_kill(target, DEADLINE_SIGNAL)
        if not done.wait(grace_s) and on_stuck is not None:
            on_stuck()

    _Expired.current = token
    threading.Thread(target=watch, name="zenalign-deadline", daemon=True).start()
    backstop = _backstop(seconds + grace_s + 1.0)
    try:
        return fn()
    finally:
        _end(token, done, backstop)


def _backstop(seconds: float) -> bool:
    """faulthandler's timer, for code that holds the GIL past the deadline; False where stderr has no descriptor."""
    try:
        faulthandler.dump_traceback_later(seconds, exit=True, file=sys.__stderr__)
    except (AttributeError, ValueError, OSError):
        return False
    return True


def _end(token: int, done: threading.Event, backstop: bool) -> None:
    try:
        _Expired.current = None
    finally:  # the handler raises at most once per call, so this part always runs
        if backstop:
            faulthandler.cancel_dump_traceback_later()
        with _Expired.lock:
            done.set()
            _Expired.pending.discard(token)


def _in_daemon_thread(fn: Callable[[], Any], seconds: float) -> Any:
    result: dict[str, Any] = {}

    def target() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed back to the caller below
            result["error"] = exc

    worker = threading.Thread(target=target, name="zenalign-deadline-call", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise DeadlineExceeded()
    if "error" in result:
        raise result["error"]
    return result["value"]
