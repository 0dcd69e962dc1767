"""The HTTP server's request bodies and their limits: what a client may send, checked before any
work starts. pydantic checks a body's shape; `ServeLimits`, set when the server starts, bounds
its sizes. A bad field is a 422 naming it either way."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from finlora.generate import MAX_NEW_TOKENS, GenerationOptions
from finlora.serve_limits import ServeLimits

API_KEY_ENV = "FINLORA_API_KEY"
ROUTES = {
    "classify": ("/predict", "/analyze"),
    "instruct": ("/generate", "/v1/chat/completions"),
}


def _unicode(text: str) -> str:
    # JSON may escape a lone surrogate ("\\ud800"), which is no character: no tokenizer takes it.
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid Unicode (it holds a lone surrogate)") from None
    return text


def _not_blank(text: str) -> str:
    if not text.strip():
        raise ValueError("must not be empty")
    return text


Unicode = Annotated[str, AfterValidator(_unicode)]
Text = Annotated[Unicode, AfterValidator(_not_blank)]


# A limit error in pydantic's shape (what FastAPI's 422 lists), `loc` inside the body.
LimitError = dict[str, Any]


def _chars(loc: tuple[str | int, ...], text: str, limit: int) -> Iterator[LimitError]:
    if len(text) > limit:
        yield {
            "type": "string_too_long",
            "loc": ("body", *loc),
            "msg": f"String should have at most {limit} characters",
        }


def _items(loc: tuple[str | int, ...], items: list[Any], limit: int) -> Iterator[LimitError]:
    if len(items) > limit:
        yield {
            "type": "too_long",
            "loc": ("body", *loc),
            "msg": f"List should have at most {limit} items",
        }


def _at_most(loc: tuple[str | int, ...], value: int | None, limit: int) -> Iterator[LimitError]:
    if value is not None and value > limit:
        yield {
            "type": "less_than_equal",
            "loc": ("body", *loc),
            "msg": f"Input should be less than or equal to {limit}",
        }


# finlora's own routes refuse a field they do not know (a misspelt "temprature" would be ignored
# in silence); the OpenAI route accepts the many options its clients send (ChatRequest).
STRICT = ConfigDict(extra="forbid")


class PredictRequest(BaseModel):
    model_config = STRICT
    texts: Annotated[list[Text], Field(min_length=1)]
    # Off by default: the client has its texts, and sending them back doubles the answer.
    echo: bool = Field(False, description="Repeat each text in its prediction.")

    def over_limits(self, limits: ServeLimits) -> Iterator[LimitError]:
        yield from _items(("texts",), self.texts, limits.max_texts)
        for i, text in enumerate(self.texts):
            yield from _chars(("texts", i), text, limits.max_text_chars)


class AnalyzeRequest(BaseModel):
    model_config = STRICT
    text: Text
    top: Annotated[int, Field(ge=0, le=100)] = 5
    source: Unicode = "request"

    def over_limits(self, limits: ServeLimits) -> Iterator[LimitError]:
        yield from _chars(("text",), self.text, limits.max_report_chars)
        yield from _chars(("source",), self.source, limits.max_text_chars)


class Decoding(BaseModel):
    """Decoding options, with `finlora generate`'s defaults (greedy: reproducible answers)."""

    model_config = STRICT

    max_new_tokens: Annotated[int, Field(ge=1, le=MAX_NEW_TOKENS)] = 256
    temperature: Annotated[float, Field(ge=0.0, allow_inf_nan=False)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    top_k: Annotated[int, Field(ge=0)] = 0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None

    def options(self) -> GenerationOptions:
        return GenerationOptions(
            self.max_new_tokens, self.temperature, self.top_p, self.top_k, self.seed
        )


class GenerateRequest(Decoding):
    instruction: Text
    input: Unicode = ""
    system: Unicode | None = None
    echo: bool = Field(False, description="Repeat the instruction and input in the answer.")

    def over_limits(self, limits: ServeLimits) -> Iterator[LimitError]:
        for name in ("instruction", "input", "system"):
            yield from _chars((name,), getattr(self, name) or "", limits.max_text_chars)
        if "max_new_tokens" in self.model_fields_set:
            yield from _at_most(("max_new_tokens",), self.max_new_tokens, limits.max_tokens)

    def limited_options(self, limits: ServeLimits) -> GenerationOptions:
        """`options()`, the default answer length cut to the server's limit."""
        options = self.options()
        return replace(options, max_new_tokens=min(options.max_new_tokens, limits.max_tokens))


class TextPart(BaseModel):
    """One part of an OpenAI message's content given as a list; finlora reads text only."""

    type: Literal["text"]
    text: Unicode


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Unicode | list[TextPart]

    @property
    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class ChatRequest(BaseModel):
    """The OpenAI chat-completions request, as far as finlora can honour it."""

    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    model: str | None = None  # accepted and ignored: the server holds one model
    max_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    max_completion_tokens: Annotated[int | None, Field(ge=1, le=MAX_NEW_TOKENS)] = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] = 0.0
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] = 1.0
    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None
    stream: bool = False
    # Refused rather than ignored: an answer that silently ran past a stop sequence, or one
    # choice where n were asked for, would mislead the client.
    n: Annotated[int, Field(ge=1, le=1)] = 1
    stop: str | list[str] | None = None

    @field_validator("stop")
    @classmethod
    def _no_stop(cls, stop: str | list[str] | None) -> None:
        if stop:
            raise ValueError("stop sequences are not supported")
        return None

    @field_validator("messages")
    @classmethod
    def _ends_with_user(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if messages[-1].role != "user":
            raise ValueError("the last message must be the user's")
        if not messages[-1].text.strip():
            raise ValueError("the last (user) message must not be empty")
        return messages

    def over_limits(self, limits: ServeLimits) -> Iterator[LimitError]:
        yield from _items(("messages",), self.messages, limits.max_messages)
        for i, message in enumerate(self.messages):
            yield from _chars(("messages", i, "content"), message.text, limits.max_text_chars)
        for name in ("max_tokens", "max_completion_tokens"):
            yield from _at_most((name,), getattr(self, name), limits.max_tokens)

    def options(self) -> GenerationOptions:
        limit = self.max_completion_tokens or self.max_tokens or Decoding().max_new_tokens
        return GenerationOptions(limit, self.temperature, self.top_p, 0, self.seed)

    def limited_options(self, limits: ServeLimits) -> GenerationOptions:
        """`options()`, the default answer length cut to the server's limit."""
        options = self.options()
        return replace(options, max_new_tokens=min(options.max_new_tokens, limits.max_tokens))
