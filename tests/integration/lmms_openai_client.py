"""lmms-eval 0.7.3's OpenAI-compatible model (`--model openai`) answering two documents
through a running endpoint; prints one JSON line of its results.

    python tests/integration/lmms_openai_client.py BASE_URL API_KEY MODEL

Its request building and client calls are lmms-eval's own code, run unchanged
(`lmms_eval.models.chat.openai.OpenAICompatible.generate_until`). lmms-eval is installed
without its dependencies, so the libraries it imports only for logging, `.env` files,
distributed runs, metrics and time zones (loguru, python-dotenv, accelerate, evaluate,
pytz) are stood in for by empty modules in this process alone.
"""

from __future__ import annotations

import json
import sys
import types
from typing import Any

import transformers  # noqa: F401  (imported before the stand-ins: it probes accelerate)
from PIL import Image


class _Logger:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


class _Accelerator:
    num_processes, local_process_index, device = 1, 0, "cpu"


def stand_ins() -> None:
    modules: dict[str, dict[str, Any]] = {
        "loguru": {"logger": _Logger()},
        "dotenv": {"load_dotenv": lambda *args, **kwargs: None},
        "accelerate": {"Accelerator": _Accelerator,
                       "DistributedType": types.SimpleNamespace(FSDP=1, MULTI_GPU=2,
                                                                DEEPSPEED=3)},
        "evaluate": {}, "pytz": {}}
    for name, attributes in modules.items():
        module = types.ModuleType(name)
        module.__dict__.update(attributes)
        sys.modules[name] = module


def main(base_url: str, api_key: str, model: str) -> None:
    stand_ins()
    from lmms_eval.api.instance import Instance
    from lmms_eval.models.chat.openai import OpenAICompatible

    lmm = OpenAICompatible(model=model, base_url=base_url, api_key=api_key, max_retries=1,
                           retry_backoff_s=0, num_concurrent=2)
    images = [Image.effect_noise((300 + 40 * i, 200), 60 + i).convert("RGB") for i in range(2)]
    lmm.task_dict = {"demo": {"test": [{"image": im, "question": f"What is shown? ({i})"}
                                       for i, im in enumerate(images)]}}

    def doc_to_messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
        return [{"role": "user", "content": [{"type": "image", "url": doc["image"]},
                                              {"type": "text", "text": doc["question"]}]}]

    gen_kwargs = {"max_new_tokens": 6, "temperature": 0, "until": ["\n\n"]}
    requests = [Instance("generate_until", ("", doc_to_messages, gen_kwargs, i, "demo", "test"),
                         idx=0, metadata={"task": "demo", "doc_id": i, "repeats": 1})
                for i in range(2)]
    results = lmm.generate_until(requests)
    print(json.dumps([{"text": r.text, "input_tokens": r.token_counts.input_tokens,
                       "output_tokens": r.token_counts.output_tokens} for r in results]))


if __name__ == "__main__":
    main(*sys.argv[1:4])
