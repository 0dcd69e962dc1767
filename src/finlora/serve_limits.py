"""What `finlora serve` lets one request ask, and the ASGI middleware that holds requests to it
before FastAPI sees them: the body's size (413, read no further than the limit) and the number of
requests after the model at once (503 with Retry-After). The limits on a body's fields are
checked in serve_schema."""

from __future__ import annotations

import ctypes
import functools
import gc
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from finlora.errors import FinloraError

# What a client told "server busy" should wait before it tries again, in seconds: about what a
# batch of one-sentence requests takes on a 2-core CPU, several times over.
RETRY_AFTER_S = 1


def _limit(default: int, help: str) -> Any:
    return field(default=default, metadata={"help": help})


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask of the server. Past `max_body_bytes` a request is a 413, read no
    further; past a size within it, a 422 naming the field; with `queue_size` requests already
    at the model or waiting for it, a 503 with Retry-After. Each field is a `finlora serve`
    option of the same name (--max-body-bytes, ...), with its help.

    Raises FinloraError for a limit below 1, or `max_tokens` above what generation allows."""

    # 4 MiB: a 2-million-character report as JSON, with room for escapes and accents.
    max_body_bytes: int = _limit(
        4 * 1024 * 1024, "Largest request body, in bytes; a larger one is refused unread (413)."
    )
    max_text_chars: int = _limit(
        8_000, "Longest text in characters: a /predict text, a /generate field, a chat message."
    )
    max_texts: int = _limit(1024, "Most texts in one /predict request.")
    max_report_chars: int = _limit(2_000_000, "Longest /analyze report, in characters.")
    max_messages: int = _limit(64, "Most messages in one chat request.")
    max_tokens: int = _limit(
        1024,
        "Longest answer a /generate or chat request may ask for, in tokens (at most 4096); "
        "also the default answer length where it is below 256.",
    )
    queue_size: int = _limit(
        64,
        "Most requests at the model or waiting for it; more are turned away at once (503 with "
        "Retry-After).",
    )

    def __post_init__(self) -> None:
        from finlora.generate import MAX_NEW_TOKENS  # here: --help imports no torch

        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise FinloraError(f"{_option(f.name)} must be a whole number >= 1 (got {value!r})")
        if self.max_tokens > MAX_NEW_TOKENS:
            raise FinloraError(
                f"--max-tokens must be between 1 and {MAX_NEW_TOKENS} (got {self.max_tokens})"
            )

    def to_dict(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


async def _answer(
    send: Send, status: int, detail: str, headers: list[tuple[bytes, bytes]] | None = None
) -> None:
    body = json.dumps({"detail": detail}).encode()
    head = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": head + (headers or [])})
    await send({"type": "http.response.body", "body": body})


class _BodyTooLarge(Exception):
    """Raised into the application when a body's bytes pass the limit."""


class BodyLimit:
    """413 for a request whose body is over `max_bytes`: at once when its Content-Length says so,
    else as soon as the bytes read pass the limit (a chunked body has no length to trust). The
    rest of the body is never read, and the connection is closed after the answer."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._refuse(send)
            return
        read = 0
        over = False
        started = False

        async def counted() -> Message:
            nonlocal read, over
            message = await receive()
            if message["type"] == "http.request":
                read += len(message.get("body", b""))
                if read > self.max_bytes:
                    over = True
                    raise _BodyTooLarge
            return message

        async def unless_over(message: Message) -> None:
            nonlocal started
            if over:  # the application's answer to the body cut short: the 413 goes instead
                return
            started = True
            await send(message)

        try:
            await self.app(scope, counted, unless_over)
        except Exception:
            if not over:
                raise
        if over and not started:
            await self._refuse(send)

    async def _refuse(self, send: Send) -> None:
        # Closed after the answer: the unread rest of the body leaves the connection unusable.
        detail = f"request body over the server's limit of {self.max_bytes} bytes"
        await _answer(send, 413, detail, [(b"connection", b"close")])


class Admission:
    """503 with Retry-After for a POST (every POST route is model work) when `size` of them are
    already in the server, at the model or waiting for it: a burst past what the model can
    serve in reasonable time is turned away at once rather than queued for minutes, and before
    its body is read."""

    def __init__(self, app: ASGIApp, size: int) -> None:
        self.app = app
        self.size = size
        self.guard = threading.Lock()  # a test client may run several event loops
        self.taken = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        with self.guard:
            admitted = self.taken < self.size
            if admitted:
                self.taken += 1
        if not admitted:
            detail = f"server busy: {self.size} requests in progress; retry later"
            await _answer(send, 503, detail, [(b"retry-after", str(RETRY_AFTER_S).encode())])
            return
        try:
            await self.app(scope, receive, send)
        finally:  # a streamed answer too: the call returns when the stream ends or its client left
            with self.guard:
                self.taken -= 1


def release_memory() -> None:
    """Hand freed memory back to the system: a gc pass for what only a cycle holds, then glibc's
    malloc_trim. After a large request (tokenized texts, bigger activations) glibc keeps the
    freed heap for reuse, and the process's RSS stays up for good. Does only the gc pass on other
    C libraries."""
    gc.collect()
    trim_heap()


def trim_heap() -> None:
    """glibc's malloc_trim(0) (~30 ms in a 1 GiB process); nothing on other C libraries."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(None).malloc_trim  # glibc's; musl has none
    except (OSError, AttributeError):
        return None
    return trim


class TrimWhenIdle:
    """Once no POST has been in the server for `idle_s`, after some were, trims the heap
    (`trim_heap`). glibc keeps what each thread frees in that thread's own arena, and requests
    are scored in whichever threads serve them: without this, the RSS of a server that has been
    busy stays a quarter to a third above its level for good. Trimming only when idle keeps its
    cost off every request."""

    def __init__(self, app: ASGIApp, idle_s: float = 2.0) -> None:
        self.app = app
        self.idle_s = idle_s
        self.guard = threading.Lock()
        self.busy = 0
        self.last = 0.0  # time.monotonic() at the end of the latest POST
        self.worked = threading.Event()  # set by a POST since the last trim
        self.watcher: threading.Thread | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        with self.guard:
            self.busy += 1
            if self.watcher is None:
                self.watcher = threading.Thread(target=self._watch, daemon=True)
                self.watcher.start()
        try:
            await self.app(scope, receive, send)
        finally:
            with self.guard:
                self.busy -= 1
                self.last = time.monotonic()
                self.worked.set()

    def _watch(self) -> None:
        while True:
            self.worked.wait()
            time.sleep(self.idle_s)
            with self.guard:
                idle = self.busy == 0 and time.monotonic() - self.last >= self.idle_s
                if idle:
                    self.worked.clear()
            if idle:
                trim_heap()
