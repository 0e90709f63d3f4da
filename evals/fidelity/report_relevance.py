"""The question-relevance section of docs/FIDELITY.md: tables and conclusions, each number
from the run (`run.relevance_suite`).

A default change is advised only when validation picks a relevance setting over the
tower's current default (equal tile budgets) and the test split agrees: the setting is
ahead of equal budgets, beyond noise, at every pruned ratio.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from evals.fidelity.data import NAMED_KINDS
from evals.fidelity.evaluation import KINDS, Result, paired, verdict
from evals.fidelity.suite import BASELINES, SALIENCY_LABEL, SPEC_LABEL, UNIFORM_LABEL

PHRASE = {"ahead": "ahead of", "level": "level with", "behind": "behind"}
CHANCE = {"named-color": 1 / 8, "named-exists": 1 / 2, "named-count": 1 / 2}
"""Accuracy of a blind guess among each named kind's answers (8 colours, yes/no, 0/1)."""


def named_mean(result: Result) -> float:
    """Mean accuracy over the named kinds (equal weight; they are asked equally often)."""
    return sum(result.mean(k) for k in NAMED_KINDS) / len(NAMED_KINDS)


def comparison_rows(f: Any, ratio: float) -> list[Result]:
    """HERO's relevance rows, HERO without relevance, equal budgets and the baselines."""
    rows = [r for r in f.tables["relevance_test"] if abs(r.ratio - ratio) < 1e-9]
    found = [f.result("main", "hero", ratio), f.result("ablations", UNIFORM_LABEL, ratio),
             *(f.result("main", b, ratio) for b in BASELINES)]
    return rows + [r for r in found if r is not None]


def row_name(result: Result) -> str:
    return {"hero": f"hero, {SALIENCY_LABEL}"}.get(result.label, result.label)


def comparison_table(f: Any, ratio: float, table: Any, cell: Any) -> str:
    """Accuracy per question kind at one ratio, with the named kinds' mean."""
    rows = [[row_name(r), cell(r), f"{100 * named_mean(r):.1f}",
             *(cell(r, k) for k in KINDS)] for r in comparison_rows(f, ratio)]
    return table(["method", "all", "named (mean)", *KINDS], rows)


def retrieval_table(f: Any, table: Any) -> str:
    fit = f.tables["relevance_fit"]
    return table(["split", "named questions", "right tile ranked first"],
                 [[name, str(fit.pairs[name]), f"{100 * fit.retrieval[name]:.1f} %"]
                  for name in ("train", "val", "test")])


def sweep_rows(f: Any, table: Any) -> str:
    rows = [[r.label, f"{100 * r.mean():.1f} ± {100 * r.std():.1f}",
             f"{100 * named_mean(r):.1f}"] for r in f.tables["relevance_val"]]
    return table(["HERO setting (validation)", "all", "named (mean)"], rows)


def tile_share(mine: float, other: float, tiles: int = 4) -> float:
    """The asked-about tile's share (%) of the tile budget."""
    return 100 * mine / max(mine + (tiles - 1) * other, 1e-9)


def share_cell(mine: float, other: float) -> str:
    """`35.2 vs 12.1 (49 %)`: tokens on the asked-about tile, on each other tile, share."""
    return f"{mine:.1f} vs {other:.1f} ({tile_share(mine, other):.0f} %)"


def budget_table(f: Any, table: Any, ratios: Sequence[float]) -> str:
    """Tokens on the asked-about tile against each other tile, named test questions."""
    rows = []
    for label in dict.fromkeys(r.label for r in f.tables["relevance_test"]):
        cells = []
        for ratio in ratios:
            r = f.result("relevance_test", label, ratio)
            cells.append("—" if r is None else share_cell(r.stats["target_tile_tokens"],
                                                         r.stats["other_tile_tokens"]))
        rows.append([label, *cells])
    for label, by_ratio in f.tables["blind_budgets"].items():
        rows.append([label, *(share_cell(*by_ratio[r]) for r in ratios)])
    return table(["HERO setting", *(f"R={r:g}" for r in ratios)], rows)


def relevance_sections(f: Any, table: Any, cell: Any) -> dict[str, str]:
    """The report's relevance placeholders."""
    pruned = [r for r in f.config.ratios if r < 1.0]
    comparisons = "\n\n".join(f"R={r:g}:\n\n{comparison_table(f, r, table, cell)}"
                              for r in pruned)
    return {"retrieval": retrieval_table(f, table), "relevance_sweep": sweep_rows(f, table),
            "relevance_tables": comparisons, "budget_share": budget_table(f, table, pruned),
            "relevance_default": default_sentence(f)}


def retrieval_sentence(f: Any) -> str:
    fit = f.tables["relevance_fit"]
    shipped = ("the same weights hero_core ships" if fit.shipped_difference == 0.0 else
               "not yet the weights hero_core ships" if fit.shipped_difference is None else
               f"weights that differ from hero_core's shipped ones by up to "
               f"{fit.shipped_difference:.2g}")
    return (f"* **The question encoder finds the asked-about tile**: all-MiniLM-L6-v2 and a "
            f"learned projection into DINOv2's embedding space rank the tile holding a named "
            f"shape first for {100 * fit.retrieval['test']:.1f} % of the {fit.pairs['test']} "
            f"named test questions (validation {100 * fit.retrieval['val']:.1f} %, training "
            f"{100 * fit.retrieval['train']:.1f} %; chance 25 %); this run learned {shipped}.")


def versus(a: Result | None, b: Result | None) -> str:
    if a is None or b is None:
        return "—"
    mean, std = paired(a, b)
    return f"{PHRASE[verdict(a, b)]} ({mean:+.1f} ± {std:.1f})"


def test_sentences(f: Any) -> list[str]:
    """Per ratio: the relevance rows against saliency only and equal budgets, overall and
    on the named questions."""
    out = []
    for ratio in (r for r in f.config.ratios if r < 1.0):
        saliency, even = f.result("main", "hero", ratio), f.result("ablations", UNIFORM_LABEL,
                                                                    ratio)
        for r in (x for x in f.tables["relevance_test"] if abs(x.ratio - ratio) < 1e-9):
            out.append(f"* R={ratio:g}, {r.label}: {100 * r.mean():.1f} %, "
                       f"{versus(r, saliency)} saliency only and {versus(r, even)} equal "
                       f"budgets; on named questions {100 * named_mean(r):.1f} against "
                       f"{100 * named_mean(saliency) if saliency else 0:.1f} and "
                       f"{100 * named_mean(even) if even else 0:.1f}.")
    return out


def budget_sentence(f: Any, ratio: float) -> str:
    r = f.result("relevance_test", SPEC_LABEL, ratio)
    if r is None:
        return ""
    mine, other = r.stats["target_tile_tokens"], r.stats["other_tile_tokens"]
    blind = f.tables["blind_budgets"][SALIENCY_LABEL][ratio]
    return (f"* **Budget on the asked-about tile** (R={ratio:g}, named questions): with "
            f"relevance ({SPEC_LABEL}) that tile gets {mine:.1f} tokens against {other:.1f} "
            f"on each other tile ({tile_share(mine, other):.0f} % of the tile budget); with "
            f"saliency only {blind[0]:.1f} against {blind[1]:.1f} "
            f"({tile_share(*blind):.0f} %); equal budgets give every tile 25 %.")


def default_verdict(f: Any) -> tuple[bool, str]:
    """Whether the tower's default should become a relevance setting: validation must pick
    it over every question-blind one and the test split must put it ahead of equal tile
    budgets at every pruned ratio."""
    best, routed = f.tables["relevance_best"], f.tables["relevance_best_routed"]
    pairs = [(r, f.result("ablations", UNIFORM_LABEL, r.ratio))
             for r in f.tables["relevance_test"] if r.label == routed]
    verdicts = [(a.ratio, verdict(a, b)) for a, b in pairs if b is not None]
    on_test = ", ".join(f"{r:g}: {v}" for r, v in verdicts)
    if best == routed:
        agrees = bool(verdicts) and all(v == "ahead" for _, v in verdicts)
        return agrees, (f"validation picks {best} over the question-blind settings; on test "
                        f"against equal tile budgets it is {on_test}")
    blind_wins = bool(verdicts) and all(v != "ahead" for _, v in verdicts)
    return False, (f"validation picks {best} over every relevance setting (the best of them: "
                   f"{routed}); on test that relevance setting against equal tile budgets is "
                   f"{on_test}" + ("; the test split agrees" if blind_wins else
                                   "; the test split does not fully agree"))


def default_sentence(f: Any) -> str:
    agrees, why = default_verdict(f)
    outcome = ("**with the question encoder loaded, this setting becomes HERO's default on "
               "this tower**" if agrees else
               "**the tower's default stays equal tile budgets, with or without the question "
               "encoder**")
    return f"{why}; {outcome}"


def kind_gap_sentence(f: Any, ratio: float) -> str:
    """Where the relevance term wins and loses, kind by kind, against equal budgets."""
    r, even = f.result("relevance_test", SPEC_LABEL, ratio), f.result("ablations",
                                                                       UNIFORM_LABEL, ratio)
    if r is None or even is None:
        return ""
    gaps = {k: 100 * (r.mean(k) - even.mean(k)) for k in KINDS}
    gain, loss = max(gaps, key=lambda k: gaps[k]), min(gaps, key=lambda k: gaps[k])
    why = (" (routing the budget to the named tile starves the others, which questions about "
           "every tile or about a position need)"
           if gain in NAMED_KINDS and loss not in NAMED_KINDS and gaps[loss] < -2 else "")
    return (f"* **Kind by kind** (R={ratio:g}, {SPEC_LABEL} minus equal budgets): "
            + ", ".join(f"{k} {v:+.1f}" for k, v in gaps.items())
            + f" points: most gained on `{gain}`, most lost on `{loss}`{why}.")


def reader_room_sentence(f: Any, ratio: float) -> str:
    """Which named kinds the reader can answer at all with every token (more than 25 points
    above chance), and how the HERO settings compare on those."""
    full = f.result("main", "full", 1.0)
    rows = [(SPEC_LABEL, f.result("relevance_test", SPEC_LABEL, ratio)),
            ("equal budgets", f.result("ablations", UNIFORM_LABEL, ratio)),
            ("saliency only", f.result("main", "hero", ratio))]
    if full is None or any(r is None for _, r in rows):
        return ""
    room = [k for k in NAMED_KINDS if full.mean(k) - CHANCE[k] > 0.25]
    scores = "; ".join(f"`{k}`: " + ", ".join(f"{label} {100 * r.mean(k):.1f}"
                                              for label, r in rows if r is not None)
                       for k in room)
    return ("* **What the reader can tell apart**: with every token it answers "
            + ", ".join(f"{k} {100 * full.mean(k):.1f} % (chance {100 * CHANCE[k]:.0f} %)"
                        for k in NAMED_KINDS)
            + f"; only {', '.join(f'`{k}`' for k in room) or 'none'} leaves room for the "
            f"kept tokens to matter. There, at R={ratio:g}: {scores or '—'}.")


def relevance_conclusions(f: Any, probe: float) -> list[str]:
    """The conclusion bullets about the relevance term."""
    return [retrieval_sentence(f),
            f"* **Validation sweep** (R={f.config.sweep_ratio:g}): {f.tables['relevance_best']} "
            f"scores best of the settings tried; of the relevance settings, "
            f"{f.tables['relevance_best_routed']} (table below).",
            *test_sentences(f), kind_gap_sentence(f, probe), reader_room_sentence(f, probe),
            budget_sentence(f, probe),
            f"* **Which default wins**: {default_sentence(f)}."]
