"""The HTTP server's request bodies and their limits: what a client may send, checked by
pydantic before any work starts (a bad field is a 422 naming it)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator

from finlora.generate import MAX_NEW_TOKENS, GenerationOptions

MAX_TEXTS = 1024  # sentences in one /predict request
MAX_REPORT_CHARS = 2_000_000  # one /analyze report: a long annual report's text
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


# finlora's own routes refuse a field they do not know (a misspelt "temprature" would be ignored
# in silence); the OpenAI route accepts the many options its clients send (ChatRequest).
STRICT = ConfigDict(extra="forbid")


class PredictRequest(BaseModel):
    model_config = STRICT
    texts: Annotated[list[Text], Field(min_length=1, max_length=MAX_TEXTS)]


class AnalyzeRequest(BaseModel):
    model_config = STRICT
    text: Annotated[Text, Field(max_length=MAX_REPORT_CHARS)]
    top: Annotated[int, Field(ge=0, le=100)] = 5
    source: Unicode = "request"


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

    def options(self) -> GenerationOptions:
        limit = self.max_completion_tokens or self.max_tokens or Decoding().max_new_tokens
        return GenerationOptions(limit, self.temperature, self.top_p, 0, self.seed)
