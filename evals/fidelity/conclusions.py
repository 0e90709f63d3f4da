"""The conclusions of docs/FIDELITY.md, each claim computed from the run's tables.

A comparison says "ahead" or "behind" only when the per-seed paired difference is
beyond noise (`evaluation.verdict`); a default change is advised only when a variant
is ahead at every pruned ratio.
"""

from __future__ import annotations

from typing import Any

from evals.fidelity.evaluation import KINDS, Result, paired, verdict
from evals.fidelity.report_relevance import relevance_conclusions
from evals.fidelity.suite import BASELINES, SWEEP_MODES, UNIFORM_LABEL

PHRASE = {"ahead": "ahead of", "level": "level with", "behind": "behind"}


def pct(result: Result | None) -> str:
    return "—" if result is None else f"{100 * result.mean():.1f} %"


def tiles_sentence(f: Any) -> str:
    """Whether the task needs the tiles: thumbnail only against all tokens."""
    full, thumb = f.result("main", "full", 1.0), f.result("references", "thumbnail only", 1.0)
    tiles = f.result("references", "tiles only", 1.0)
    if full is None or thumb is None:
        return ""
    gap = 100 * (full.mean() - thumb.mean())
    verdict = ("**The task needs the tiles.**" if gap > 3 else
               "**The thumbnail alone carries most of the answer**, so this run says little "
               "about tiles.")
    return (f"* {verdict} All 1280 tokens: {pct(full)}; the thumbnail's 256 alone: "
            f"{pct(thumb)} ({-gap:+.1f} points); the tiles alone: {pct(tiles)}; the question "
            f"alone: {100 * f.tables['prior']:.1f} %.")


def ranking_sentences(f: Any) -> list[str]:
    """Per ratio: the order of the methods and HERO's standing against each baseline."""
    out = []
    for r in (x for x in f.config.ratios if x < 1.0):
        results = [x for x in (f.result("main", n, r) for n in ("hero", *BASELINES)) if x]
        order = ", ".join(f"{x.label} {100 * x.mean():.1f}"
                          for x in sorted(results, key=lambda x: -x.mean()))
        hero = f.result("main", "hero", r)
        if hero is None:
            continue
        groups: dict[str, list[str]] = {"ahead": [], "level": [], "behind": []}
        for x in results:
            if x.label != "hero":
                groups[verdict(hero, x)].append(x.label)
        standing = "; ".join(f"{PHRASE[k]} {', '.join(v)}" for k, v in groups.items() if v)
        out.append(f"* **R={r:g}**: {order}. HERO is {standing}.")
    return out


def coverage_sentence(f: Any, ratio: float) -> str:
    """What HERO keeps against random (spread) and FasterVLM (concentrated, equal per
    crop), and what equal tile budgets change."""
    hero, rand = f.result("main", "hero", ratio), f.result("main", "random", ratio)
    flat, even = f.result("main", "fastervlm", ratio), f.result("ablations", UNIFORM_LABEL, ratio)
    if hero is None or rand is None or flat is None or even is None:
        return ""
    hs = hero.stats
    concentration = {"ahead": "pays", "level": "pays no more than spreading the budget",
                     "behind": "pays less than spreading the budget"}[verdict(flat, rand)]
    text = (f"* **Concentration against coverage** (R={ratio:g}): HERO keeps "
            f"{100 * hs['tile_object_recall']:.0f} % of the tiles' shape patches and gives a "
            f"blank tile {hs['tokens_per_blank_tile']:.1f} tokens against "
            f"{hs['tokens_per_shape_tile']:.1f} for a tile with a shape; random keeps "
            f"{100 * rand.stats['tile_object_recall']:.0f} % of them ({pct(rand)}); FasterVLM, "
            f"as concentrated ({100 * flat.stats['tile_object_recall']:.0f} %) with equal "
            f"budgets per crop, scores {pct(flat)}: keeping the shapes' own tokens "
            f"{concentration}")
    if verdict(flat, rand) != "ahead":
        text += (" (penultimate-layer tokens are contextual: a background token has attended "
                 "to its whole crop and carries much of its shape's colour and kind)")
    if verdict(even, hero) == "ahead":
        text += (f". HERO with equal tile budgets scores {pct(even)}: what it loses is the "
                 "saliency split of the budget across tiles, not the tokens it ranks first "
                 "inside a tile")
    return text + "."


def kind_sentence(f: Any, ratio: float) -> str:
    """Which question kind HERO loses most on against FasterVLM."""
    hero, flat = f.result("main", "hero", ratio), f.result("main", "fastervlm", ratio)
    if hero is None or flat is None:
        return ""
    gaps = {k: 100 * (hero.mean(k) - flat.mean(k)) for k in KINDS}
    worst = min(gaps, key=lambda k: gaps[k])
    return (f"* **Where HERO loses** (R={ratio:g}, against FasterVLM): "
            + ", ".join(f"{k} {v:+.1f}" for k, v in gaps.items())
            + f" points; most on `{worst}` questions.")


def ablation_sentences(f: Any) -> list[str]:
    """Each HERO variant against HERO, ratio by ratio; a default change is recommended
    only when a variant is ahead at every pruned ratio."""
    pruned = [r for r in f.config.ratios if r < 1.0]
    base_label = f.tables["ablations"][0].label
    out = []
    for label in dict.fromkeys(r.label for r in f.tables["ablations"]
                               if r.label != base_label):
        pairs = [(f.result("ablations", label, r), f.result("ablations", base_label, r))
                 for r in pruned]
        found = [(v, b) for v, b in pairs if v is not None and b is not None]
        if not found:
            continue
        verdicts = [verdict(v, b) for v, b in found]
        mean = sum(paired(v, b)[0] for v, b in found) / len(found)
        same = sum(v.same_selection(b) for v, b in found) / len(found)
        advice = ("**beats the reconstruction at every ratio: worth making the default "
                  "when HERO runs on saliency alone on this kind of tower**"
                  if all(v == "ahead" for v in verdicts) else
                  f"it keeps exactly HERO's tokens on {100 * same:.0f} % of the mosaics, so "
                  "the choice makes no difference here" if same >= 0.95 else
                  "no case for changing the default" if "ahead" not in verdicts else
                  "ahead at some ratios only: not enough to change the default")
        out.append(f"* {label}: {mean:+.1f} points on average "
                   f"({', '.join(f'{r:g}: {v}' for r, v in zip(pruned, verdicts, strict=True))})"
                   f"; {advice}.")
    return out


def sweep_sentence(f: Any, suffix: str, label: str) -> str:
    """How much the validation accuracy moves across layers in one budget mode."""
    def spread(results: list[Result]) -> str:
        values = [100 * r.mean() for r in results]
        late = values[-3:]
        return (f"{min(values):.1f} to {max(values):.1f} % (the last three layers "
                f"{sum(late) / len(late):.1f} % on average, the others "
                f"{sum(values[:-3]) / max(len(values) - 3, 1):.1f} %)")

    return (f"* **Layer sweep, {label}** (validation, R={f.config.sweep_ratio:g}): as L_obj "
            f"{spread(f.tables[f'sweep_object{suffix}'])}; as L_art "
            f"{spread(f.tables[f'sweep_artifact{suffix}'])}.")


def val_best_sentence(f: Any, suffix: str, label: str) -> str:
    """The val-best layers of one budget mode scored on test against its mapped layers."""
    best = f.tables.get(f"val_best{suffix}", [])
    if not best:
        return ""
    pairs = [(r.ratio, verdict(r, base)) for r in best
             if (base := f.result("ablations", label, r.ratio)) is not None]
    outcome = ("the mapped layers hold" if all(v != "ahead" for _, v in pairs) else
               "**the val-best layers are better on test too**" if all(
                   v == "ahead" for _, v in pairs) else "mixed")
    return (f"* **Layers, {label}**: validation picks {best[0].label.split(', val-best ')[1]} "
            f"(mapped: L_obj={f.layers.object_layer}, L_art={f.layers.late_layer}); on test "
            f"against the mapped layers: {', '.join(f'{r:g}: {v}' for r, v in pairs)}; "
            f"{outcome}.")


def layer_sentences(f: Any) -> list[str]:
    """Sweeps and val-best layers per budget mode, and the depth profile of CLS attention."""
    out = []
    for suffix, (label, _) in SWEEP_MODES.items():
        if f.tables.get(f"sweep_object{suffix}"):
            out += [sweep_sentence(f, suffix, label), val_best_sentence(f, suffix, label)]
    depth = f.tables["depth"]
    peak = max(depth, key=lambda d: d["tile_object_share"])
    late = depth[f.layers.late_layer]
    on_shapes = late["thumb_artifacts_on_shapes"]
    reading = (" So this tower shows no collapse onto background artifact tokens at L_art: "
               "what HERO's thumbnail policy takes for artifacts are object tokens that its "
               "stage-1 ranking keeps anyway." if on_shapes >= 0.8 else "")
    out.append(
        f"* **CLS attention by depth**: on tiles with a shape it is most on the shape at "
        f"layer {int(peak['layer'])} ({100 * peak['tile_object_share']:.0f} % of it on "
        f"{100 * peak['tile_object_area']:.0f} % of the area) and still "
        f"{100 * late['tile_object_share']:.0f} % at L_art={f.layers.late_layer}; a thumbnail "
        f"has {late['thumb_artifacts']:.1f} tokens passing HERO's artifact test at L_art, "
        f"{100 * on_shapes:.0f} % of them on a shape.{reading}")
    return out


def best_variant_sentence(f: Any) -> str:
    """The best HERO variant against the best baseline at each pruned ratio."""
    pruned = [r for r in f.config.ratios if r < 1.0]
    labels = dict.fromkeys(r.label for r in f.tables["ablations"])
    scores = {label: sum(x.mean() for x in f.tables["ablations"] if x.label == label)
              for label in labels}
    best = max(scores, key=lambda label: scores[label])
    parts = []
    for r in pruned:
        variant = f.result("ablations", best, r)
        baselines = [x for x in (f.result("main", n, r) for n in BASELINES) if x]
        if variant is None or not baselines:
            continue
        top = max(baselines, key=lambda x: x.mean())
        mean, std = paired(variant, top)
        parts.append(f"R={r:g}: {PHRASE[verdict(variant, top)]} {top.label} "
                     f"({mean:+.1f} ± {std:.1f})")
    return (f"* **Best HERO variant**: {best}; against the best baseline at each ratio: "
            f"{'; '.join(parts)}.")


def reader_sentence(f: Any, ratio: float) -> str:
    """How the order of the methods changes with a reader trained on all tokens only."""
    def order(table: str) -> str:
        found = [x for x in (f.result(table, n, ratio) for n in ("hero", *BASELINES)) if x]
        return ", ".join(f"{x.label} {100 * x.mean():.1f}"
                         for x in sorted(found, key=lambda x: -x.mean()))

    if not f.tables.get("all_tokens_only"):
        return ""
    return (f"* **The reader matters** (R={ratio:g}): trained on all tokens only (one seed), "
            f"{order('all_tokens_only')}; trained on all tokens and subsets (the main "
            f"reader), {order('main')}.")


def conclusions(f: Any, probe: float) -> str:
    """The conclusions section, every claim computed from the tables."""
    lines = [tiles_sentence(f), *ranking_sentences(f), coverage_sentence(f, probe),
             kind_sentence(f, probe), reader_sentence(f, probe),
             *layer_sentences(f), "* **HERO ablations** (against HERO as reconstructed):",
             *("  " + s for s in ablation_sentences(f)), best_variant_sentence(f),
             "* **Question relevance** (DINOv2 with a question encoder, below):",
             *("  " + s for s in relevance_conclusions(f, probe))]
    return "\n".join(line for line in lines if line)
