"""lmms-eval model `hero_llava_next`: LLaVA-NeXT answering through our pruning.

lmms-eval (0.7.x) hands a simple model lists of `Instance`s whose `args` are

* generate_until: `(context, gen_kwargs, doc_to_visual, doc_id, task, split)`
* loglikelihood: `(context, doc_to_target, doc_to_visual, doc_id, task, split)`
* generate_until_multi_round: `(context, gen_kwargs, doc_to_visual, doc_to_text, doc_id,
  task, split)`

and the document itself is `task_dict[task][split][doc_id]`. The `run_*` functions
below answer such lists with an `Answerer`; they need no lmms-eval import, so they
are tested on the tiny model. `HeroLlavaNext`, the `lmms` subclass lmms-eval loads,
is built on first access (it imports lmms-eval and its dependencies) and only
delegates to them.

lmms-eval finds models through its registry (`lmms_eval.models.MODEL_REGISTRY_V2`),
filled from its built-in table and the `lmms_eval.models` entry-point group.
`python -m evals.lmms.lmms ARGS` registers this model and then runs lmms-eval's
own command line with ARGS; `model_manifest` is the entry-point payload. Model args:
the fields of `AnswererConfig` with `pretrained` for `model`, e.g.
`--model hero_llava_next --model_args pretrained=llava-hf/llava-v1.6-vicuna-7b-hf,
method=hero,retention=0.111,device=cuda,dtype=float16`.
"""

from __future__ import annotations

import itertools
import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from evals.lmms.answerer import (
    Answerer,
    AnswererConfig,
    load_answerer,
    settings_from_gen_kwargs,
    single_image,
)
from hero_core.errors import ConfigError

MODEL_ID = "hero_llava_next"
CLASS_NAME = "HeroLlavaNext"
CLASS_PATH = f"evals.lmms.lmms.{CLASS_NAME}"
"""Where lmms-eval imports the class from (not `__name__`, which is `__main__` under -m)."""
LOG_EVERY = 100
"""Requests between progress lines."""

log = logging.getLogger(__name__)
TaskDict = Mapping[str, Mapping[str, Sequence[Any]]]
"""lmms-eval's `task_dict`: task -> split -> documents."""


def config_from_model_args(pretrained: str = AnswererConfig.model,
                           **kwargs: Any) -> AnswererConfig:
    """`AnswererConfig` from lmms-eval model args (`pretrained=...,method=...`).

    lmms-eval also passes `batch_size` and `max_batch_size`: requests are answered one
    at a time whatever they say. Unknown args are refused by name.
    """
    for ignored in ("batch_size", "max_batch_size"):
        kwargs.pop(ignored, None)
    known = set(AnswererConfig.__dataclass_fields__) - {"model"}
    unknown = sorted(set(kwargs) - known)
    if unknown:
        raise ConfigError(f"unknown model args {', '.join(unknown)}; known: pretrained, "
                          f"{', '.join(sorted(known))}")
    if "retention" in kwargs:
        kwargs["retention"] = float(kwargs["retention"])
    return AnswererConfig(model=str(pretrained), **kwargs)


def _document(task_dict: TaskDict, task: str, split: str, doc_id: int) -> Any:
    return task_dict[task][split][doc_id]


def _progress(done: int, total: int, kind: str) -> None:
    if done % LOG_EVERY == 0 or done == total:
        log.info("%s: %d/%d requests answered", kind, done, total)


def run_generate_until(answerer: Answerer, requests: Sequence[Any],
                       task_dict: TaskDict) -> list[str]:
    """One greedy answer per `generate_until` request, in request order."""
    answers = []
    for request in requests:
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        image = single_image(doc_to_visual(_document(task_dict, task, split, doc_id)))
        answers.append(answerer.generate(image, context, settings_from_gen_kwargs(gen_kwargs)))
        _progress(len(answers), len(requests), "generate_until")
    return answers


def run_loglikelihood(answerer: Answerer, requests: Sequence[Any],
                      task_dict: TaskDict) -> list[tuple[float, bool]]:
    """Per request: mean negative log-likelihood per continuation token and whether the
    continuation is the greedy one. lmms-eval's own LLaVA models return this mean loss
    (not a summed log-probability), and its multiple-choice scoring takes the argmin."""
    results = []
    for request in requests:
        context, target, doc_to_visual, doc_id, task, split = request.args
        doc = _document(task_dict, task, split, doc_id)
        continuation = target if isinstance(target, str) else target(doc)
        image = single_image(doc_to_visual(doc))
        ids = answerer.continuation_ids(context, str(continuation))
        results.append(answerer.continuation_loss(image, context, ids))
        _progress(len(results), len(requests), "loglikelihood")
    return results


def run_multi_round(answerer: Answerer, requests: Sequence[Any],
                    task_dict: TaskDict) -> list[list[str]]:
    """Per request, one answer per round. After round 0 the task's `doc_to_text(doc,
    previous_output=..., round_idx=..., previous_round_info=...)` returns the next
    `(visuals, context, terminal, outputs, round_info)`; each round is a fresh
    single-image prompt, as in lmms-eval's LLaVA-OneVision model."""
    results = []
    for request in requests:
        context, gen_kwargs, doc_to_visual, doc_to_text, doc_id, task, split = request.args
        doc = _document(task_dict, task, split, doc_id)
        settings = settings_from_gen_kwargs(gen_kwargs)
        visuals, info = doc_to_visual(doc), None
        outputs: list[str] = []
        for round_idx in itertools.count():
            if round_idx > 0:
                visuals, context, terminal, previous, info = doc_to_text(
                    doc, previous_output=outputs, round_idx=round_idx,
                    previous_round_info=info)
                outputs = list(previous)
                if terminal:
                    break
            outputs.append(answerer.generate(single_image(visuals), context, settings))
        results.append(outputs)
        _progress(len(results), len(requests), "generate_until_multi_round")
    return results


def model_manifest() -> Any:
    """The lmms-eval registry entry of this model (an entry-point payload)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id=MODEL_ID, simple_class_path=CLASS_PATH)


def register() -> None:
    """Add `hero_llava_next` to lmms-eval's model registry in this process."""
    from lmms_eval.models import MODEL_REGISTRY_V2

    MODEL_REGISTRY_V2.register_manifest(model_manifest(), overwrite=True)


def _build_model_class() -> type:
    """The `lmms` subclass lmms-eval instantiates; needs lmms-eval's dependencies."""
    from lmms_eval.api.model import lmms

    class HeroLlavaNext(lmms):  # type: ignore[misc]
        """LLaVA-NeXT through HERO Serve's pruning; model args: see `config_from_model_args`."""

        is_simple = True

        def __init__(self, **model_args: Any) -> None:
            super().__init__()
            if int(os.environ.get("WORLD_SIZE", "1")) > 1:
                raise ConfigError(f"{MODEL_ID} runs in one process; start one run per GPU "
                                  "(CUDA_VISIBLE_DEVICES) instead of accelerate/torchrun")
            self.answerer = load_answerer(config_from_model_args(**model_args))
            self._device = self.answerer.vlm.spec.device

        @property
        def device(self) -> str:
            return self._device

        def generate_until(self, requests: Sequence[Any]) -> list[str]:
            return run_generate_until(self.answerer, requests, self.task_dict)

        def loglikelihood(self, requests: Sequence[Any]) -> list[tuple[float, bool]]:
            return run_loglikelihood(self.answerer, requests, self.task_dict)

        def generate_until_multi_round(self, requests: Sequence[Any]) -> list[list[str]]:
            return run_multi_round(self.answerer, requests, self.task_dict)

    HeroLlavaNext.__module__ = __name__
    HeroLlavaNext.__qualname__ = CLASS_NAME
    return HeroLlavaNext


_LAZY: dict[str, Callable[[], type]] = {CLASS_NAME: _build_model_class}


def __getattr__(name: str) -> Any:
    # Built on first access so that importing this module never needs lmms-eval.
    if name in _LAZY:
        value = _LAZY[name]()
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m lmms_eval ARGS` with `hero_llava_next` registered (one process)."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    register()
    from lmms_eval.__main__ import cli_evaluate

    sys.argv = [sys.argv[0], *(sys.argv[1:] if argv is None else argv)]
    cli_evaluate()


if __name__ == "__main__":
    main()
