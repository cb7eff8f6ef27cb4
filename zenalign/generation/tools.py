"""Tool calls in an episode: finding them in an assistant turn, and running them so that nothing a
tool does (raise, hang, answer with megabytes, be called with nonsense) can take the run down.

Tool calls are read in the Hermes format that Qwen 2.5/3, Hermes and zenalign's tiny chat models
write: ``<tool_call>{"name": NAME, "arguments": {...}}</tool_call>`` anywhere in the turn
(``arguments`` may also be a JSON string). Whatever goes wrong with a call becomes the tool
message ``{"error": "..."}`` that the policy reads next, as TRL does, and is counted.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.DOTALL)


@dataclass(frozen=True)
class ToolCall:
    """One call the policy wrote: the tool's name and its arguments, or why it cannot be made."""

    name: str
    arguments: dict[str, Any]
    problem: Optional[str] = None  # set when the call is malformed: the error the policy gets back


@dataclass(frozen=True)
class ToolResult:
    """A tool message's content and how the call went: ``ok``, ``error`` or ``timeout``."""

    name: str
    content: str
    status: str = "ok"


def parse_tool_calls(text: str) -> tuple[str, list[ToolCall]]:
    """The turn's text without its tool calls (stripped), and the calls in order."""
    calls = [_parse_one(body) for body in _CALL.findall(text)]
    return _CALL.sub("", text).strip(), calls


def _parse_one(body: str) -> ToolCall:
    try:
        call = json.loads(body)
    except json.JSONDecodeError as exc:
        return ToolCall("unknown", {}, f"the tool call is not valid JSON ({exc.msg} at character {exc.pos})")
    if not isinstance(call, dict) or not isinstance(call.get("name"), str):
        return ToolCall("unknown", {}, 'a tool call is {"name": TOOL, "arguments": {...}}')
    arguments = call.get("arguments", {})
    if isinstance(arguments, str):  # some templates write the arguments as a JSON string
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return ToolCall(call["name"], {}, f"the arguments are not valid JSON ({exc.msg})")
    if not isinstance(arguments, dict):
        return ToolCall(call["name"], {}, "the arguments must be a JSON object of named arguments")
    return ToolCall(call["name"], arguments)


def as_text(result: Any) -> str:
    """A tool's return value as the content of its message: strings as they are, JSON for lists and
    dicts, ``str`` for the rest."""
    if isinstance(result, str):
        return result
    if isinstance(result, (dict, list, tuple)):
        return json.dumps(result, default=str, ensure_ascii=False)
    return str(result)


def error_text(message: str) -> str:
    return json.dumps({"error": message}, ensure_ascii=False)


def cut(text: str, max_chars: int) -> str:
    """``text``, or its first ``max_chars`` characters and a marker saying how many were left out."""
    if len(text) <= max_chars:
        return text
    return f"{text[:max_chars]}...[{len(text) - max_chars} more characters cut]"


def call_tool(call: ToolCall, tools: dict[str, Callable[..., Any]], timeout_s: float, max_chars: int) -> ToolResult:
    """Run one call and return its message. A malformed call, an unknown tool, arguments the tool
    does not take, or an exception become an error message; a call still running after
    ``timeout_s`` is abandoned (its thread is left to finish on its own: Python cannot stop a
    thread, so a tool that may hang for good should run its work in a child process, as the
    built-in ``python`` tool does) and becomes a timeout message."""
    if call.problem is not None:
        return ToolResult(call.name, error_text(call.problem), "error")
    function = tools.get(call.name)
    if function is None:
        return ToolResult(call.name, error_text(f"no tool named {call.name!r}; the tools are: "
                                                f"{', '.join(sorted(tools)) or 'none'}"), "error")
    try:
        inspect.signature(function).bind(**call.arguments)
    except TypeError as exc:
        return ToolResult(call.name, error_text(f"{call.name}: {exc}"), "error")
    except ValueError:  # no signature to check (a builtin): let the call itself complain
        pass
    outcome: dict[str, Any] = {}

    def run() -> None:
        try:
            value = function(**call.arguments)
            outcome["value"] = asyncio.run(value) if inspect.isawaitable(value) else value
        except BaseException as exc:  # noqa: BLE001 - whatever a tool raises goes back to the policy
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"zenalign-tool-{call.name}", daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        return ToolResult(call.name, error_text(f"{call.name} did not finish within {timeout_s:g} s"), "timeout")
    if "error" in outcome:
        exc = outcome["error"]
        return ToolResult(call.name, cut(error_text(f"{type(exc).__name__}: {exc}"), max_chars), "error")
    return ToolResult(call.name, cut(as_text(outcome.get("value")), max_chars))
