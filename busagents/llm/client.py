"""The ``anthropic`` SDK client of an LLM agent, with its retry policy made explicit.

The SDK retries 408, 409, 429, 5xx (529 "overloaded" included), connection errors and
timeouts, ``max_retries`` times, waiting what ``retry-after-ms`` / ``retry-after`` say or
else an exponential backoff with jitter (0.5 s doubling, at most 8 s). Two things are
added here as SDK middleware, which runs once per HTTP attempt:

- every attempt is recorded (status, retry-after) on the call being made, for telemetry;
- a ``retry-after`` longer than ``max_retry_wait`` is not waited for: the call fails at
  once with :class:`RetryAfterTooLongError`, so the agent falls back instead of stalling.
"""

from __future__ import annotations

import contextvars
import time
from dataclasses import dataclass, field
from typing import Any

import anthropic
from anthropic import APIRequest, AsyncAnthropic, AsyncAPIResponse, AsyncCallNext

from ..errors import BusagentsError
from .settings import LLMSettings

__all__ = ["Attempt", "ModelUnavailableError", "RetryAfterTooLongError", "make_client"]

_RETRYABLE = frozenset({408, 409, 429})


class ModelUnavailableError(BusagentsError):
    """The model could not be reached or answered with an error, retries included."""


class RetryAfterTooLongError(ModelUnavailableError):
    """The API asked to wait longer than ``max_retry_wait`` before retrying."""


@dataclass(slots=True)
class Attempt:
    """One HTTP attempt of a model call."""

    status: int | None  # None: no response (timeout, connection error)
    seconds: float
    retry_after: float | None = None
    error: str = ""
    #: ``anthropic-ratelimit-requests-remaining``: requests the API still accepts in its window.
    remaining_requests: int | None = None


@dataclass(slots=True)
class _AttemptLog:
    attempts: list[Attempt] = field(default_factory=list)


_current: contextvars.ContextVar[_AttemptLog | None] = contextvars.ContextVar("busagents_llm_attempts", default=None)


def _retry_after(headers: Any) -> float | None:
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is not None:
            try:
                return float(value) * scale
            except ValueError:
                continue
    return None


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


class _RetryPolicy:
    """SDK middleware: records attempts and refuses to wait for an overlong retry-after."""

    def __init__(self, max_retry_wait: float) -> None:
        self.max_retry_wait = max_retry_wait

    async def __call__(self, request: APIRequest, call_next: AsyncCallNext) -> AsyncAPIResponse[Any]:
        log = _current.get()
        started = time.perf_counter()
        try:
            response = await call_next(request)
        except anthropic.APIConnectionError as exc:
            if log is not None:
                log.attempts.append(Attempt(None, time.perf_counter() - started, error=type(exc).__name__))
            raise
        status = response.status_code
        retry_after = _retry_after(response.headers)
        if log is not None:
            remaining = _int(response.headers.get("anthropic-ratelimit-requests-remaining"))
            log.attempts.append(Attempt(status, time.perf_counter() - started, retry_after, "", remaining))
        retryable = status in _RETRYABLE or status >= 500
        if retryable and retry_after is not None and retry_after > self.max_retry_wait:
            raise RetryAfterTooLongError(
                f"the API answered {status} and asks to retry after {retry_after:.1f}s, "
                f"more than max_retry_wait={self.max_retry_wait}s"
            )
        return response


def make_client(settings: LLMSettings, **options: Any) -> AsyncAnthropic:
    """An AsyncAnthropic client honouring ``ANTHROPIC_API_KEY`` and ``ANTHROPIC_BASE_URL``.

    ``options`` go to the client unchanged (``api_key=``, ``base_url=``, ``http_client=``...).
    """
    options.setdefault("timeout", settings.timeout)
    options.setdefault("max_retries", settings.max_retries)
    middleware = list(options.pop("middleware", ()))
    middleware.append(_RetryPolicy(settings.max_retry_wait))
    return AsyncAnthropic(middleware=middleware, **options)


def attempt_log() -> tuple[_AttemptLog, contextvars.Token[_AttemptLog | None]]:
    """Start recording the attempts of the model call about to be made in this task."""
    log = _AttemptLog()
    return log, _current.set(log)


def end_attempt_log(token: contextvars.Token[_AttemptLog | None]) -> None:
    _current.reset(token)
