"""An HTTP server for a trained run (`finlora serve`), built with FastAPI.

- Classification runs answer `POST /predict` (label and probabilities, as `finlora predict`)
  and `POST /analyze` (a report's text read sentence by sentence, as `finlora analyze --json`).
- Instruct runs answer `POST /generate` (as `finlora generate --json`) and an OpenAI-style
  `POST /v1/chat/completions`, streamed as server-sent events when asked, so existing chat
  clients can talk to them.
- `GET /health` and `GET /info` say what is loaded; `GET /docs` (and /redoc) describes the API,
  its scripts served by the server itself, so it works offline.
- With an API key (`$FINLORA_API_KEY` for the command), every route but /health wants it as
  `Authorization: Bearer <key>`.

One model serves one request at a time (a lock): torch's threads already use every core, so a
second forward pass beside the first would only slow both down. /predict requests that arrive
while the model is busy are scored together when it is free (`serve_queue.PredictQueue`): one
batched pass instead of one each, and a request that finds the model idle is scored at once.

What a request may ask is bounded (`ServeLimits`): the body's size (413), the size of each field
(422 naming it), and the requests in the server at once (503 with Retry-After).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import ipaddress
import json
import queue
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from finlora.chat import Write, answer, fit_conversation, instruction_prompt
from finlora.data.documents import report_text
from finlora.data.instruct import Message
from finlora.errors import FinloraError
from finlora.generate import GenerationOptions, Reply
from finlora.inference import LoadedRun
from finlora.report import analyze
from finlora.serve_docs import add_docs
from finlora.serve_limits import (
    Admission,
    BodyLimit,
    ServeLimits,
    TrimWhenIdle,
    release_memory,
)
from finlora.serve_queue import PredictQueue
from finlora.serve_schema import (
    ROUTES,
    AnalyzeRequest,
    ChatMessage,
    ChatRequest,
    GenerateRequest,
    PredictRequest,
)

# Characters in one request past which its memory is handed back to the system once it is
# answered: a gc pass and a trim (0.3 s with a model loaded, on 2 busy cores) are worth it only
# after a large one. Smaller requests' memory goes back once the server is idle (TrimWhenIdle).
LARGE_REQUEST_CHARS = 200_000


def _ignore(_text: str) -> None:
    pass


def _split_system(messages: list[ChatMessage]) -> tuple[list[Message], list[Message]]:
    """Leading system messages (always kept) and the conversation after them."""
    as_messages = [Message(m.role, m.text) for m in messages]
    n = next((i for i, m in enumerate(as_messages) if m.role != "system"), len(as_messages))
    return as_messages[:n], as_messages[n:]


def _completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex[:24]}"


def _finish_reason(reply: Reply) -> str:
    return "length" if reply.hit_limit else "stop"


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload)
    return f"data: {data}\n\n"


class _Server:
    """The loaded run, the lock around it, and the work behind each route."""

    def __init__(self, loaded: LoadedRun, limits: ServeLimits | None = None) -> None:
        self.loaded = loaded
        self.limits = limits or ServeLimits()
        self.lock = threading.Lock()
        self.queue = PredictQueue(
            self.lock,
            lambda texts: loaded.predict(texts, progress=False),
            loaded.cfg.speed.eval_batch_size,
        )
        self.name = "base model (zero-shot)" if loaded.zero_shot else loaded.run.root.name

    def require(self, task: str, instead: str) -> None:
        if self.loaded.task != task:
            # The run's own task: a preference run is served as instruct, but is not called so.
            raise HTTPException(
                400, f"this run's task is {self.loaded.cfg.task}, not {task} (use {instead})"
            )

    def info(self) -> dict[str, Any]:
        cfg = self.loaded.cfg
        info: dict[str, Any] = {
            "run": str(self.loaded.run.root.resolve()),
            "task": cfg.task,
            "model": cfg.model.name,
            "method": cfg.method.name,
            "zero_shot": self.loaded.zero_shot,
            "device": str(self.loaded.device),
            "precision": "bf16-autocast" if self.loaded.dtype else "fp32",
            "template": cfg.data.template,
        }
        if cfg.task == "classify":
            info["labels"] = self.loaded.labels
        else:
            # The Alpaca template has no place for a system prompt: one sent is not used.
            info["system_prompt"] = bool(self.loaded.instruct_codec.template.is_chat)
        info["endpoints"] = list(ROUTES[self.loaded.task])  # a preference run's: instruct's
        info["limits"] = self.limits.to_dict()
        return info

    def predict(self, request: PredictRequest) -> dict[str, Any]:
        self.require("classify", "/generate or /v1/chat/completions")
        predictions = self.queue.predict(request.texts)
        rows = [p.to_dict() for p in predictions]
        if not request.echo:
            for row in rows:
                del row["text"]
        if sum(map(len, request.texts)) >= LARGE_REQUEST_CHARS:
            release_memory()
        return {"predictions": rows}

    def analyze(self, request: AnalyzeRequest) -> dict[str, Any]:
        """`finlora analyze --json` on the request's text; its sentences queue as /predict's."""
        self.require("classify", "/generate or /v1/chat/completions")
        labels = self.loaded.labels

        def score(texts: list[str]) -> np.ndarray:
            predictions = self.queue.predict(texts)
            return np.array([[p.probabilities[label] for label in labels] for p in predictions])

        text = report_text(request.text, request.source)  # an HTML page: its visible text
        summary = analyze(text, request.source, labels, score).summary(request.top)
        if len(request.text) >= LARGE_REQUEST_CHARS:
            release_memory()
        return summary

    def generate(self, request: GenerateRequest, write: Write = _ignore) -> dict[str, Any]:
        """/generate's answer; `write` sees each piece of text as it comes (and may raise
        _ClientGone to stop)."""
        self.require("instruct", "/predict")
        options = request.limited_options(self.limits)
        with self.lock:
            prompt = instruction_prompt(
                self.loaded, request.instruction, request.input, request.system,
                options.max_new_tokens,
            )  # fmt: skip
            reply = answer(self.loaded, prompt, options, write)
        echoed = {"instruction": request.instruction, "input": request.input}
        return {
            **(echoed if request.echo else {}),
            "answer": reply.text,
            "finish_reason": _finish_reason(reply),
        }

    def _chat_prompt(self, request: ChatRequest, options: GenerationOptions) -> list[int]:
        head, history = _split_system(request.messages)
        return fit_conversation(self.loaded, head, history, options.max_new_tokens)

    def chat(self, request: ChatRequest, write: Write = _ignore) -> dict[str, Any]:
        self.require("instruct", "/predict")
        options = request.limited_options(self.limits)
        with self.lock:
            prompt = self._chat_prompt(request, options)
            reply = answer(self.loaded, prompt, options, write)
        return {
            "id": _completion_id(),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.name,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": reply.text},
                    "finish_reason": _finish_reason(reply),
                }
            ],
            "usage": {
                "prompt_tokens": len(prompt),
                "completion_tokens": reply.new_tokens,
                "total_tokens": len(prompt) + reply.new_tokens,
            },
        }

    async def chat_stream(self, request: ChatRequest) -> AsyncIterator[str]:
        """Server-sent events: a chunk per piece of text as it is generated, then [DONE]. A
        client that goes away stops the generation, which would otherwise hold the model."""
        options = request.limited_options(self.limits)
        pieces: queue.Queue[str | Reply | BaseException] = queue.Queue()
        gone = threading.Event()

        def write(text: str) -> None:
            if gone.is_set():
                raise _ClientGone  # out of generate, and the model lock is released
            pieces.put(text)

        # Generation runs in its own thread, so text reaches the client while the model works.
        worker = threading.Thread(
            target=self._generate_into, args=(request, options, pieces, write), daemon=True
        )
        worker.start()
        chunk = _chunk_maker(_completion_id(), self.name)
        loop = asyncio.get_running_loop()
        try:
            yield _sse(chunk({"role": "assistant", "content": ""}, None))
            while True:
                item = await loop.run_in_executor(None, pieces.get)
                if isinstance(item, str):
                    yield _sse(chunk({"content": item}, None))
                    continue
                if isinstance(item, Reply):
                    yield _sse(chunk({}, _finish_reason(item)))
                else:  # the model failed mid-answer: say so in the stream, the status is sent
                    yield _sse({"error": {"message": str(item), "type": type(item).__name__}})
                yield _sse("[DONE]")
                return
        finally:  # also when the client disconnected (cancelled, or closed at a yield)
            gone.set()

    def _generate_into(
        self,
        request: ChatRequest,
        options: GenerationOptions,
        pieces: queue.Queue[str | Reply | BaseException],
        write: Callable[[str], None],
    ) -> None:
        try:
            with self.lock:
                prompt = self._chat_prompt(request, options)
                pieces.put(answer(self.loaded, prompt, options, write))
        except Exception as exc:  # handed to the stream, which reports it to the client
            pieces.put(exc)


class _ClientGone(Exception):
    """Raised into a generation whose client has disconnected."""


# How often a non-streamed generation looks whether its client is still there.
DISCONNECT_POLL_S = 0.25


async def while_connected(request: Any, work: Callable[[Write], dict[str, Any]]) -> dict[str, Any]:
    """`work(write)` in a worker thread, stopped when the client disconnects: its next `write`
    raises _ClientGone. A client that gave up on a long answer would otherwise hold the model
    (and every request queued behind it) until the answer was done. `request` is Starlette's,
    or anything with its `async is_disconnected()`."""
    gone = threading.Event()

    def write(_text: str) -> None:
        if gone.is_set():
            raise _ClientGone

    task = asyncio.get_running_loop().run_in_executor(None, work, write)
    while True:
        done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
        if done:
            break
        if await request.is_disconnected():
            gone.set()
    try:
        return task.result()
    except _ClientGone:  # nobody reads this answer; 499 as nginx logs a client that left
        raise HTTPException(status_code=499, detail="client closed the request") from None


def _chunk_maker(
    completion_id: str, model: str
) -> Callable[[dict[str, str], str | None], dict[str, Any]]:
    created = int(time.time())

    def chunk(delta: dict[str, str], finish_reason: str | None) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        }

    return chunk


def _authorized(authorization: str | None, api_key: str) -> bool:
    """Whether `Authorization: Bearer <api_key>` (as OpenAI clients send it) was given."""
    scheme, _, token = (authorization or "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), api_key)


def _within(
    limits: ServeLimits, request: PredictRequest | AnalyzeRequest | GenerateRequest | ChatRequest
) -> None:
    """Refuse (a 422 naming each field) a request body past the server's limits."""
    errors = list(request.over_limits(limits))
    if errors:
        raise RequestValidationError(errors)


def create_app(
    loaded: LoadedRun, api_key: str | None = None, limits: ServeLimits | None = None
) -> FastAPI:
    """The FastAPI application serving `loaded`; with `api_key`, every route but /health wants
    it as a bearer token. `limits`: what one request may ask (ServeLimits' defaults if None)."""
    limits = limits or ServeLimits()
    server = _Server(loaded, limits)
    app = FastAPI(
        title="finlora",
        summary=f"{server.name}: a {loaded.task} run of {loaded.cfg.model.name}",
        docs_url=None,
        redoc_url=None,
    )
    add_docs(app)
    # Middleware added later runs first: the body's size is looked at before anything, the key
    # before a request takes one of the places at the model.
    app.add_middleware(Admission, size=limits.queue_size)
    app.add_middleware(TrimWhenIdle)

    if api_key is not None:

        @app.middleware("http")
        async def require_key(request: Request, call_next: Callable[..., Any]) -> Any:
            # Before routing and body parsing: /docs and /openapi.json are guarded too, and a
            # request without the key learns nothing about what its body should be.
            if request.url.path == "/health" or _authorized(
                request.headers.get("authorization"), api_key
            ):
                return await call_next(request)
            return JSONResponse(
                status_code=401,
                content={"detail": "missing or wrong API key"},
                headers={"WWW-Authenticate": "Bearer"},
            )

    app.add_middleware(BodyLimit, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestValidationError)
    def invalid_body(_request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's own answer repeats each faulty value: a whole report, or confidential text,
        # sent back (and into whatever logs the response). Where and what is wrong is enough.
        errors = [{k: e[k] for k in ("type", "loc", "msg") if k in e} for e in exc.errors()]
        return JSONResponse(status_code=422, content={"detail": jsonable_encoder(errors)})

    @app.get("/health")
    def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/info")
    def info() -> dict[str, Any]:
        return server.info()

    @app.post("/predict")
    def predict(request: PredictRequest) -> dict[str, Any]:
        _within(limits, request)
        return _user_errors_as_400(lambda: server.predict(request))

    @app.post("/analyze")
    def analyze_report(request: AnalyzeRequest) -> dict[str, Any]:
        _within(limits, request)
        return _user_errors_as_400(lambda: server.analyze(request))

    @app.post("/generate")
    async def generate(request: GenerateRequest, http: Request) -> dict[str, Any]:
        _within(limits, request)
        return await while_connected(
            http, lambda write: _user_errors_as_400(lambda: server.generate(request, write))
        )

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(
        request: ChatRequest, http: Request
    ) -> dict[str, Any] | StreamingResponse:
        _within(limits, request)
        if request.stream:
            server.require("instruct", "/predict")  # before the stream starts: a real status
            return StreamingResponse(server.chat_stream(request), media_type="text/event-stream")
        return await while_connected(
            http, lambda write: _user_errors_as_400(lambda: server.chat(request, write))
        )

    return app


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_bindable(host: str, port: int) -> None:
    """Refuse an address this machine cannot listen on (taken port, unknown host)."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as exc:
        raise FinloraError(f"--host {host}: {exc.strerror}") from None
    family, kind, proto, _, address = infos[0]
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind(address)
        except OSError as exc:
            fix = "pick another --port" if exc.errno == errno.EADDRINUSE else "check --host"
            raise FinloraError(
                f"{host}:{port}: cannot listen there ({exc.strerror}); {fix}"
            ) from None


def _user_errors_as_400(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return work()
    except FinloraError as exc:
        raise HTTPException(400, str(exc)) from None
