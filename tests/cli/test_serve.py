"""`finlora serve`: the HTTP routes on tiny classify and instruct runs (FastAPI's test client),
what they answer against the library calls behind `finlora predict` and `finlora generate`, the
refusals, the limits (413, 422 naming the field, 503), /predict's shared batches, and the real
command listening on 127.0.0.1."""

from __future__ import annotations

import functools
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cli_support import Result, assert_user_error
from fastapi import HTTPException
from fastapi.testclient import TestClient
from test_instruct_cli import instruct_rows

from finlora.chat import answer, instruction_prompt
from finlora.config import load_config
from finlora.errors import FinloraError
from finlora.generate import GenerationOptions
from finlora.inference import LoadedRun, load_run
from finlora.report import analyze
from finlora.serve import PredictQueue, create_app, is_loopback
from finlora.serve_limits import BodyLimit, ServeLimits, release_memory
from finlora.train import train

TEXTS = [
    "Operating profit rose to EUR 13.1 mn from EUR 8.7 mn.",
    "The company will hold its annual meeting in April.",
    "Net sales fell 12 % and the outlook was cut.",
]


def _train(output: Path, overrides: list[str]) -> Path:
    train(load_config(None, overrides), output, progress_bar=False, log=lambda _msg: None)
    return output


@pytest.fixture(scope="module")
def classify_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    output = tmp_path_factory.mktemp("serve-classify") / "run"
    return _train(output, [*tiny_overrides, "train.max_steps=2"])


@pytest.fixture(scope="module")
def instruct_run(tmp_path_factory: pytest.TempPathFactory, tiny_overrides: list[str]) -> Path:
    data = tmp_path_factory.mktemp("serve-data") / "fin.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in instruct_rows()), encoding="utf-8")
    output = tmp_path_factory.mktemp("serve-instruct") / "run"
    overrides = [*tiny_overrides, "task=instruct", f"data.path={data}", "data.template=alpaca",
                 "data.max_length=256", "train.learning_rate=0.01"]  # fmt: skip
    return _train(output, overrides)


@pytest.fixture(scope="module")
def classify_loaded(classify_run: Path) -> LoadedRun:
    return load_run(classify_run)


@pytest.fixture(scope="module")
def instruct_loaded(instruct_run: Path) -> LoadedRun:
    return load_run(instruct_run)


@pytest.fixture(scope="module")
def classify_client(classify_loaded: LoadedRun) -> TestClient:
    return TestClient(create_app(classify_loaded))


@pytest.fixture(scope="module")
def instruct_client(instruct_loaded: LoadedRun) -> TestClient:
    return TestClient(create_app(instruct_loaded))


# ---- classification ----------------------------------------------------------------------------


def test_health_and_info(classify_client: TestClient, classify_run: Path) -> None:
    assert classify_client.get("/health").json() == {"status": "ok"}
    info = classify_client.get("/info").json()
    assert info["task"] == "classify"
    assert info["labels"] == ["negative", "neutral", "positive"]
    assert info["run"] == str(classify_run.resolve())
    assert info["endpoints"] == ["/predict", "/analyze"]
    assert info["precision"] == "fp32"


def test_info_names_a_run_loaded_by_a_relative_path_absolutely(
    classify_run: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client of the server does not share its working directory: "runs/fpb" would not say
    which run answers."""
    monkeypatch.chdir(classify_run.parent)
    info = TestClient(create_app(load_run(Path(classify_run.name)))).get("/info").json()
    assert info["run"] == str(classify_run.resolve())


def test_predict_answers_as_the_library_does(
    classify_client: TestClient, classify_loaded: LoadedRun
) -> None:
    response = classify_client.post("/predict", json={"texts": TEXTS})
    assert response.status_code == 200
    served = response.json()["predictions"]
    expected = [p.to_dict() for p in classify_loaded.predict(TEXTS, progress=False)]
    # The texts are not sent back unless asked for: the client has them, in this order.
    assert served == [{k: v for k, v in row.items() if k != "text"} for row in expected]
    echoed = classify_client.post("/predict", json={"texts": TEXTS, "echo": True})
    assert echoed.json()["predictions"] == expected
    for row in served:
        assert row["label"] == max(row["probabilities"], key=row["probabilities"].get)
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)


def _queued(queue: PredictQueue, lock: threading.Lock, requests: list[list[str]]) -> list[Any]:
    """Send `requests` from threads while the model is busy; what each got back (or raised)."""
    results: list[Any] = [None] * len(requests)

    def send(i: int) -> None:
        try:
            results[i] = queue.predict(requests[i])
        except Exception as exc:
            results[i] = exc

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
    with lock:  # the model is busy: every request has to wait
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + 30
        while queue.pending < len(requests) and time.monotonic() < deadline:
            time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=60)
    return results


def test_predict_requests_waiting_for_the_model_are_scored_together(
    classify_loaded: LoadedRun,
) -> None:
    calls: list[list[str]] = []

    def score(texts: list[str]) -> list[Any]:
        calls.append(texts)
        return classify_loaded.predict(texts, progress=False)

    lock = threading.Lock()
    requests = [[TEXTS[0]], [TEXTS[1], TEXTS[2]], [TEXTS[2]]]
    results = _queued(PredictQueue(lock, score), lock, requests)
    assert len(calls) == 1 and sorted(calls[0]) == sorted(t for r in requests for t in r)
    for texts, got in zip(requests, results, strict=True):
        alone = classify_loaded.predict(texts, progress=False)
        assert [p.text for p in got] == texts
        assert [p.label for p in got] == [p.label for p in alone]
        for a, b in zip(got, alone, strict=True):
            assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)


def test_a_failed_batch_fails_every_request_in_it() -> None:
    def score(texts: list[str]) -> list[Any]:
        raise RuntimeError("out of memory")

    lock = threading.Lock()
    results = _queued(PredictQueue(lock, score), lock, [["a"], ["b"]])
    assert [str(r) for r in results] == ["out of memory", "out of memory"]


def test_one_failing_request_does_not_fail_the_others_in_its_batch(
    classify_loaded: LoadedRun,
) -> None:
    def score(texts: list[str]) -> list[Any]:
        if "poison" in texts:
            raise ValueError("cannot score 'poison'")
        return classify_loaded.predict(texts, progress=False)

    lock = threading.Lock()
    results = _queued(PredictQueue(lock, score), lock, [[TEXTS[0]], ["poison"], [TEXTS[1]]])
    assert [p.text for p in results[0]] == [TEXTS[0]]
    assert str(results[1]) == "cannot score 'poison'"
    assert [p.text for p in results[2]] == [TEXTS[1]]


@pytest.mark.parametrize(
    "body",
    [
        {"texts": []},
        {"texts": ["ok", "  "]},
        {"text": "one"},
        {"texts": "not a list"},
        {"texts": ["ok"], "top": 3},
    ],
)
def test_predict_refuses_bad_bodies(classify_client: TestClient, body: dict[str, Any]) -> None:
    response = classify_client.post("/predict", json=body)
    assert response.status_code == 422
    assert response.json()["detail"]


def test_predict_refuses_a_lone_surrogate(classify_client: TestClient) -> None:
    # Valid JSON, but no character: no tokenizer takes it.
    body = b'{"texts": ["Sales rose.", "lone \\ud800 surrogate"]}'
    headers = {"content-type": "application/json"}
    response = classify_client.post("/predict", content=body, headers=headers)
    assert response.status_code == 422
    assert "lone surrogate" in response.json()["detail"][0]["msg"]


def test_predict_refuses_too_many_texts(classify_client: TestClient) -> None:
    response = classify_client.post("/predict", json={"texts": ["Sales rose."] * 1025})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "texts"]


def test_instruct_routes_refuse_a_classify_run(classify_client: TestClient) -> None:
    generate = classify_client.post("/generate", json={"instruction": "What is EBITDA?"})
    assert generate.status_code == 400
    assert "task is classify" in generate.json()["detail"]
    for stream in (False, True):
        body = {"messages": [{"role": "user", "content": "Hi"}], "stream": stream}
        chat = classify_client.post("/v1/chat/completions", json=body)
        assert chat.status_code == 400
        assert "use /predict" in chat.json()["detail"]
        assert "task is classify" in chat.json()["detail"]


def test_an_api_key_guards_every_route_but_health(classify_loaded: LoadedRun) -> None:
    client = TestClient(create_app(classify_loaded, api_key="s3cret"))
    assert client.get("/health").status_code == 200
    body = {"texts": TEXTS[:1]}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
        for response in (client.get("/info", headers=headers),
                         client.post("/predict", json=body, headers=headers)):  # fmt: skip
            assert response.status_code == 401
            assert response.json()["detail"] == "missing or wrong API key"
            assert response.headers["www-authenticate"] == "Bearer"
    # The API's description is guarded too, and a body is not looked at before the key.
    for path in ("/docs", "/openapi.json"):
        assert client.get(path).status_code == 401
    assert client.post("/predict", json={"texts": []}).status_code == 401
    good = {"Authorization": "Bearer s3cret"}
    assert client.get("/openapi.json", headers=good).status_code == 200
    assert client.get("/info", headers=good).json()["task"] == "classify"
    response = client.post("/predict", json=body, headers=good)
    assert response.status_code == 200 and response.json()["predictions"][0]["label"]


# ---- instruct ----------------------------------------------------------------------------------


def _library_answer(loaded: LoadedRun, instruction: str, max_new_tokens: int) -> str:
    prompt = instruction_prompt(loaded, instruction)
    options = GenerationOptions(max_new_tokens=max_new_tokens)
    return answer(loaded, prompt, options, lambda _: None).text


def test_generate_answers_as_the_library_does(
    instruct_client: TestClient, instruct_loaded: LoadedRun
) -> None:
    body = {"instruction": "What is EBITDA?", "max_new_tokens": 12}
    response = instruct_client.post("/generate", json=body)
    assert response.status_code == 200
    served = response.json()
    assert served["answer"] == _library_answer(instruct_loaded, "What is EBITDA?", 12)
    assert served.keys() == {"answer", "finish_reason"}  # the question is not sent back ...
    assert served["finish_reason"] in ("stop", "length")
    echoed = instruct_client.post("/generate", json={**body, "echo": True}).json()
    assert echoed == {"instruction": "What is EBITDA?", "input": "", **served}  # ... unless asked
    # The tiny run's Alpaca template has no system prompt, and /info says so.
    assert instruct_client.get("/info").json()["system_prompt"] is False


@pytest.mark.parametrize(
    "body",
    [
        {"instruction": " "},
        {"instruction": "Define EBIT.", "max_new_tokens": 0},
        {"instruction": "Define EBIT.", "temperature": -1},
        {"instruction": "Define EBIT.", "top_p": 0},
        {"instruction": "Define EBIT.", "temprature": 0.7},  # misspelt: not silently ignored
    ],
)
def test_generate_refuses_bad_bodies(instruct_client: TestClient, body: dict[str, Any]) -> None:
    assert instruct_client.post("/generate", json=body).status_code == 422


def test_generate_refuses_an_infinite_temperature(instruct_client: TestClient) -> None:
    body = b'{"instruction": "Define EBIT.", "temperature": 1e999}'  # valid JSON: inf
    headers = {"content-type": "application/json"}
    response = instruct_client.post("/generate", content=body, headers=headers)
    assert response.status_code == 422  # a body's fault, named by field, not a CLI flag's


def test_predict_refuses_an_instruct_run(instruct_client: TestClient) -> None:
    for route, body in (("/predict", {"texts": TEXTS}), ("/analyze", {"text": REPORT})):
        response = instruct_client.post(route, json=body)
        assert response.status_code == 400
        assert "task is instruct" in response.json()["detail"]


REPORT = (
    "# Results\n\nNet sales rose 12 %. Mr. Smith said demand held.\n\n"
    "# Risks\n\nCosts rose sharply."
)


def test_analyze_answers_as_the_library_does(
    classify_client: TestClient, classify_loaded: LoadedRun
) -> None:
    response = classify_client.post("/analyze", json={"text": REPORT, "top": 1, "source": "q3"})
    assert response.status_code == 200
    analysis = analyze(
        REPORT, "q3", classify_loaded.labels, lambda t: classify_loaded.proba(t, progress=False)
    )
    expected = analysis.summary(1)
    served = response.json()
    assert served["sentences"] == 3
    assert [s["title"] for s in served["sections"]] == ["Results", "Risks"]
    assert served.keys() == expected.keys()
    for label, row in expected["labels"].items():
        assert served["labels"][label] == pytest.approx(row, abs=1e-5)
    assert served["tone"] == pytest.approx(expected["tone"], abs=1e-5)
    nothing = classify_client.post("/analyze", json={"text": "12\n\n| 3 | 4 |"})
    assert nothing.status_code == 400 and "no prose sentence" in nothing.json()["detail"]
    assert classify_client.post("/analyze", json={"text": "  "}).status_code == 422
    secret = "Confidential: net sales fell. " * 70_000  # over the 2 MB a report may have
    too_long = classify_client.post("/analyze", json={"text": secret})
    assert too_long.status_code == 422 and "Confidential" not in too_long.text
    assert too_long.json()["detail"][0]["loc"] == ["body", "text"]


def _chat(client: TestClient, **extra: Any) -> Any:
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is EBITDA?"}]  # fmt: skip
    return client.post("/v1/chat/completions", json={"messages": messages, **extra})


def test_chat_completion_has_the_openai_shape(
    instruct_client: TestClient, instruct_loaded: LoadedRun
) -> None:
    response = _chat(instruct_client, max_tokens=8, model="anything")
    assert response.status_code == 200
    body = response.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    # The Alpaca template has no turns: the latest user message is the instruction.
    assert choice["message"]["content"] == _library_answer(instruct_loaded, "What is EBITDA?", 8)
    usage = body["usage"]
    assert 1 <= usage["completion_tokens"] <= 8
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    if choice["finish_reason"] == "length":
        assert usage["completion_tokens"] == 8


def test_chat_completion_streams_the_same_answer(instruct_client: TestClient) -> None:
    whole = _chat(instruct_client, max_tokens=8).json()["choices"][0]
    with instruct_client.stream(
        "POST",
        "/v1/chat/completions",
        json={
            "messages": [{"role": "user", "content": "What is EBITDA?"}],
            "max_tokens": 8,
            "stream": True,
        },  # fmt: skip
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[len("data: ") :] for line in response.iter_lines() if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
    assert text.strip() == whole["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["finish_reason"]


def test_chat_reads_openai_content_parts(instruct_client: TestClient) -> None:
    as_text = _chat(instruct_client, max_tokens=4).json()["choices"][0]["message"]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Answer briefly."}]},
        {"role": "user", "content": [{"type": "text", "text": "What is EBITDA?"}]},
    ]
    body = {"messages": messages, "max_tokens": 4}
    response = instruct_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"] == as_text


@pytest.mark.parametrize("extra", [{"n": 2}, {"stop": ["\n"]}, {"stop": "END"}])
def test_chat_refuses_options_it_cannot_honour(
    instruct_client: TestClient, extra: dict[str, Any]
) -> None:
    body = {"messages": [{"role": "user", "content": "Hi"}], **extra}
    response = instruct_client.post("/v1/chat/completions", json=body)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][-1] == next(iter(extra))
    # What clients send by default still goes through.
    ok = {"messages": [{"role": "user", "content": "Hi"}], "n": 1, "stop": None, "max_tokens": 2}
    assert instruct_client.post("/v1/chat/completions", json=ok).status_code == 200


def test_a_stream_whose_client_left_stops_generating(
    instruct_loaded: LoadedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from finlora import serve

    written: list[str] = []
    stopped = threading.Event()

    def endless(loaded: Any, prompt: Any, options: Any, write: Callable[[str], None]) -> Any:
        try:
            while True:  # a model that would talk on and on
                write("word ")
                written.append("word ")
                time.sleep(0.001)
        finally:
            stopped.set()

    monkeypatch.setattr(serve, "answer", endless)
    server = serve._Server(instruct_loaded)
    request = serve.ChatRequest.model_validate(
        {"messages": [{"role": "user", "content": "Hi"}], "stream": True}
    )

    async def leave_early() -> None:
        stream = server.chat_stream(request)
        await stream.__anext__()  # the role chunk
        await stream.__anext__()  # the first words: generation is under way
        await stream.aclose()  # as the server does when the client is gone

    asyncio.run(leave_early())
    assert stopped.wait(timeout=10)  # the generation was stopped ...
    assert server.lock.acquire(timeout=10)  # ... and the model is free for the next request
    assert written


@pytest.mark.parametrize("route", ["generate", "chat"])
def test_a_client_that_leaves_stops_a_plain_generation(
    instruct_loaded: LoadedRun, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """Not streamed either: a client that gave up (a timeout) must not hold the model."""
    import asyncio

    from finlora import serve

    stopped = threading.Event()

    def endless(loaded: Any, prompt: Any, options: Any, write: Callable[[str], None]) -> Any:
        try:
            while True:
                write("word ")
                time.sleep(0.001)
        finally:
            stopped.set()

    class Leaves:  # Starlette's Request, as far as while_connected asks it
        def __init__(self) -> None:
            self.asked = 0

        async def is_disconnected(self) -> bool:
            self.asked += 1
            return self.asked > 1  # there for the first look, gone at the second

    monkeypatch.setattr(serve, "answer", endless)
    monkeypatch.setattr(serve, "DISCONNECT_POLL_S", 0.01)
    server = serve._Server(instruct_loaded)
    if route == "generate":
        request: Any = serve.GenerateRequest(instruction="Define EBIT.")
        work = functools.partial(server.generate, request)
    else:
        request = serve.ChatRequest.model_validate(
            {"messages": [{"role": "user", "content": "Hi"}]}
        )
        work = functools.partial(server.chat, request)
    with pytest.raises(HTTPException) as caught:
        asyncio.run(serve.while_connected(Leaves(), work))
    assert caught.value.status_code == 499
    assert stopped.wait(timeout=10) and server.lock.acquire(timeout=10)


def test_a_plain_generation_answers_while_its_client_stays(instruct_loaded: LoadedRun) -> None:
    import asyncio

    from finlora import serve

    class Stays:
        async def is_disconnected(self) -> bool:
            return False

    server = serve._Server(instruct_loaded)
    request = serve.GenerateRequest(instruction="Define EBIT.", max_new_tokens=3)
    reply = asyncio.run(serve.while_connected(Stays(), functools.partial(server.generate, request)))
    assert reply["finish_reason"] in ("stop", "length")


@pytest.mark.parametrize(
    "messages",
    [
        [],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        [{"role": "robot", "content": "Hi"}],
        [{"role": "user", "content": "  "}],
        [{"role": "user", "content": []}],
    ],  # fmt: skip
)
def test_chat_refuses_bad_conversations(
    instruct_client: TestClient, messages: list[dict[str, str]]
) -> None:
    response = instruct_client.post("/v1/chat/completions", json={"messages": messages})
    assert response.status_code == 422


# ---- limits ------------------------------------------------------------------------------------

LIMITS = ServeLimits(
    max_body_bytes=20_000, max_text_chars=60, max_texts=3, max_report_chars=300,
    max_messages=2, max_tokens=16,
)  # fmt: skip
SECRET = "Confidential: the merger closes on Friday. "  # what no refusal may send back


@pytest.fixture(scope="module")
def limited_classify(classify_loaded: LoadedRun) -> TestClient:
    return TestClient(create_app(classify_loaded, limits=LIMITS))


@pytest.fixture(scope="module")
def limited_instruct(instruct_loaded: LoadedRun) -> TestClient:
    return TestClient(create_app(instruct_loaded, limits=LIMITS))


def test_a_body_over_the_limit_by_its_length_is_a_413(limited_classify: TestClient) -> None:
    body = json.dumps({"texts": [SECRET] * 600}).encode()  # 27 KB
    response = limited_classify.post(
        "/predict", content=body, headers={"content-type": "application/json"}
    )
    assert response.status_code == 413
    assert response.headers["connection"] == "close"
    assert "20000 bytes" in response.json()["detail"] and SECRET not in response.text
    # Under the limit the same route answers.
    assert limited_classify.post("/predict", json={"texts": TEXTS[:1]}).status_code == 200


def test_a_chunked_body_over_the_limit_is_a_413(limited_classify: TestClient) -> None:
    def chunks() -> Any:  # no Content-Length: sent chunked
        yield b'{"texts": ["'
        for _ in range(100):
            yield SECRET.encode() * 10
        yield b'"]}'

    response = limited_classify.post(
        "/predict", content=chunks(), headers={"content-type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert response.status_code == 413 and SECRET not in response.text


def test_the_body_limit_stops_reading_at_the_limit() -> None:
    """A streamed body is counted as it comes, and not read past the limit."""
    import asyncio

    sent: list[Any] = []
    read = 0

    async def app(scope: Any, receive: Any, send: Any) -> None:  # reads the whole body first
        while (await receive()).get("more_body"):
            pass
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def receive() -> dict[str, Any]:
        nonlocal read
        read += 1
        return {"type": "http.request", "body": b"x" * 1000, "more_body": read < 1000}

    async def send(message: Any) -> None:
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "headers": []}
    asyncio.run(BodyLimit(app, max_bytes=10_000)(scope, receive, send))
    assert read == 11  # 11,000 bytes of the 1,000,000 sent
    assert sent[0]["status"] == 413 and len(sent) == 2


@pytest.mark.parametrize(
    ("route", "body", "loc"),
    [
        ("/predict", {"texts": ["Sales rose.", SECRET * 2]}, ["body", "texts", 1]),
        ("/predict", {"texts": [SECRET[:20]] * 4}, ["body", "texts"]),
        ("/analyze", {"text": SECRET * 8}, ["body", "text"]),
        ("/analyze", {"text": "Sales rose.", "source": SECRET * 2}, ["body", "source"]),
    ],
)
def test_classify_fields_past_their_limits_are_a_422_naming_them(
    limited_classify: TestClient, route: str, body: dict[str, Any], loc: list[Any]
) -> None:
    response = limited_classify.post(route, json=body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert error.keys() == {"type", "loc", "msg"}
    assert SECRET[:20] not in response.text  # neither the input nor a piece of it


@pytest.mark.parametrize(
    ("route", "body", "loc"),
    [
        ("/generate", {"instruction": SECRET * 2}, ["body", "instruction"]),
        ("/generate", {"instruction": "Define EBIT.", "input": SECRET * 2}, ["body", "input"]),
        ("/generate", {"instruction": "Define EBIT.", "system": SECRET * 2}, ["body", "system"]),
        (
            "/generate",
            {"instruction": "Define EBIT.", "max_new_tokens": 17},
            ["body", "max_new_tokens"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": SECRET[:20]}] * 3},
            ["body", "messages"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": SECRET * 2}]},
            ["body", "messages", 0, "content"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": [{"type": "text", "text": SECRET * 2}]}]},
            ["body", "messages", 0, "content"],
        ),
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 17},
            ["body", "max_tokens"],
        ),
        (
            "/v1/chat/completions",
            {
                "messages": [{"role": "user", "content": "Hi"}],
                "max_completion_tokens": 999,
                "stream": True,
            },
            ["body", "max_completion_tokens"],
        ),
    ],  # fmt: skip
)
def test_instruct_fields_past_their_limits_are_a_422_naming_them(
    limited_instruct: TestClient, route: str, body: dict[str, Any], loc: list[Any]
) -> None:
    response = limited_instruct.post(route, json=body)
    assert response.status_code == 422
    (error,) = response.json()["detail"]
    assert error["loc"] == loc
    assert error.keys() == {"type", "loc", "msg"}
    assert SECRET[:20] not in response.text


def test_the_default_answer_length_is_cut_to_the_limit(
    limited_instruct: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finlora import serve
    from finlora.generate import Reply

    asked: list[int] = []

    def short(loaded: Any, prompt: Any, options: GenerationOptions, write: Any) -> Reply:
        asked.append(options.max_new_tokens)
        return Reply("EBIT is earnings before interest and taxes.", 9, False)

    monkeypatch.setattr(serve, "answer", short)
    assert limited_instruct.post("/generate", json={"instruction": "Hi"}).status_code == 200
    chat = {"messages": [{"role": "user", "content": "Hi"}]}
    assert limited_instruct.post("/v1/chat/completions", json=chat).status_code == 200
    assert asked == [16, 16]  # not the usual 256: the server's --max-tokens


def test_info_lists_the_limits(limited_classify: TestClient) -> None:
    assert limited_classify.get("/info").json()["limits"] == LIMITS.to_dict()


def test_a_full_server_answers_503_with_retry_after(
    classify_loaded: LoadedRun, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = TestClient(create_app(classify_loaded, limits=ServeLimits(queue_size=1)))
    at_model, go_on = threading.Event(), threading.Event()
    predict = classify_loaded.predict

    def held(texts: list[str], progress: bool = True) -> Any:
        at_model.set()
        assert go_on.wait(timeout=30)
        return predict(texts, progress=progress)

    monkeypatch.setattr(classify_loaded, "predict", held)
    first: list[Any] = []
    thread = threading.Thread(
        target=lambda: first.append(client.post("/predict", json={"texts": TEXTS[:1]}))
    )
    thread.start()
    try:
        assert at_model.wait(timeout=30)  # the one place is taken
        busy = client.post("/predict", json={"texts": TEXTS[1:2]})
        assert busy.status_code == 503
        assert busy.headers["retry-after"] == "1"
        assert "busy" in busy.json()["detail"]
        assert client.get("/health").status_code == 200  # what needs no model still answers
    finally:
        go_on.set()
        thread.join(timeout=60)
    assert first[0].status_code == 200
    # The place is free again.
    assert client.post("/predict", json={"texts": TEXTS[1:2]}).status_code == 200


def test_a_long_request_shares_the_model_with_a_short_one() -> None:
    """A long request's texts go in batches, the short request's text in the first of them:
    the short one is answered before the long one."""
    lock = threading.Lock()
    calls: list[list[str]] = []
    finished: list[str] = []
    short_answered = threading.Event()

    def score(texts: list[str]) -> list[str]:
        calls.append(texts)
        if len(calls) == 2:  # the long request cannot end before the short one is answered
            assert short_answered.wait(timeout=30)
        return [f"scored {t}" for t in texts]

    queue = PredictQueue(lock, score, batch_size=4)
    long = [f"long {i}" for i in range(10)]
    results: dict[str, Any] = {}

    def send(name: str, texts: list[str]) -> None:
        results[name] = queue.predict(texts)
        finished.append(name)
        if name == "short":
            short_answered.set()

    threads = {
        "long": threading.Thread(target=send, args=("long", long)),
        "short": threading.Thread(target=send, args=("short", ["short 0"])),
    }
    with lock:  # the model is busy: both wait, the long one queued first
        for n, name in enumerate(("long", "short"), start=1):
            threads[name].start()
            deadline = time.monotonic() + 30
            while queue.pending < n and time.monotonic() < deadline:
                time.sleep(0.01)
    for thread in threads.values():
        thread.join(timeout=60)
    assert finished == ["short", "long"]
    assert calls[0] == [
        "long 0",
        "long 1",
        "long 2",
        "short 0",
    ]  # the short one's text in the first
    assert all(len(c) <= 4 for c in calls)
    assert [t for c in calls for t in c if t.startswith("long")] == long  # in order, once each
    assert results["long"] == [f"scored {t}" for t in long]
    assert results["short"] == ["scored short 0"]


def test_a_long_request_that_finds_the_model_idle_is_scored_in_batches() -> None:
    calls: list[int] = []

    def score(texts: list[str]) -> list[str]:
        calls.append(len(texts))
        return texts

    queue = PredictQueue(threading.Lock(), score, batch_size=4)
    assert queue.predict([str(i) for i in range(10)]) == [str(i) for i in range(10)]
    assert calls == [4, 4, 2]
    assert queue.predict(["a", "b"]) == ["a", "b"] and calls[-1] == 2


def test_memory_is_handed_back_after_a_large_request(
    classify_client: TestClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    from finlora import serve

    released: list[int] = []
    monkeypatch.setattr(serve, "release_memory", lambda: released.append(1))
    monkeypatch.setattr(serve, "LARGE_REQUEST_CHARS", 100)
    assert classify_client.post("/predict", json={"texts": TEXTS[:1]}).status_code == 200
    assert released == []  # a small request: no gc pass
    assert classify_client.post("/predict", json={"texts": TEXTS * 2}).status_code == 200
    assert released == [1]
    release_memory()  # the real one: glibc's malloc_trim where there is one, no error elsewhere


def test_the_heap_is_trimmed_once_the_server_is_idle(monkeypatch: pytest.MonkeyPatch) -> None:
    import asyncio

    from finlora import serve_limits

    trimmed = threading.Event()
    monkeypatch.setattr(serve_limits, "trim_heap", trimmed.set)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        pass

    async def nothing(*_: Any) -> Any:
        pass

    middleware = serve_limits.TrimWhenIdle(app, idle_s=0.01)
    scope = {"type": "http", "method": "GET", "path": "/health", "headers": []}
    asyncio.run(middleware(scope, nothing, nothing))
    assert middleware.watcher is None  # no model work yet: nothing to trim
    asyncio.run(middleware({**scope, "method": "POST"}, nothing, nothing))
    assert trimmed.wait(timeout=30)
    assert not middleware.worked.is_set()


@pytest.mark.parametrize(
    ("changes", "option"),
    [
        ({"max_texts": 0}, "--max-texts"),
        ({"queue_size": -1}, "--queue-size"),
        ({"max_tokens": 5000}, "--max-tokens"),
    ],  # fmt: skip
)
def test_limits_are_checked_where_they_are_made(changes: dict[str, int], option: str) -> None:
    with pytest.raises(FinloraError, match=option):
        ServeLimits(**changes)


def test_serve_refuses_a_bad_limit_in_one_line(cli: Callable[..., Result], tmp_path: Path) -> None:
    assert_user_error(cli("serve", tmp_path / "nowhere", "--max-body-bytes", 0), "--max-body-bytes")


# ---- the command -------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _post(url: str, body: dict[str, Any]) -> Any:
    request = urllib.request.Request(
        url, json.dumps(body).encode(), {"content-type": "application/json"}
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.load(response)


def _raw_post(port: int, header: bytes, body: Iterator[bytes]) -> bytes:
    """A POST /predict written to the socket by hand, as a client that sends its body until the
    server answers; the start of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(b"POST /predict HTTP/1.1\r\nHost: test\r\n" + header + b"\r\n")
        for piece in body:
            if select.select([sock], [], [], 0)[0]:  # answered: the rest is not wanted
                break
            try:
                sock.sendall(piece)
            except OSError:  # the server closed the connection after its answer
                break
        return sock.recv(4096)


def test_serve_listens_on_loopback_and_predicts(
    classify_run: Path, classify_loaded: LoadedRun, tmp_path: Path
) -> None:
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    log = (tmp_path / "serve.log").open("w+")
    command = ["serve", str(classify_run), "--port", str(port), "--max-body-bytes", "100000"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "finlora.cli", *command],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(f"{base}/health", timeout=2) as response:
                    assert json.load(response) == {"status": "ok"}
                break
            except OSError:
                assert proc.poll() is None, log.seek(0) or log.read()
                assert time.monotonic() < deadline, "the server did not come up in 90 s"
                time.sleep(0.5)
        served = _post(f"{base}/predict", {"texts": TEXTS[:2]})["predictions"]
        expected = [p.to_dict() for p in classify_loaded.predict(TEXTS[:2], progress=False)]
        assert [p["label"] for p in served] == [p["label"] for p in expected]
        for got, want in zip(served, expected, strict=True):
            for label, p in want["probabilities"].items():
                assert got["probabilities"][label] == pytest.approx(p, abs=1e-5)
        # 50 MB bodies, announced and chunked: refused after at most the limit is read.
        piece = b"x" * 100_000
        announced = _raw_post(port, b"Content-Length: 50000000\r\n", (piece for _ in range(500)))
        chunked = (b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(500))
        unannounced = _raw_post(port, b"Transfer-Encoding: chunked\r\n", chunked)
        for head in (announced, unannounced):
            assert head.startswith(b"HTTP/1.1 413 "), head
        assert _post(f"{base}/predict", {"texts": TEXTS[:1]})["predictions"]  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    log.seek(0)
    output = log.read()
    assert f"http://127.0.0.1:{port}" in output
    assert "anyone who can reach" not in output


def test_serve_refuses_a_taken_port(cli: Callable[..., Result], classify_run: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = cli("serve", classify_run, "--port", port)
    assert_user_error(result, f"127.0.0.1:{port}", "--port")


def test_serve_refuses_a_missing_run(cli: Callable[..., Result], tmp_path: Path) -> None:
    assert_user_error(cli("serve", tmp_path / "nowhere"), "nowhere")


def test_loopback_addresses() -> None:
    assert is_loopback("127.0.0.1")
    assert is_loopback("::1")
    assert is_loopback("localhost")
    assert not is_loopback("0.0.0.0")
    assert not is_loopback("192.168.1.10")
