"""docs/FIDELITY.md and its plot, written from one run's measurements.

Every number and every comparison sentence comes from the run; a sentence only says
"ahead" or "behind" when the per-seed paired difference is beyond noise (`verdict`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from evals.fidelity.conclusions import conclusions
from evals.fidelity.evaluation import KINDS, Result, paired, verdict
from evals.fidelity.report_relevance import relevance_sections
from evals.fidelity.report_text import static_sections
from evals.fidelity.suite import BASELINES, SWEEP_MODES


@dataclasses.dataclass
class Findings:
    """Everything the report shows."""

    config: Any
    """The run's `RunConfig`."""
    facts: dict[str, Any]
    tables: dict[str, Any]
    losses: dict[int, float]
    timings: dict[str, float]
    machine: str
    tower: str
    layers: Any
    """The run's `TowerLayers`."""
    command: str

    @classmethod
    def collect(cls, *, config: Any, data: Any, tables: dict[str, Any], losses: dict[int, float],
                timings: dict[str, float], machine: str, tower: str, layers: Any,
                command: str) -> Findings:
        facts = {
            "mosaics": {n: len(s.mosaics) for n, s in data.splits.items()},
            "questions": {n: sum(len(m.questions) for m in s.mosaics)
                          for n, s in data.splits.items()},
            "crops": int(data.table.features.shape[0]),
            "new_crops": data.new_crops,
            "explained": data.projection.explained,
            "feature_dim": int(data.table.features.shape[-1]),
            "tokens_per_crop": int(data.table.features.shape[1]),
        }
        return cls(config, facts, tables, losses, timings, machine, tower, layers, command)

    def result(self, table: str, label: str, ratio: float) -> Result | None:
        rows: list[Result] = self.tables[table]
        return next((r for r in rows if r.label == label and abs(r.ratio - ratio) < 1e-9), None)


def cell(result: Result | None, kind: str = "all") -> str:
    """`83.5 ± 0.4` (percent, mean ± std over seeds)."""
    if result is None:
        return "—"
    return f"{100 * result.mean(kind):.1f} ± {100 * result.std(kind):.1f}"


def table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def tokens_header(f: Findings, ratios: Sequence[float]) -> list[str]:
    full = f.facts["tokens_per_crop"] * 5
    return [f"R={r:g} ({round(r * full + 1e-9) if r < 1 else full})" for r in ratios]


def main_table(f: Findings) -> str:
    ratios = f.config.ratios
    rows = []
    for label in ("hero", "full", *BASELINES):
        rows.append([f"**{label}**" if label == "hero" else label,
                     *(cell(f.result("main", label, 1.0 if label == "full" and r < 1 else r))
                       if label != "full" or r == 1.0 else "(ratio ignored)" for r in ratios)])
    for ref in f.tables["references"]:
        rows.append([f"*{ref.label}* (reference)", cell(ref), "", "", ""][:len(ratios) + 1])
    rows.append(["*question only* (no image)", f"{100 * f.tables['prior']:.1f}",
                 *([""] * (len(ratios) - 1))])
    return table(["method", *tokens_header(f, ratios)], rows)


def shift_table(f: Findings) -> str:
    """The methods read by a model trained on all tokens only, beside the main reader."""
    pruned = [r for r in f.config.ratios if r < 1.0]
    rows = []
    for label in ("hero", *BASELINES):
        cells = []
        for r in pruned:
            only, main = f.result("all_tokens_only", label, r), f.result("main", label, r)
            cells.append("—" if only is None or main is None else
                         f"{100 * only.mean():.1f} (main reader {100 * main.mean():.1f})")
        rows.append([label, *cells])
    full = f.result("all_tokens_only", "full", 1.0)
    rows.append(["full (R=1)", f"{100 * full.mean():.1f}" if full else "—",
                 *([""] * (len(pruned) - 1))])
    return table(["method", *tokens_header(f, pruned)], rows)


def difference_table(f: Findings) -> str:
    pruned = [r for r in f.config.ratios if r < 1.0]
    rows = []
    for label in BASELINES:
        cells = []
        for r in pruned:
            hero, base = f.result("main", "hero", r), f.result("main", label, r)
            if hero is None or base is None:
                cells.append("—")
                continue
            mean, std = paired(hero, base)
            cells.append(f"{mean:+.1f} ± {std:.1f} ({verdict(hero, base)})")
        rows.append([label, *cells])
    return table(["HERO minus", *tokens_header(f, pruned)], rows)


def kind_table(f: Findings, ratio: float) -> str:
    rows = [[label, *(cell(f.result("main", label, 1.0 if label == "full" else ratio), k)
                      for k in ("all", *KINDS))] for label in ("full", "hero", *BASELINES)]
    return table(["method", "all", *KINDS], rows)


def stats_table(f: Findings, ratio: float) -> str:
    rows = []
    for label in ("hero", *BASELINES):
        result = f.result("main", label, ratio)
        if result is None:
            continue
        s = result.stats
        rows.append([label, f"{s['tokens']:.0f}", f"{100 * s['tile_object_recall']:.0f} %",
                     f"{100 * s['thumb_object_recall']:.0f} %",
                     f"{s['tokens_per_shape_tile']:.1f}", f"{s['fewest_on_shape_tile']:.1f}",
                     f"{s['tokens_per_blank_tile']:.1f}"])
    return table(["method", "tokens kept", "shape patches kept (tiles)",
                  "shape patches kept (thumbnail)", "tokens per tile with a shape",
                  "fewest on a tile with a shape", "tokens per blank tile"], rows)


def ablation_table(f: Findings) -> str:
    pruned = [r for r in f.config.ratios if r < 1.0]
    base_label = f.tables["ablations"][0].label
    rows = []
    for label in dict.fromkeys(r.label for r in f.tables["ablations"]):
        cells = []
        for r in pruned:
            result, base = f.result("ablations", label, r), f.result("ablations", base_label, r)
            if result is None or base is None:
                cells.append("—")
                continue
            extra = "" if label == base_label else f" ({paired(result, base)[0]:+.1f})"
            cells.append(cell(result) + extra)
        same = [f.result("ablations", label, r) for r in pruned]
        bases = [f.result("ablations", base_label, r) for r in pruned]
        shares = [x.same_selection(b) for x, b in zip(same, bases, strict=True) if x and b]
        identical = f"{100 * sum(shares) / max(len(shares), 1):.0f} %"
        rows.append([label, *cells, "—" if label == base_label else identical])
    for suffix in SWEEP_MODES:
        for result in f.tables.get(f"val_best{suffix}", [])[:1]:
            rows.append([result.label, *(cell(f.result(f"val_best{suffix}", result.label, r))
                                         for r in pruned), ""])
    return table(["HERO variant", *tokens_header(f, pruned), "same tokens as HERO"], rows)


def sweep_table(f: Findings) -> str:
    """Validation accuracy per layer, for each sweep and budget mode."""
    columns, header = [], ["layer"]
    for suffix, (label, _) in SWEEP_MODES.items():
        for kind, fixed in (("object", f"L_art={f.layers.late_layer}"),
                            ("artifact", f"L_obj={f.layers.object_layer}")):
            results = f.tables.get(f"sweep_{kind}{suffix}", [])
            columns.append({r.label.split("=")[1]: r for r in results})
            name = "L_obj" if kind == "object" else "L_art"
            header.append(f"as {name} ({fixed}), {label}")
    layers = sorted({k for c in columns for k in c}, key=int)
    return table(header, [[layer, *(cell(c.get(layer)) for c in columns)] for layer in layers])


def depth_table(f: Findings) -> str:
    rows = [[f"{int(d['layer'])}", f"{100 * d['tile_object_share']:.0f} %",
             f"{100 * d['thumb_object_share']:.0f} %", f"{d['thumb_artifacts']:.1f}",
             f"{100 * d['thumb_artifacts_on_shapes']:.0f} %", f"{d['tile_artifacts']:.1f}",
             f"{100 * d['top1_share']:.1f} %"]
            for d in f.tables["depth"]]
    area = 100 * f.tables["depth"][0]["tile_object_area"]
    return table(["layer", f"CLS attention on shape patches, tiles (area {area:.0f} %)",
                  "same, thumbnail", "artifact tokens per thumbnail", "of them on a shape",
                  "artifact tokens per tile", "top-1 token share"], rows)


def write_plot(f: Findings, path: Path) -> None:
    """Accuracy against retention, one line per method, error bars = std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pruned = [r for r in f.config.ratios if r < 1.0]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in ("hero", *BASELINES):
        results = [f.result("main", label, r) for r in pruned]
        points = [(r, x) for r, x in zip(pruned, results, strict=True) if x is not None]
        ax.errorbar([100 * r for r, _ in points], [100 * x.mean() for _, x in points],
                    yerr=[100 * x.std() for _, x in points], marker="o", capsize=3,
                    label=label, linewidth=2.5 if label == "hero" else 1.2)
    full = f.result("main", "full", 1.0)
    if full is not None:
        ax.axhline(100 * full.mean(), color="black", linestyle="--", label="full (all tokens)")
    ax.axhline(100 * f.tables["prior"], color="gray", linestyle=":", label="question only")
    ax.set_xscale("log")
    ax.minorticks_off()
    ax.set_xticks([100 * r for r in pruned], [f"{100 * r:.1f} %" for r in pruned])
    ax.set_xlabel("retention (share of the 1280 visual tokens kept)")
    ax.set_ylabel("answer accuracy (%)")
    ax.set_title("Mosaic VQA on DINOv2 ViT-S/14 features, mean ± std over seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(f: Findings, out: Path, plot: Path) -> None:
    """Write the markdown report and the plot."""
    write_plot(f, plot)
    probe = f.config.ratios[2] if len(f.config.ratios) > 2 else f.config.ratios[-1]
    parts = static_sections(f, plot.name if plot.parent == out.parent else str(plot))
    parts["main"] = main_table(f)
    parts["differences"] = difference_table(f)
    parts["shift"] = shift_table(f)
    parts["kinds"] = kind_table(f, probe)
    parts["stats"] = stats_table(f, probe)
    parts["ablations"] = ablation_table(f)
    parts["sweep"] = sweep_table(f)
    parts["depth"] = depth_table(f)
    parts.update(relevance_sections(f, table, cell))
    parts["conclusions"] = conclusions(f, probe)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(parts["template"].format(**parts))
