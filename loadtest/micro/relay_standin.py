"""A language service whose engine costs nothing: the relay's ceiling.

    python -m loadtest.micro.relay_standin   (HERO_LANGUAGE_* settings, as the service)

It is the language service (`services.language.server`, the tiny model's checks and
info), but its engine answers every request with `max_new_tokens` one-token deltas as
fast as they are taken, so what limits tokens/s through the whole system is the relay:
language service -> vision pipeline -> Serve proxy -> client.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator

from hero_core.models import resolve_spec
from services.language.app import build_engine
from services.language.config import LanguageConfig
from services.language.decoding import Delta
from services.language.engine import Engine, EngineRequest, EngineStats, Finished
from services.language.model import LanguageModel
from services.language.server import start_server


class FloodEngine:
    """The real engine's checks and info; deltas without a model step."""

    def __init__(self, engine: Engine):
        self.inner, self.info, self.observer = engine, engine.info, None

    def check(self, request: EngineRequest, max_prompt_tokens: int) -> EngineRequest:
        return self.inner.check(request, max_prompt_tokens)

    async def stream(self, request: EngineRequest, deadline: float | None = None
                     ) -> AsyncIterator[Delta | Finished]:
        start = time.perf_counter()
        n = request.params.max_new_tokens
        for i in range(n):
            yield Delta(" x", [100 + i % 50])
            await asyncio.sleep(0)  # another stream's turn, as an engine step would give
        took = max(time.perf_counter() - start, 1e-9)
        yield Finished(prompt_tokens=request.packed.num_embeddings, visual_tokens=
                       request.packed.num_embeddings, completion_tokens=n, prefill_ms=0.0,
                       first_token_at=start, decode_tokens_per_s=n / took,
                       finish_reason="length")

    def stats(self) -> EngineStats:
        return EngineStats(0, 0, 64)

    def warmup(self) -> None:
        pass

    def shutdown(self) -> None:
        self.inner.shutdown()


async def serve(config: LanguageConfig) -> None:
    def load() -> Engine:
        spec = resolve_spec(config.model, config.models_dir, config.device, config.dtype)
        return FloodEngine(build_engine(config, LanguageModel(spec)))

    running = await start_server(config, load)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    await running.stop(1.0)


if __name__ == "__main__":
    asyncio.run(serve(LanguageConfig.load()))
