"""Tool calls: parsing what the policy wrote, and running a tool so that nothing it does (raise, hang,
flood, be called with nonsense) reaches further than an error message to the policy."""

import json
import time

from zenalign.generation.tools import ToolCall, call_tool, cut, parse_tool_calls


def lookup(key: str) -> str:
    """Look a key up.

    Args:
        key: the key
    """
    return {"a": "1"}[key]


def test_calls_are_read_in_order_and_the_text_around_them_kept():
    text = 'let me see <tool_call>{"name": "lookup", "arguments": {"key": "a"}}</tool_call>' \
           '<tool_call>{"name": "lookup", "arguments": "{\\"key\\": \\"b\\"}"}</tool_call>'
    content, calls = parse_tool_calls(text)
    assert content == "let me see"
    assert calls == [ToolCall("lookup", {"key": "a"}), ToolCall("lookup", {"key": "b"})]  # arguments as a JSON string too
    assert parse_tool_calls("just an answer") == ("just an answer", [])


def test_malformed_calls_become_error_messages_and_the_run_goes_on():
    tools = {"lookup": lookup}
    cases = {'<tool_call>{"name": "lookup", "arguments": {"key": </tool_call>': "not valid JSON",
             '<tool_call>["lookup"]</tool_call>': '{"name": TOOL',
             '<tool_call>{"name": "lookup", "arguments": [1]}</tool_call>': "JSON object",
             '<tool_call>{"name": "search", "arguments": {}}</tool_call>': "no tool named 'search'; the tools are: lookup",
             '<tool_call>{"name": "lookup", "arguments": {"word": "a"}}</tool_call>': "missing a required argument: 'key'",
             '<tool_call>{"name": "lookup", "arguments": {"key": "zz"}}</tool_call>': "KeyError: 'zz'"}
    for text, expected in cases.items():
        (call,) = parse_tool_calls(text)[1]
        result = call_tool(call, tools, timeout_s=5, max_chars=200)
        assert result.status == "error", text
        assert expected in json.loads(result.content)["error"], (text, result.content)


def test_a_good_call_returns_the_tools_value_as_text():
    assert call_tool(ToolCall("lookup", {"key": "a"}), {"lookup": lookup}, 5, 200).content == "1"
    as_json = call_tool(ToolCall("pair", {}), {"pair": lambda: {"x": [1, 2]}}, 5, 200)
    assert json.loads(as_json.content) == {"x": [1, 2]} and as_json.status == "ok"


def test_async_tools_are_awaited():
    async def later(x: int) -> int:
        return x + 1

    assert call_tool(ToolCall("later", {"x": 1}), {"later": later}, 5, 200).content == "2"


def test_a_hanging_tool_ends_at_the_timeout_with_an_error_message():
    def hang() -> str:
        time.sleep(30)
        return "never"

    start = time.perf_counter()
    result = call_tool(ToolCall("hang", {}), {"hang": hang}, timeout_s=0.3, max_chars=200)
    assert time.perf_counter() - start < 2
    assert result.status == "timeout" and "did not finish within 0.3 s" in result.content


def test_huge_output_is_cut_with_a_marker_saying_how_much():
    result = call_tool(ToolCall("flood", {}), {"flood": lambda: "x" * 100_000}, 5, max_chars=50)
    assert result.content == "x" * 50 + "...[99950 more characters cut]"
    assert cut("short", 50) == "short"


def test_the_built_in_python_tool_runs_code_in_the_sandbox():
    from zenalign.plugins.sandbox import python

    ran = call_tool(ToolCall("python", {"code": "print(6 * 7)"}), {"python": python}, timeout_s=30, max_chars=200)
    assert ran.status == "ok" and ran.content.strip() == "42"
    failed = call_tool(ToolCall("python", {"code": "1/0"}), {"python": python}, timeout_s=30, max_chars=200)
    assert failed.status == "ok" and "ZeroDivisionError" in failed.content  # its errors are the tool's answer
