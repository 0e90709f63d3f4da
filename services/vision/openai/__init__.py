"""The OpenAI-compatible HTTP API of the vision service (`POST /v1/chat/completions`,
`GET /v1/models`), served by Serve's HTTP proxy beside the gRPC API, on the same
pipeline: `schema` (the request body), `images` (image_url forms), `convert` (the body
as a `GenerateRequest`), `responses` (events as completions and chunks), `errors`
(failures as OpenAI error objects and HTTP statuses), `http` (routes, auth, body limit).
"""

from services.vision.openai.http import OpenAIApi

__all__ = ["OpenAIApi"]
