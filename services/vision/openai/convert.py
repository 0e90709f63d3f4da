"""A chat completion request as the vision pipeline's `GenerateRequest`.

Messages become chat turns (`developer` is a `system` turn; text parts of one message are
joined by newlines); the one image must be a part of the first user message, where the
pipeline puts it. Sampling follows OpenAI's defaults: `temperature` 1 and `top_p` 1 when
unset, `temperature: 0` is greedy; `max_completion_tokens` (else `max_tokens`, else
`openai.default_max_tokens`) bounds the answer.
"""

from __future__ import annotations

from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2

from services.vision.config import VisionConfig
from services.vision.openai.errors import ModelNotFoundError
from services.vision.openai.images import image_input
from services.vision.openai.schema import (
    BadField,
    ChatCompletionRequest,
    HeroOptions,
    ImagePart,
    Message,
)

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _text(message: Message) -> str:
    if message.content is None or isinstance(message.content, str):
        return message.content or ""
    return "\n".join(part.text for part in message.content if not isinstance(part, ImagePart))


def _image_parts(messages: list[Message]) -> list[tuple[int, ImagePart]]:
    return [(index, part) for index, message in enumerate(messages)
            if isinstance(message.content, list)
            for part in message.content if isinstance(part, ImagePart)]


def conversation(messages: list[Message]) -> tuple[list[tuple[str, str]], str]:
    """(role, text) turns and the image's URL; `InvalidInputError` unless there is
    exactly one image, in the first user message, and every role is known."""
    turns = []
    for index, message in enumerate(messages):
        role = ROLES.get(message.role)
        if role is None:
            raise BadField(f"messages[{index}].role {message.role[:32]!r} is not supported; "
                           "send system, developer, user and assistant messages",
                           f"messages[{index}].role")
        turns.append((role, _text(message)))
    images = _image_parts(messages)
    if len(images) != 1:
        raise BadField("send one image per conversation as an image_url content part "
                       f"(this request has {len(images)}); ask about other images in "
                       "requests of their own", "messages")
    first_user = next((i for i, (role, _) in enumerate(turns) if role == "user"), None)
    index, part = images[0]
    if index != first_user:
        raise BadField(f"the image is in messages[{index}]; put it in the first user "
                       "message, where the model sees it", f"messages[{index}].content")
    return turns, part.image_url.url


def generation_params(body: ChatCompletionRequest, config: VisionConfig
                      ) -> common_pb2.GenerationParams:
    if body.n not in (None, 1):
        raise BadField(f"n must be 1 (this endpoint answers with one choice), got {body.n}",
                       "n")
    max_tokens = (body.max_completion_tokens or body.max_tokens
                  or config.openai.default_max_tokens)
    if max_tokens >= 1 << 32:
        raise BadField(f"max_tokens {max_tokens} is too large", "max_tokens")
    return common_pb2.GenerationParams(
        max_new_tokens=max_tokens,
        temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, seed=body.seed or 0,
        stop=body.stop_strings(), ignore_eos=body.ignore_eos)


def prune_options(hero: HeroOptions | None) -> vision_pb2.PruneOptions:
    """A request's HERO settings as the pipeline reads them (unset: its defaults)."""
    return vision_pb2.PruneOptions(method=hero.method if hero else "",
                                   retention=hero.retention if hero else 0.0)


async def generate_request(body: ChatCompletionRequest, config: VisionConfig,
                           request_id: str) -> vision_pb2.GenerateRequest:
    """The pipeline's request for `body`, its image fetched when it is a remote URL."""
    turns, url = conversation(body.messages)
    params = generation_params(body, config)
    request = vision_pb2.GenerateRequest(
        request_id=request_id, image=await image_input(url, config),
        prune=prune_options(body.hero), params=params)
    request.chat.messages.extend(common_pb2.ChatMessage(role=role, content=text)
                                 for role, text in turns)
    return request


def check_model(body: ChatCompletionRequest, served: str) -> None:
    """`ModelNotFoundError` when `model` names another model than the one served."""
    if body.model not in (None, "", served):
        raise ModelNotFoundError(f"the model {body.model[:100]!r} is not served here; "
                                 f"this deployment serves {served!r} (GET /v1/models)")
