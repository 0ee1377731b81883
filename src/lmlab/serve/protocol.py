"""The bodies of lmlab's HTTP API, in OpenAI's shapes (pydantic models).

Requests are checked here, field by field, so a bad value is a 400 that names
its field (`param`) before anything reaches the engine. Ranges are OpenAI's:
temperature in [0, 2], top_p in (0, 1], top_logprobs in 0..20, n ≥ 1,
presence/frequency penalties in [-2, 2]. Unknown fields are ignored, as most
OpenAI-compatible servers do, so a client that sends a newer field still works.

Accepted but not used: `presence_penalty`, `frequency_penalty` (OpenAI's additive
penalties) and `user`. lmlab's extras: `top_k`, `repetition_penalty` (CTRL's
multiplicative θ over the prompt's and the answer's ids) and, as in vLLM,
`ignore_eos` (generate past the end-of-text and end-of-turn ids: answers of a fixed
length, for benchmarks). Refused with a 400: `echo: true` and `suffix` on
/v1/completions.

Responses are built from the models below and sent as JSON, or, when streaming,
one `data: {json}` server-sent event per chunk and `data: [DONE]` last.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

MAX_STOP = 16  # stop strings per request
MAX_N = 128  # choices per request (OpenAI's limit)


def _utf8(text: str) -> str:
    """JSON may carry a lone surrogate ("\\ud800"), which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("not valid Unicode text (a lone surrogate); send UTF-8 text") from None
    return text


Text = Annotated[str, AfterValidator(_utf8)]
Stop = Annotated[str, Field(min_length=1), AfterValidator(_utf8)]


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


# ------------------------------------------------------------------ requests

class TextPart(_Body):
    type: Literal["text"]
    text: Text


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]  # developer: OpenAI's new system
    content: Text | list[TextPart]

    def as_dict(self) -> dict[str, str]:
        """{"role", "content"} as lmlab's chat template takes it."""
        content = (self.content if isinstance(self.content, str)
                   else "".join(p.text for p in self.content))
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class StreamOptions(_Body):
    include_usage: bool = False


class _Sampling(_Body):
    """Fields /v1/chat/completions and /v1/completions share."""

    model: Text
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_N)
    stop: Stop | Annotated[list[Stop], Field(max_length=MAX_STOP)] | None = None
    seed: int | None = None
    temperature: float = Field(1.0, ge=0, le=2, allow_inf_nan=False)
    top_p: float | None = Field(None, gt=0, le=1, allow_inf_nan=False)
    max_tokens: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: float | None = Field(None, ge=-2, le=2, allow_inf_nan=False)
    user: str | None = None
    # lmlab's extras
    top_k: int | None = Field(None, ge=1)
    repetition_penalty: float = Field(1.0, gt=0, allow_inf_nan=False)
    ignore_eos: bool = False  # vLLM's: go on past the end of text / turn (fixed lengths)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or ())

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name of max_tokens
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)

    @property
    def token_budget(self) -> int | None:
        newer = self.max_completion_tokens
        return newer if newer is not None else self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Text | list[Text] | list[Annotated[int, Field(ge=0)]] | list[
        list[Annotated[int, Field(ge=0)]]]
    max_tokens: int | None = Field(16, ge=1)  # OpenAI's default here
    logprobs: int | None = Field(None, ge=0, le=20)  # the legacy API: how many alternatives
    echo: bool = False
    suffix: str | None = None

    @property
    def token_budget(self) -> int | None:
        return self.max_tokens


class TokenizeRequest(_Body):
    model: Text | None = None
    text: Text | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)


# ------------------------------------------------------------------ responses

class _Out(BaseModel):
    """A response body; its `optional` fields are left out while None, as OpenAI does."""

    optional: ClassVar[tuple[str, ...]] = ()

    @model_serializer(mode="wrap")
    def _leave_out_unset(self, handler):
        data = handler(self)
        for name in self.optional:
            if data.get(name) is None:
                data.pop(name, None)
        return data


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob]
    refusal: None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(_Out):
    optional = ("sources",)
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    sources: list[dict[str, Any]] | None = None  # lmlab: the passages of --docs it was given


class Delta(_Out):
    optional = ("role", "content")
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(_Out):
    optional = ("usage", "sources")
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    sources: list[dict[str, Any]] | None = None


class TextLogprobs(BaseModel):
    """The legacy completions API's logprobs."""

    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]] | None
    text_offset: list[int]


class TextChoice(BaseModel):
    index: int
    text: str
    logprobs: TextLogprobs | None = None
    finish_reason: str | None = None


class TextCompletion(_Out):
    """A /v1/completions response, and (object "text_completion" too) each of its chunks."""

    optional = ("usage",)

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[TextChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "lmlab"
    max_model_len: int | None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int
    max_model_len: int | None


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
