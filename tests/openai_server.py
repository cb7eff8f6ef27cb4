"""A real HTTP server that speaks the OpenAI chat/completions API, for the remote-judge tests.

It listens on 127.0.0.1 (a free port) in a thread, records every request, counts the requests in
flight at once, and answers each one with an action: the next one queued in ``script``, else
``answer(body)``. Actions: :func:`reply` (a chat completion whose message is a text),
:func:`logprobs` (one token with its top log-probs), :func:`status` (an HTTP error, with headers),
:func:`raw` (a 200 whose body is given bytes), :func:`slow` (sleep, then another action).
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Optional

Action = tuple


def completion(message: dict[str, Any], logprobs: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "finish_reason": "stop", "logprobs": logprobs}
    return {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "judge", "choices": [choice]}


def reply(text: str) -> Action:
    return ("json", 200, completion({"role": "assistant", "content": text}), {})


def logprobs(probabilities: dict[str, float]) -> Action:
    """A one-token reply whose top log-probs are ``log(p)`` of each token given."""
    top = [{"token": token, "logprob": math.log(p), "bytes": list(token.encode())} for token, p in probabilities.items()]
    first = {**top[0], "top_logprobs": top} if top else {"token": "", "logprob": 0.0, "top_logprobs": []}
    message = {"role": "assistant", "content": top[0]["token"] if top else ""}
    return ("json", 200, completion(message, {"content": [first]}), {})


def status(code: int, text: str = "", headers: Optional[dict[str, str]] = None) -> Action:
    return ("json", code, {"error": {"message": text or f"HTTP {code}"}}, headers or {})


def raw(body: bytes) -> Action:
    return ("raw", 200, body, {})


def slow(seconds: float, then: Action) -> Action:
    return ("slow", seconds, then)


class _Server(ThreadingHTTPServer):
    request_queue_size = 128  # socketserver's 5 drops connections beyond it, and the client retries them 1 s later
    daemon_threads = True  # a handler still sleeping never holds up the test's end


class JudgeServer:
    """``with JudgeServer(answer) as server: ... server.base_url ... server.requests``."""

    def __init__(self, answer: Callable[[dict[str, Any]], Action] = lambda body: reply("5")):
        self.answer = answer
        self.script: list[Action] = []
        self.requests: list[dict[str, Any]] = []  # {"path", "headers", "body"} in arrival order
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        self.httpd = _Server(("127.0.0.1", 0), self._handler())
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                       name="judge-server", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def bodies(self) -> list[dict[str, Any]]:
        with self.lock:
            return [r["body"] for r in self.requests]

    def __enter__(self) -> "JudgeServer":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _next_action(self, body: dict[str, Any]) -> Action:
        with self.lock:
            if self.script:
                return self.script.pop(0)
        return self.answer(body)

    def _handler(self):
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                with server.lock:
                    server.requests.append({"path": self.path, "headers": dict(self.headers), "body": body})
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    self._act(server._next_action(body))
                except (BrokenPipeError, ConnectionResetError):  # the client gave up waiting (its timeout)
                    pass
                finally:
                    with server.lock:
                        server.in_flight -= 1

            def _act(self, action: Action) -> None:
                if action[0] == "slow":
                    time.sleep(action[1])
                    return self._act(action[2])
                kind, code, payload, headers = action
                data = payload if kind == "raw" else json.dumps(payload).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                for name, value in headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

        return Handler
