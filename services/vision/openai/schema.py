"""The request body of `POST /v1/chat/completions`, as pydantic models.

What OpenAI's API and its clients send, less what this service cannot honour: fields
this service does not know are ignored (clients send many: `logprobs`, `user`,
`response_format`, ...), a field it knows is checked against its range, and content part
types other than `text` and `image_url` are refused by name. HERO's own settings ride in
the body as `hero` (what OpenAI clients send with `extra_body`), and `ignore_eos` as vLLM
takes it (answers of a fixed length, for benchmarks).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from hero_core.errors import InvalidInputError

MAX_SEED = (1 << 64) - 1
M = TypeVar("M", bound=BaseModel)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    """A `data:image/...;base64,` URI, `hero-image://<id>`, or an http(s) URL of an
    allowed host."""
    detail: str | None = None
    """Accepted and ignored: HERO decides how many visual tokens the model sees."""


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Lenient):
    role: str
    content: str | list[ContentPart] | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class HeroOptions(BaseModel):
    """HERO's settings of one request; unset ones take the deployment's defaults."""

    model_config = ConfigDict(extra="forbid")

    method: str = ""
    """Pruning method (`GET /v1/models` lists them); empty: the default method."""
    retention: float = Field(0.0, ge=0.0, le=1.0)
    """Share of visual tokens to keep, in (0, 1]; 0: the default retention."""


class ChatCompletionRequest(_Lenient):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    ignore_eos: bool = False
    hero: HeroOptions | None = None

    def stop_strings(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class LayoutRequest(BaseModel):
    """The body of `POST /v1/hero/layout`: which image, question and pruning settings."""

    model_config = ConfigDict(extra="forbid")

    image_url: str
    """As a chat message's `image_url.url`: a data URI, `hero-image://<id>`, or an http(s)
    URL of an allowed host."""
    question: str = ""
    """The question that guides the tile budgets (the chat's last user text)."""
    hero: HeroOptions | None = None


def _where(loc: tuple[Any, ...]) -> str:
    """`messages[0].content[1].image_url` from pydantic's location tuple, less the names
    pydantic puts in for union members (`str`, `list[...]`) and for the tag of a
    content part."""
    out, previous = "", None
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif (isinstance(part, str) and "[" in part) or part == "str":
            continue
        elif isinstance(previous, int) and part in ("text", "image_url") \
                and out.endswith(f"content[{previous}]"):
            pass  # the content part's tag
        else:
            out += f".{part}" if out else str(part)
        previous = part
    return out


def parse_request(body: bytes) -> ChatCompletionRequest:
    """The body as a checked request; `InvalidInputError` naming the first bad field
    (never echoing its value: it may be megabytes of base64)."""
    return _parse(ChatCompletionRequest, body)


def parse_layout_request(body: bytes) -> LayoutRequest:
    """The body of `POST /v1/hero/layout`, checked as `parse_request` checks a chat's."""
    return _parse(LayoutRequest, body)


def _parse(model: type[M], body: bytes) -> M:
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False, include_input=False)
        if errors[0]["type"] == "json_invalid":
            raise InvalidInputError("the body is not valid JSON; send a JSON object "
                                    "(Content-Type: application/json)") from None
        raise _bad_field(errors) from None


def _bad_field(errors: list[Any]) -> BadField:
    """The deepest error (the most precise one of a union's branches); the branches that
    failed at the same field are named together ("a valid string, or a valid array")."""
    deepest = max(errors, key=lambda e: len(_where(tuple(e["loc"]))))
    where = _where(tuple(deepest["loc"]))
    messages = [e["msg"] for e in errors if _where(tuple(e["loc"])) == where]
    text = ", or ".join([messages[0], *(m.removeprefix("Input should be ")
                                         for m in messages[1:])])
    return BadField(f"{where or 'body'}: {text}", where or None)


class BadField(InvalidInputError):
    """A field of the body out of range or of the wrong type; `param` names it."""

    def __init__(self, message: str, param: str | None):
        super().__init__(message)
        self.param = param

    def __reduce__(self) -> tuple[Any, ...]:
        return type(self), (str(self), self.param)
