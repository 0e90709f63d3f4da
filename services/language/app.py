"""The language service assembled: the engine its config names, around the model it
loads, inside the gRPC server.

    python -m services.language [--config language.yaml]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from hero_core.models import resolve_spec
from services.language.batching import BatchingEngine
from services.language.config import LanguageConfig
from services.language.engine import Engine
from services.language.model import LanguageModel
from services.language.sequential import SequentialEngine
from services.language.server import start_server
from services.language.vllm_engine import VllmEngine

log = logging.getLogger("hero.language")


def load_engine(config: LanguageConfig) -> Engine:
    """Load the checkpoint `config` names and wrap it in the engine `config.engine` names."""
    spec = resolve_spec(config.model, config.models_dir, config.device, config.dtype)
    if config.engine == "vllm":
        return VllmEngine.load(spec, config.vllm)
    return build_engine(config, LanguageModel(spec))


def build_engine(config: LanguageConfig, model: LanguageModel) -> Engine:
    """The transformers engine `config.engine` names, around a loaded model."""
    if config.engine == "sequential":
        return SequentialEngine(model, config.max_concurrency)
    if config.engine != "batched":
        raise ValueError(f"engine {config.engine!r} does not run on a transformers model")
    return BatchingEngine(model, config.batching)


async def serve(config: LanguageConfig) -> None:
    """Run until SIGTERM or SIGINT, then drain for up to `shutdown_grace_s`; a second signal
    ends the drain at once (the calls still running get UNAVAILABLE)."""
    running = await start_server(config, lambda: load_engine(config))
    print(f"language service ready on {config.host}:{running.port}", flush=True)
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    await stopping.wait()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, running.servicer.drain.expire,
                                "the language service was told to stop at once; retry")
    log.info("draining for up to %.0f s", config.shutdown_grace_s)
    await running.stop(config.shutdown_grace_s)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="HERO Serve language service")
    parser.add_argument("--config", type=Path, help="YAML file (env HERO_LANGUAGE_* overrides)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s "
                        "%(message)s")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = LanguageConfig.load(args.config)
    asyncio.run(serve(config))
