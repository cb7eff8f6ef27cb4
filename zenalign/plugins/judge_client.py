"""A client for a judge behind an OpenAI-compatible chat endpoint (vLLM's or SGLang's server, TGI,
a hosted API), for reward sources that ask a remote model for a score.

    client = JudgeClient(options, "judge_http 'judge'", ScoreCache(Path("runs/x/reward-cache"), "judge", rank=0))
    scores = client.scores([client.chat_body(text) for text in texts], parse_reply, "text 0..10")

``scores`` sends one ``POST {base_url}/chat/completions`` per distinct request, at most
``max_concurrency`` at a time (a thread pool), and returns one score or None (abstain) per request:

- HTTP 429, 5xx, a connection error or no answer within ``request_timeout_s``: retried up to
  ``max_retries`` times, waiting ``backoff_s * 2**attempt`` (or the server's Retry-After), at most
  ``max_backoff_s``;
- HTTP 401, 403, 404 (a wrong key, model or URL: every request would fail): a one-line
  :class:`RewardError` at once;
- another 4xx (such as a judge input longer than the judge's context), a malformed reply (not
  JSON, or no ``choices``), or retries used up: the request failed and abstains; after
  ``fail_after`` failed requests in a row (across calls), a one-line :class:`RewardError`;
- a well-formed reply with no score in it (``parse`` returns None): abstains, not a failure.

Scores are cached by a hash of the request (model, messages, sampling settings) and the scoring
settings (``parse_key``); a :class:`ScoreCache` with a directory also appends them to a file there,
one JSON line each, read back by the next client on the same directory (a resumed run), so
replayed steps ask nothing and get the same scores. ``metrics()`` reports what happened since its previous call.
"""

from __future__ import annotations

import glob
import hashlib
import json
import math
import os
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import Any, Callable, Optional

from pydantic import Field, field_validator

from zenalign.errors import RecipeError, RewardError, one_line
from zenalign.plugins.api import Options

FATAL_STATUS = (401, 403, 404)  # the key, the model or the URL is wrong: no request can succeed


class MalformedReply(ValueError):
    """A reply that is not what the OpenAI chat API returns (raised by parse functions)."""


class JudgeClientOptions(Options):
    """Where the judge is and how to talk to it (shared by every reward source that uses a remote judge)."""

    base_url: str = Field(description="The server's OpenAI-compatible API root, e.g. http://127.0.0.1:8000/v1 "
                                      "(requests go to {base_url}/chat/completions).")
    model: str = Field(description="The model name the server knows the judge by.")
    api_key_env: Optional[str] = Field(
        None, description="Name of the environment variable that holds the API key (sent as a Bearer token); "
        "never the key itself. null: no key.")
    system: Optional[str] = Field(None, description="A system message sent before each judge input.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature of the judge's reply.")
    top_logprobs: int = Field(20, ge=1, le=20, description="Log-prob scoring: how many of the first token's most "
                                                           "likely alternatives to ask for (OpenAI allows up to 20).")
    extra_body: dict[str, Any] = Field(default_factory=dict, description="More fields for every request body, e.g. "
                                       "{chat_template_kwargs: {enable_thinking: false}} for vLLM.")
    max_concurrency: int = Field(8, ge=1, le=256, description="Requests in flight at once.")
    request_timeout_s: float = Field(60.0, gt=0, description="Longest wait to connect, and for each read of the reply.")
    max_retries: int = Field(3, ge=0, description="Retries of a request after HTTP 429, 5xx, a connection error or a "
                                                  "timeout.")
    backoff_s: float = Field(1.0, ge=0, description="Wait before the first retry; doubled for each further one.")
    max_backoff_s: float = Field(30.0, ge=0, description="Longest wait between retries (a longer Retry-After is cut "
                                                         "to this).")
    fail_after: int = Field(16, ge=1, description="Failed requests (retries used up, malformed reply, another 4xx) "
                            "abstain; this many in a row stop the run with one line. 1: stop at the first.")
    cache: bool = Field(True, description="Reuse the score of a request already answered, also from earlier attempts of "
                                          "the run (kept in the run directory's reward-cache/).")

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not re.match(r"https?://[^/\s]+", value):
            raise ValueError(f"{value!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)")
        return value.rstrip("/")

    @field_validator("api_key_env")
    @classmethod
    def _variable_name(cls, value: Optional[str]) -> Optional[str]:
        if value is not None and not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", value):
            raise ValueError("give the name of an environment variable that holds the key (e.g. OPENAI_API_KEY), "
                             "never the key itself")
        return value


@dataclass
class Outcome:
    """One request's end: its score (None: abstain), or why it failed."""

    score: Optional[float] = None
    error: Optional[str] = None  # the request failed (counted toward fail_after)
    fatal: bool = False  # no request can succeed: stop now
    retries: int = 0
    latency_s: Optional[float] = None  # first send to answer, retries and waits included


@dataclass
class JudgeStats:
    """What the judge did since the last ``metrics()`` call."""

    requests: int = 0
    retries: int = 0
    errors: int = 0
    no_score: int = 0
    cache_hits: int = 0
    latencies: list[float] = field(default_factory=list)

    def report(self) -> dict[str, float]:
        out = {"requests": float(self.requests), "retries": float(self.retries), "errors": float(self.errors),
               "no_score": float(self.no_score), "cache_hits": float(self.cache_hits)}
        if self.latencies:
            ordered = sorted(self.latencies)
            out["latency_mean_s"] = sum(ordered) / len(ordered)
            out["latency_p95_s"] = ordered[max(math.ceil(0.95 * len(ordered)) - 1, 0)]  # nearest rank
        return out


def retry_after_s(value: Optional[str]) -> Optional[float]:
    """A Retry-After header in seconds ("3", or an HTTP date); None when absent or unreadable."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        return max(parsedate_to_datetime(value).timestamp() - time.time(), 0.0)
    except (TypeError, ValueError):
        return None


def request_key(body: dict[str, Any], parse_key: str) -> str:
    text = json.dumps({"request": body, "scoring": parse_key}, sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class ScoreCache:
    """Scores by request key, in memory and, given a directory, in ``<directory>/<name>.rank<rank>.jsonl``
    (one ``{"key": ..., "score": ...}`` line appended per score); every process's file of that name
    is read back at first use, so a resumed run finds what any process of an earlier attempt asked."""

    def __init__(self, directory: Optional[Path] = None, name: str = "judge", rank: int = 0):
        self.directory, self.name = directory, re.sub(r"[^\w.-]", "_", name)
        self.path = directory / f"{self.name}.rank{rank}.jsonl" if directory is not None else None
        self.scores: Optional[dict[str, float]] = None  # read at first use: the run directory may not exist before
        self._file = None

    def load(self) -> dict[str, float]:
        if self.scores is None:
            self.scores = {}
            if self.directory is not None and self.directory.is_dir():
                for part in sorted(self.directory.glob(f"{glob.escape(self.name)}.rank*.jsonl")):
                    self.scores.update(self._read(part))
        return self.scores

    @staticmethod
    def _read(path: Path) -> dict[str, float]:
        found = {}
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entry = json.loads(line)
                found[str(entry["key"])] = float(entry["score"])
            except (ValueError, TypeError, KeyError):
                continue  # a line cut short by a killed process
        return found

    def add(self, key: str, score: float) -> None:
        self.load()[key] = score
        if self.path is None:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a+b")
            if self._file.tell() > 0:
                self._file.seek(-1, os.SEEK_END)
                if self._file.read(1) != b"\n":
                    self._file.write(b"\n")  # end a line cut short by a killed process: the next stays readable
        self._file.write((json.dumps({"key": key, "score": score}) + "\n").encode("utf-8"))

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()


def run_cache(context: Any, name: str) -> Optional[ScoreCache]:
    """The cache of reward source ``name`` in the run directory's reward-cache/ (BuildContext.output_dir),
    one file per process; None outside a run (``zenalign validate``, a source built by hand)."""
    output_dir = getattr(context, "output_dir", None)
    return ScoreCache(output_dir / "reward-cache", name, context.rank) if output_dir is not None else None


class JudgeClient:
    """Scores requests to an OpenAI-compatible chat endpoint: concurrency, retries, a cache, metrics.
    ``label`` names the reward source in errors."""

    def __init__(self, options: JudgeClientOptions, label: str, cache: Optional[ScoreCache] = None):
        try:
            import httpx
        except ImportError:
            raise RecipeError(f"{label}: a remote judge needs httpx: pip install 'zenalign[judge]'") from None
        self.options, self.label, self.httpx = options, label, httpx
        headers = {}
        if options.api_key_env is not None:
            key = os.environ.get(options.api_key_env)
            if not key:
                raise RecipeError(f"{label}: api_key_env: the environment variable {options.api_key_env} is not set "
                                  f"(it should hold the judge server's API key)")
            headers["Authorization"] = f"Bearer {key}"
        self.url = f"{options.base_url}/chat/completions"
        self.http = httpx.Client(headers=headers, timeout=options.request_timeout_s,
                                 limits=httpx.Limits(max_connections=options.max_concurrency))
        self.cache = cache if cache is not None and options.cache else ScoreCache()
        self.stats = JudgeStats()
        self.failures_in_a_row = 0

    def chat_body(self, user: str, **sampling: Any) -> dict[str, Any]:
        """A chat request: the system message (if any) and ``user``, at the options' temperature."""
        messages = ([{"role": "system", "content": self.options.system}] if self.options.system else []) + \
            [{"role": "user", "content": user}]
        return {"model": self.options.model, "messages": messages, "temperature": self.options.temperature,
                **sampling, **self.options.extra_body}

    def logprobs_body(self, user: str) -> dict[str, Any]:
        """A request for one token and the log-probs of its ``top_logprobs`` likeliest alternatives."""
        return self.chat_body(user, max_tokens=1, logprobs=True, top_logprobs=self.options.top_logprobs)

    def scores(self, bodies: list[dict[str, Any]], parse: Callable[[dict[str, Any]], Optional[float]],
               parse_key: str) -> list[Optional[float]]:
        """One score per request body (None: abstain): from the cache, else asked once per distinct body."""
        keys = [request_key(body, parse_key) for body in bodies]
        known = self.cache.load() if self.options.cache else {}
        todo = {key: body for key, body in zip(keys, bodies) if key not in known}
        self.stats.cache_hits += len(bodies) - len(todo)
        answered = self._ask(todo, parse) if todo else {}
        return [known[key] if key in known else answered.get(key) for key in keys]

    def _ask(self, todo: dict[str, dict[str, Any]], parse) -> dict[str, Optional[float]]:
        stop = threading.Event()
        pool = ThreadPoolExecutor(max_workers=min(self.options.max_concurrency, len(todo)),
                                  thread_name_prefix="zenalign-judge")
        pending: dict[Future, str] = {pool.submit(self._request, body, parse, stop): key for key, body in todo.items()}
        answered: dict[str, Optional[float]] = {}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)  # interruptible: a reward's timeout_s reaches here
                for future in done:
                    key = pending.pop(future)
                    answered[key] = self._record(future.result())
                    if answered[key] is not None and self.options.cache:
                        self.cache.add(key, answered[key])
        finally:
            stop.set()  # requests still waiting for a retry give up; queued ones never start
            pool.shutdown(wait=False, cancel_futures=True)
            self.cache.flush()
        return answered

    def _record(self, outcome: Outcome) -> Optional[float]:
        """Count an outcome (in the calling thread); raise when the run must stop."""
        self.stats.requests += 1
        self.stats.retries += outcome.retries
        if outcome.error is None:
            self.failures_in_a_row = 0
            self.stats.latencies.append(outcome.latency_s)
            self.stats.no_score += outcome.score is None
            return outcome.score
        self.stats.errors += 1
        self.failures_in_a_row += 1
        if outcome.fatal:
            raise RewardError(f"{self.label}: the judge at {self.url} refused the request: {outcome.error}; check "
                              f"base_url, model and api_key_env")
        if self.failures_in_a_row >= self.options.fail_after:
            raise RewardError(f"{self.label}: {self.failures_in_a_row} judge requests in a row failed (fail_after); "
                              f"the last: {outcome.error}. Check the server at {self.options.base_url}, or raise "
                              f"fail_after to abstain on more failures")
        return None

    def _request(self, body: dict[str, Any], parse, stop: threading.Event) -> Outcome:
        """POST one body, retrying what may pass on a second try (runs in a pool thread)."""
        started, retries, problem = time.monotonic(), 0, "cancelled"
        for attempt in range(self.options.max_retries + 1):
            if stop.is_set():
                break
            wait_s = None
            try:
                response = self.http.post(self.url, json=body)
            except self.httpx.TimeoutException:
                problem = f"no answer within request_timeout_s ({self.options.request_timeout_s:g} s)"
            except self.httpx.HTTPError as exc:
                problem = f"{type(exc).__name__}: {one_line(exc)}"
            else:
                if response.status_code == 200:
                    return self._parsed(response, parse, retries, started)
                problem = f"HTTP {response.status_code}: {one_line(response.text[:200]) or response.reason_phrase}"
                if response.status_code in FATAL_STATUS or (response.status_code < 500 and response.status_code != 429):
                    return Outcome(error=problem, fatal=response.status_code in FATAL_STATUS, retries=retries)
                wait_s = retry_after_s(response.headers.get("retry-after"))
            if attempt == self.options.max_retries:
                break
            retries += 1
            delay = self.options.backoff_s * 2**attempt if wait_s is None else wait_s
            if stop.wait(min(delay, self.options.max_backoff_s)):
                break
        return Outcome(error=f"{problem} (after {retries} retries)", retries=retries)

    @staticmethod
    def _parsed(response, parse, retries: int, started: float) -> Outcome:
        latency = time.monotonic() - started
        try:
            return Outcome(score=parse(response.json()), retries=retries, latency_s=latency)
        except ValueError as exc:  # not JSON (json's own error), or not a chat completion (MalformedReply)
            return Outcome(error=f"malformed reply: {one_line(exc)[:200]}", retries=retries)

    def metrics(self) -> dict[str, float]:
        """requests, retries, errors, no_score, cache_hits and latency_mean_s / latency_p95_s (when a
        request was answered) since the previous call."""
        report, self.stats = self.stats.report(), JudgeStats()
        return report


# ---------------------------------------------------------------------------------------------- replies

def reply_text(reply: dict[str, Any]) -> str:
    """The message content of a chat completion's first choice."""
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise MalformedReply("no choices[0].message.content") from None
    return content if isinstance(content, str) else ""


def yes_probability(reply: dict[str, Any], yes: str, no: str) -> Optional[float]:
    """P(yes) / (P(yes) + P(no)) from the first token's top log-probs; a token counts as ``yes`` or
    ``no`` when it equals it once surrounding spaces and case are ignored (" Yes" is "yes"), and the
    probabilities of every such token add up. None when neither is among the alternatives."""
    try:
        first = reply["choices"][0]["logprobs"]["content"][0]
        alternatives = first.get("top_logprobs") or [first]
        pairs = [(str(alt["token"]).strip().casefold(), float(alt["logprob"])) for alt in alternatives]
    except (KeyError, IndexError, TypeError, AttributeError, ValueError):
        raise MalformedReply("no choices[0].logprobs.content[0].top_logprobs (does the server return log-probs?)") from None
    p_yes = sum(math.exp(lp) for token, lp in pairs if token == yes.strip().casefold())
    p_no = sum(math.exp(lp) for token, lp in pairs if token == no.strip().casefold())
    return p_yes / (p_yes + p_no) if p_yes + p_no > 0 else None
