"""A local Messages API for tests: the real ``anthropic`` SDK talks to it over loopback HTTP.

Script the model's turns, point the SDK at the server, and inspect what was asked::

    pytest_plugins = ["busagents.testing", "busagents.llm.testing"]

    async def test_decides(messages_server):
        messages_server.script(
            tool_use("find_flights", {"origin": "LHR"}),
            tool_use("decide", {"booking_id": "B1", "flight_id": "BA118"}),
        )
        client = messages_server.client()   # an AsyncAnthropic with a fake key, this base_url
        ...
        assert messages_server.requests[1].tool_results()[0]["content"] == "..."

Replies are taken in order from the script; when it is empty, ``responder`` (if set)
answers. Errors (:func:`error`), slow replies (:func:`slow`) and any status or header can
be scripted. No key and no network are needed.

For load (an auto-answering model), :meth:`MessagesServer.auto` sets a responder, a delay
before each of its answers and a share of requests answered ``429`` with ``retry-after``;
:meth:`MessagesServer.answer` builds a reply whose usage is counted from the request (about
four characters a token; the prefix up to the last ``cache_control`` block is a cache write
the first time and a cache read afterwards), and :attr:`MessagesServer.usage` sums the usage
of every reply sent. ``python -m busagents.llm.testing --port N`` serves it on its own.
"""

from __future__ import annotations

import hashlib
import json
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any

import pytest
from anthropic import AsyncAnthropic

__all__ = [
    "MessagesServer",
    "RecordedRequest",
    "Reply",
    "error",
    "message",
    "messages_server",
    "slow",
    "text",
    "tool_use",
    "tool_uses",
]


@dataclass(slots=True)
class Reply:
    """One scripted HTTP answer."""

    status: int = 200
    body: dict[str, Any] = field(default_factory=dict)
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0


@dataclass(slots=True)
class RecordedRequest:
    """A request the server received, with its arrival time (``time.monotonic``)."""

    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    received_at: float

    @property
    def messages(self) -> list[dict[str, Any]]:
        msgs: list[dict[str, Any]] = self.body.get("messages", [])
        return msgs

    def blocks(self, kind: str) -> list[dict[str, Any]]:
        """Every content block of type ``kind`` in the request's messages."""
        found: list[dict[str, Any]] = []
        for msg in self.messages:
            content = msg.get("content")
            if isinstance(content, list):
                found.extend(b for b in content if isinstance(b, dict) and b.get("type") == kind)
        return found

    def tool_results(self) -> list[dict[str, Any]]:
        """The tool results of the last message: what the agent just answered to the model's tool calls."""
        content = self.messages[-1].get("content") if self.messages else None
        if not isinstance(content, list):
            return []
        return [b for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]

    @property
    def system_text(self) -> str:
        system = self.body.get("system", "")
        if isinstance(system, str):
            return system
        return "\n".join(b.get("text", "") for b in system)


_counter = iter(range(1, 1 << 62))


def message(
    content: list[dict[str, Any]],
    *,
    stop_reason: str = "tool_use",
    model: str = "claude-test",
    input_tokens: int = 100,
    output_tokens: int = 20,
    cache_creation_input_tokens: int = 0,
    cache_read_input_tokens: int = 0,
) -> Reply:
    """A successful Messages API reply with these content blocks and usage."""
    n = next(_counter)
    return Reply(
        body={
            "id": f"msg_test_{n}",
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": input_tokens,
                "output_tokens": output_tokens,
                "cache_creation_input_tokens": cache_creation_input_tokens,
                "cache_read_input_tokens": cache_read_input_tokens,
            },
        }
    )


def tool_uses(*calls: tuple[str, dict[str, Any]], text: str | None = None, **usage: Any) -> Reply:
    """A turn in which the model calls these tools (name, input), optionally after some text."""
    content: list[dict[str, Any]] = [{"type": "text", "text": text}] if text else []
    content += [
        {"type": "tool_use", "id": f"toolu_test_{next(_counter)}", "name": name, "input": arguments}
        for name, arguments in calls
    ]
    return message(content, stop_reason="tool_use", **usage)


def tool_use(name: str, arguments: dict[str, Any], **usage: Any) -> Reply:
    """A turn in which the model calls one tool."""
    return tool_uses((name, arguments), **usage)


def text(words: str, *, stop_reason: str = "end_turn", **usage: Any) -> Reply:
    """A turn in which the model only writes text."""
    return message([{"type": "text", "text": words}], stop_reason=stop_reason, **usage)


_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error(status: int, *, retry_after: float | None = None, message: str = "scripted error") -> Reply:
    """An API error reply, with ``retry-after`` (seconds) when given."""
    headers = {} if retry_after is None else {"retry-after": f"{retry_after:g}"}
    body = {"type": "error", "error": {"type": _ERROR_TYPES.get(status, "api_error"), "message": message}}
    return Reply(status=status, body=body, headers=headers)


def slow(reply: Reply, seconds: float) -> Reply:
    """``reply``, sent only after ``seconds`` (a client with a shorter timeout gives up first)."""
    return Reply(status=reply.status, body=reply.body, headers=reply.headers, delay=seconds)


class MessagesServer:
    """An HTTP server on 127.0.0.1 answering ``POST /v1/messages`` from a script."""

    def __init__(self) -> None:
        self._script: deque[Reply] = deque()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._arrived = threading.Condition(self._lock)
        self.responder: Callable[[RecordedRequest], Reply] | None = None
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        #: Usage of every 200 reply sent: input, cache_creation_input, cache_read_input, output tokens.
        self.usage: dict[str, int] = dict.fromkeys(_USAGE, 0)
        self.answered = 0  # 200 replies sent
        self.throttled = 0  # 429 replies sent by the throttle share
        self.delay = 0.0  # seconds before each responder reply
        self.throttle_share = 0.0  # share of requests answered 429 (before the script and the responder)
        self.retry_after = 1.0
        self._rng = random.Random(0)
        self._cached: set[str] = set()  # prefixes written to the "cache"
        self._generation = 0
        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        assert self._httpd is not None, "start() first"
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}"

    def script(self, *replies: Reply) -> None:
        """Queue replies, answered in order."""
        with self._lock:
            self._script.extend(replies)

    @property
    def unused(self) -> int:
        """Scripted replies not yet sent."""
        with self._lock:
            return len(self._script)

    def reset(self) -> None:
        """Forget the script, the responder and the recorded requests."""
        with self._lock:
            self._script.clear()
            self.requests.clear()
            self.responder = None
            self.delay = self.throttle_share = 0.0
            self.usage = dict.fromkeys(_USAGE, 0)
            self.answered = self.throttled = 0
            self._cached.clear()
            self._rng = random.Random(0)
            self._generation += 1  # requests still running (slow replies) no longer count
            self.in_flight = self.max_in_flight = 0

    def client(self, **options: Any) -> AsyncAnthropic:
        """An AsyncAnthropic client for this server (fake key, no retries unless asked)."""
        options.setdefault("api_key", "sk-test-not-a-real-key")
        options.setdefault("max_retries", 0)
        return AsyncAnthropic(base_url=self.url, **options)

    def wait_for_requests(self, count: int, timeout: float = 5.0) -> list[RecordedRequest]:
        """Block until ``count`` requests arrived (for use from a thread or sync test)."""
        with self._arrived:
            if not self._arrived.wait_for(lambda: len(self.requests) >= count, timeout):
                raise AssertionError(f"expected {count} requests, got {len(self.requests)}")
            return list(self.requests)

    def auto(
        self,
        responder: Callable[[RecordedRequest], Reply],
        *,
        delay: float = 0.0,
        throttle: float = 0.0,
        retry_after: float = 1.0,
        seed: int = 0,
    ) -> None:
        """Answer every request with ``responder`` after ``delay`` seconds; a ``throttle`` share of
        requests (seeded) is answered at once with 429 and ``retry-after: retry_after``."""
        with self._lock:
            self.responder = responder
            self.delay = delay
            self.throttle_share = throttle
            self.retry_after = retry_after
            self._rng = random.Random(seed)

    def answer(
        self, request: RecordedRequest, content: list[dict[str, Any]], *, stop_reason: str = "tool_use"
    ) -> Reply:
        """A reply with ``content`` and the usage of ``request``, its tokens counted from its size: the
        longest prefix ending at a ``cache_control`` block that an earlier request wrote is read from the
        cache, the rest up to the last such block is written to it, the remainder is input."""
        prefixes, total = _cacheable(request.body)
        keys = [hashlib.sha256(p.encode()).hexdigest() for p in prefixes]
        with self._lock:
            read = next((p for p, k in zip(reversed(prefixes), reversed(keys), strict=True) if k in self._cached), "")
            self._cached.update(keys)
        cached = _token_count(prefixes[-1]) if prefixes else 0
        hit = _token_count(read) if read else 0
        return message(
            content,
            stop_reason=stop_reason,
            model=str(request.body.get("model", "claude-test")),
            input_tokens=max(1, _token_count(total) - cached),
            output_tokens=_token_count(json.dumps(content)),
            cache_creation_input_tokens=cached - hit,
            cache_read_input_tokens=hit,
        )

    def _next(self, request: RecordedRequest) -> Reply:
        with self._lock:
            if self.throttle_share and self._rng.random() < self.throttle_share:
                self.throttled += 1
                return error(429, retry_after=self.retry_after, message="rate limited (test throttle)")
            if self._script:
                return self._script.popleft()
            responder, delay = self.responder, self.delay
        if responder is not None:
            reply = responder(request)
            if delay and not reply.delay:
                reply = slow(reply, delay)
            return reply
        return error(500, message="the test script has no reply left for this request")

    def _count(self, reply: Reply, generation: int) -> None:
        usage = reply.body.get("usage") if reply.status == 200 else None
        if not isinstance(usage, dict):
            return
        with self._lock:
            if generation != self._generation:
                return
            self.answered += 1
            for name in _USAGE:
                self.usage[name] += int(usage.get(name) or 0)

    def start(self) -> MessagesServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                raw = self.rfile.read(length)
                try:
                    body = json.loads(raw or b"{}")
                except ValueError:
                    body = {"_raw": raw.decode(errors="replace")}
                recorded = RecordedRequest(self.path, dict(self.headers.items()), body, time.monotonic())
                with server._arrived:
                    generation = server._generation
                    server.requests.append(recorded)
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    server._arrived.notify_all()
                answered = False

                def done() -> None:  # before the answer leaves, so the client's next request cannot race it
                    nonlocal answered
                    with server._lock:
                        if not answered and generation == server._generation:
                            server.in_flight -= 1
                        answered = True

                try:
                    if not self.path.startswith("/v1/messages"):
                        reply = error(404, message=f"this test server only speaks /v1/messages, not {self.path}")
                    else:
                        reply = server._next(recorded)
                    if reply.delay and server._stopping.wait(reply.delay):
                        return
                    payload = json.dumps(reply.body).encode()
                    server._count(reply, generation)
                    done()
                    self.send_response(reply.status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    self.send_header("request-id", f"req_test_{next(_counter)}")
                    for name, value in reply.headers.items():
                        self.send_header(name, value)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a timeout): what a slow reply is for
                finally:
                    done()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="messages-server", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def __enter__(self) -> MessagesServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


_USAGE = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def _token_count(text: str) -> int:
    return (len(text) + 3) // 4


def _cacheable(body: dict[str, Any]) -> tuple[list[str], str]:
    """(the request's text up to each of its cache_control blocks, all of it), in the API's order:
    tools, system, messages."""
    parts: list[tuple[str, bool]] = []
    for tool in body.get("tools") or []:
        parts.append((json.dumps(tool, sort_keys=True), "cache_control" in tool))
    system = body.get("system")
    for block in [system] if isinstance(system, str) else system or []:
        parts.append((json.dumps(block, sort_keys=True), isinstance(block, dict) and "cache_control" in block))
    for msg in body.get("messages") or []:
        content = msg.get("content")
        for block in [content] if isinstance(content, str) else content or []:
            parts.append((json.dumps(block, sort_keys=True), isinstance(block, dict) and "cache_control" in block))
    marks = [i for i, (_, marked) in enumerate(parts) if marked]
    return ["".join(p for p, _ in parts[: i + 1]) for i in marks], "".join(p for p, _ in parts)


@pytest.fixture(scope="session")
def _messages_server_session() -> Iterator[MessagesServer]:
    with MessagesServer() as server:
        yield server


@pytest.fixture
def messages_server(_messages_server_session: MessagesServer) -> Iterator[MessagesServer]:
    """A local Messages API (one per session), with an empty script for each test."""
    _messages_server_session.reset()
    yield _messages_server_session
    _messages_server_session.reset()


def main() -> None:  # pragma: no cover - a manual and benchmark entry point
    """Serve a MessagesServer with a responder from ``module:function`` until stopped."""
    import argparse
    import importlib
    import signal

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("responder", help="module:function taking (server, request) and returning a Reply")
    parser.add_argument("--delay", type=float, default=0.0)
    parser.add_argument("--throttle", type=float, default=0.0)
    parser.add_argument("--retry-after", type=float, default=1.0)
    parser.add_argument("--port-file", required=True, help="where to write the URL once serving")
    parser.add_argument("--usage-file", help="where to write the usage counted, on SIGTERM")
    args = parser.parse_args()
    module, _, name = args.responder.partition(":")
    respond = getattr(importlib.import_module(module), name)
    stopped = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    with MessagesServer() as server:
        server.auto(
            lambda r: respond(server, r), delay=args.delay, throttle=args.throttle, retry_after=args.retry_after
        )
        with open(args.port_file, "w") as f:
            f.write(server.url)
        stopped.wait()
        if args.usage_file:
            figures = {**server.usage, "requests": len(server.requests), "answered": server.answered}
            with open(args.usage_file, "w") as f:
                json.dump({**figures, "throttled": server.throttled}, f)


if __name__ == "__main__":
    main()
