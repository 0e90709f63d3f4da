"""The baseline: a monolithic server with VisionService's API that runs stock
transformers LLaVA-NeXT (processor + `generate`), with no pruning and no cache, in one
process, one generation at a time.

    python -m loadtest.baseline --model tiny --port 9100

It is what a user would run instead of HERO Serve, on the same weights and requests.
"""

from __future__ import annotations

import argparse
import asyncio
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import torch
from hero.common.v1 import tensor_pb2 as common_pb2
from hero.vision.v1 import vision_pb2, vision_pb2_grpc

from hero_core.generation import format_prompt
from hero_core.image import decode_image
from hero_core.models import ModelSpec, resolve_spec


class StockVisionService(vision_pb2_grpc.VisionServiceServicer):
    """Generate with `LlavaNextForConditionalGeneration.generate` on every request."""

    def __init__(self, spec: ModelSpec):
        from transformers import (
            AutoTokenizer,
            LlavaNextForConditionalGeneration,
            LlavaNextImageProcessorPil,
            LlavaNextProcessor,
        )

        kwargs: dict[str, Any] = {"local_files_only": spec.local_files_only}
        self.model = LlavaNextForConditionalGeneration.from_pretrained(
            spec.model, dtype=getattr(torch, spec.dtype), **kwargs).to(spec.device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(spec.model, **kwargs)
        self.processor = LlavaNextProcessor.from_pretrained(
            spec.model, image_processor=LlavaNextImageProcessorPil.from_pretrained(
                spec.model, **kwargs), **kwargs)
        self.device = spec.device
        self.executor = ThreadPoolExecutor(1, "stock-generate")  # one generation at a time

    async def Generate(self, request: vision_pb2.GenerateRequest,
                       context: grpc.aio.ServicerContext
                       ) -> AsyncIterator[vision_pb2.GenerateEvent]:
        from transformers import TextIteratorStreamer

        arrival = time.perf_counter()
        try:
            image = decode_image(request.image.data)
        except Exception as exc:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        prompt = format_prompt(self.tokenizer, request.prompt)
        inputs = self.processor(images=image, text=prompt, return_tensors="pt").to(self.device)
        image_tokens = int((inputs["input_ids"] == self.model.config.image_token_id).sum())
        yield vision_pb2.GenerateEvent(accepted=vision_pb2.Accepted(
            cache_hit=False, tokens_kept=image_tokens, tokens_total=image_tokens))
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True,
                                        skip_special_tokens=True, timeout=600)
        max_new = request.params.max_new_tokens or 64
        done = threading.Event()

        def work() -> None:
            try:
                with torch.inference_mode():
                    self.model.generate(**inputs, max_new_tokens=max_new, do_sample=False,
                                        streamer=streamer,
                                        pad_token_id=self.tokenizer.pad_token_id)
            finally:
                done.set()

        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self.executor, work)
        first_ms, pieces = 0.0, 0
        iterator = iter(streamer)
        while True:
            text = await loop.run_in_executor(None, next, iterator, None)
            if text is None:
                break
            if not first_ms:
                first_ms = (time.perf_counter() - arrival) * 1e3
            pieces += 1
            yield vision_pb2.GenerateEvent(delta=common_pb2.TextDelta(text=text))
        await future
        yield vision_pb2.GenerateEvent(usage=vision_pb2.VisionUsage(
            ttft_ms=first_ms, language=common_pb2.Usage(
                visual_tokens=image_tokens, completion_tokens=pieces, ttft_ms=first_ms)))


async def start(spec: ModelSpec, host: str = "127.0.0.1", port: int = 0
                ) -> tuple[grpc.aio.Server, int]:
    server = grpc.aio.server()
    service = await asyncio.to_thread(StockVisionService, spec)
    vision_pb2_grpc.add_VisionServiceServicer_to_server(service, server)
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    return server, bound


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()

    async def serve() -> None:
        server, port = await start(resolve_spec(args.model, args.models_dir, args.device),
                                   port=args.port)
        print(f"stock baseline serving VisionService on 127.0.0.1:{port}", flush=True)
        await server.wait_for_termination()

    asyncio.run(serve())


if __name__ == "__main__":
    main()
