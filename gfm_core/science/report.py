"""The science report: every hypothesis on every evaluation set, with the design's power, as JSON, Markdown, PNG.

Fixed before running (and not changed after seeing results):

- primary metric pixel accuracy, secondary mIoU (reported, not part of the Holm family);
- H1 GFM > MIM-only, only where the relevance rule holds: the teacher's own frozen features beat both raw
  pixels and the MIM-only student by ``science.relevance_margin`` points, measured image-disjoint (leave one
  image out) where a set has several images; elsewhere H1 is ``untestable``;
- H2 MIM-only > random init; H3 GFM > distill-only;
- H4 "learns more in less time": GFM at the largest curve point within half of MIM-only's final training FLOPs
  reaches MIM-only's final model, a non-inferiority question: supported when the difference is significantly
  above ``-science.h4_margin`` points, contradicted when significantly below it (FLOPs include the teacher's
  forward passes that produced GFM's targets);
- Holm over every testable (hypothesis, set) of the primary metric; a sensitivity family for sets with several
  images, where each pixel also gets its image's identity as a feature (classes specific to one image can
  otherwise be learnt from image identity rather than from the features);
- secondary, descriptive (no verdict, outside both families): tile-level kNN and logistic probes of the same
  blocks (each block one sample, labelled by its majority class) with the same bootstrap, and their majority row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from gfm_core.config import Params
from gfm_core.io import write_json, write_text
from gfm_core.science.stats import BlockCounts, Replicates, holm, paired_bootstrap, verdict

HYPOTHESES: dict[str, tuple[str, str, str]] = {
    "H1": ("GFM > MIM-only (distilling the ImageNet teacher helps)", "gfm", "mim_only"),
    "H2": ("MIM-only > random init (masked image modelling on the pile learns)", "mim_only", "random"),
    "H3": ("GFM > distill-only (the MIM part helps; with H1: GFM beats both of its parts)", "gfm", "distill_only"),
    "H4": ("GFM reaches MIM-only's final accuracy (within science.h4_margin points) with at most half of its "
           "training FLOPs", "gfm", "mim_only"),
}
PRIMARY, SECONDARY = "pixel_accuracy", "miou"
FIXED = -1


def _counts(table: dict[Any, BlockCounts], set_name: str, model: str, seeds: list[int], frac: float | None = 1.0,
            ) -> list[BlockCounts]:
    """One BlockCounts per seed from ``table`` (keys ``(set, model, seed[, frac])``; seedless models repeated)."""
    tail = () if frac is None else (frac,)
    fixed = table.get((set_name, model, FIXED, *tail))
    if fixed is not None:
        return [fixed] * len(seeds)
    return [table[(set_name, model, s, *tail)] for s in seeds]


def _summary(counts: list[BlockCounts]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for m in (PRIMARY, SECONDARY):
        vals = [c.metric(m) for c in counts]
        out[m] = round(float(np.mean(vals)), 3)
        out[f"{m}_sd"] = round(float(np.std(vals, ddof=1)), 3) if len(set(map(id, counts))) > 1 else 0.0
        out[f"{m}_per_seed"] = [round(v, 3) for v in vals]
    return out


def _comparison(a: list[BlockCounts], b: list[BlockCounts], reps: Replicates, ci: float, null: float = 0.0,
                ) -> dict[str, Any]:
    out: dict[str, Any] = {"null": null}
    for m in (PRIMARY, SECONDARY):
        c = paired_bootstrap(a, b, m, reps, ci=ci, null=null)
        out[m] = {"diff": round(c.diff, 3), "ci": [round(c.ci[0], 3), round(c.ci[1], 3)], "p": c.p_two_sided,
                  "seeds_agree": c.seeds_agree(), "per_seed": [round(d, 3) for d in c.per_seed],
                  "mdd": round(c.mdd, 3)}
    return out


def _h4_fraction(runs: list[Any], cfg: Any) -> tuple[float | None, float, dict[str, list[dict[str, float]]]]:
    """GFM's largest curve fraction within half of MIM-only's final FLOPs, that budget, and both cost curves."""
    by = {(r.variant, r.seed): r for r in runs}
    seed = cfg.seeds[0]
    gfm, mim = by[("gfm", seed)], by[("mim_only", seed)]
    budget = 0.5 * mim.flops_at(1.0)
    fits = [f for f in sorted(cfg.curve_fractions) if gfm.flops_at(f) <= budget]
    fracs = sorted(cfg.curve_fractions)
    curves = {v: [{"fraction": f, "step": round(f * r.steps), "flops": r.flops_at(f)} for f in fracs]
              for v, r in (("gfm", gfm), ("mim_only", mim))}
    return (fits[-1] if fits else None), budget, curves


def analyse(params: Params, runs: list[Any], sets: list[Any], scores: Any) -> dict[str, Any]:
    """Every number of the report (module docstring); nothing here looks at a result before the rules apply."""
    cfg = params.science
    seeds = list(cfg.seeds)
    h4_frac, h4_budget, cost = _h4_fraction(runs, cfg)
    hyps: dict[str, dict[str, Any]] = {h: {"statement": t, "sets": {}} for h, (t, _, _) in HYPOTHESES.items()}
    sensitivity: dict[str, dict[str, Any]]
    family: dict[tuple[str, str], float]
    sens_family: dict[tuple[str, str], float]
    tables, relevance, curves, sensitivity, design, tiles = {}, {}, {}, {}, {}, {}
    family, sens_family = {}, {}
    for ds in sets:
        n = ds.name
        reps = Replicates.draw(ds.block_image, len(seeds), cfg.n_bootstrap, seed=cfg.seed)
        models = ["majority", "raw", "teacher", "random", *params.science_variants()]
        tables[n] = {m: _summary(_counts(scores.main, n, m, seeds)) for m in models}
        margin, relevance[n] = _relevance(scores.relevance, ds, seeds, cfg)
        for h, (body, ident) in _hypothesis_tests(ds, scores, seeds, reps, cfg, margin, h4_frac).items():
            hyps[h]["sets"][n] = body
            if PRIMARY in body:
                family[(h, n)] = body[PRIMARY]["p"]
            if ident is not None:
                sensitivity.setdefault(h, {})[n] = ident
                sens_family[(h, n)] = ident[PRIMARY]["p"]
        probes = _tile_probes(scores.tiles, n, models, seeds, reps, cfg)
        if probes:
            tiles[n] = probes
        curves[n] = {v: [{**pt, **_summary(_counts(scores.main, n, v, seeds, pt["fraction"]))} for pt in cost[v]]
                     for v in ("gfm", "mim_only")}
        design[n] = {"images": len(ds.images), "blocks": len(ds.block_image), "pixels": len(ds.px_label),
                     "classes": ds.classes, "seeds": len(seeds), "folds": cfg.folds, "files": list(ds.files),
                     "mdd_points": {h: v[PRIMARY]["mdd"] for h, b in hyps.items()
                                    for s, v in b["sets"].items() if s == n and PRIMARY in v}}
    for (h, n), p in holm(family).items():
        body = hyps[h]["sets"][n]
        body["p_holm"] = p
        body["verdict"] = verdict(body[PRIMARY]["diff"], p, cfg.alpha, body["null"])
        body.update(diff=body[PRIMARY]["diff"], ci=body[PRIMARY]["ci"], seeds_agree=body[PRIMARY]["seeds_agree"])
    for (h, n), p in holm(sens_family).items():
        body = sensitivity[h][n]
        body["p_holm"] = p
        body["verdict"] = verdict(body[PRIMARY]["diff"], p, cfg.alpha, body["null"])
    return {
        "question": "Does GFM's teacher-student continual pretraining beat its parts and random init, at small "
                    "scale on real data?",
        "hypotheses": hyps, "table": tables, "relevance": relevance, "curve": curves,
        "h4": {"gfm_fraction": h4_frac, "mim_half_budget_flops": h4_budget},
        "sensitivity_image_identity": sensitivity, "tiles": tiles, "design": design,
        "runs": [{"variant": r.variant, "seed": r.seed, "steps": r.steps, "step_flops": r.step_flops,
                  "fixed_flops": r.fixed_flops, "seconds": round(r.seconds, 1),
                  **{k: r.summary.get(k) for k in ("mim_ratio_holdout", "cos_margin_holdout", "mim_holdout",
                                                    "mim_trivial_holdout", "cos_holdout", "cos_mean_vector_holdout")}}
                 for r in runs],
        "settings": {"science": params.science.model_dump(mode="json"),
                     "pretrain": params.pretrain.model_dump(mode="json"), "ingest_root": str(params.ingest.root)},
    }


def _relevance(table: dict[Any, BlockCounts], ds: Any, seeds: list[int], cfg: Any) -> tuple[float, dict[str, Any]]:
    """The relevance rule on one set: the teacher's margin over raw pixels and MIM-only, and its summary."""
    n = ds.name
    rel = {m: float(np.mean([c.metric(PRIMARY) for c in _counts(table, n, m, seeds, None)]))
           for m in ("teacher", "raw", "mim_only")}
    margin = rel["teacher"] - max(rel["raw"], rel["mim_only"])
    testable = margin >= cfg.relevance_margin
    return margin, {**{m: round(v, 3) for m, v in rel.items()}, "margin": round(margin, 3),
                    "testable": testable, "protocol": "leave one image out" if len(ds.images) > 1
                    else "spatial block CV (one image)"}


def _hypothesis_tests(ds: Any, scores: Any, seeds: list[int], reps: Replicates, cfg: Any, margin: float,
                      h4_frac: float | None) -> dict[str, tuple[dict[str, Any], dict[str, Any] | None]]:
    """Each hypothesis on one set: its test (or why it is untestable) and its image-identity test (or None)."""
    n, main = ds.name, scores.main
    out: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}
    for h, (_, a, b) in HYPOTHESES.items():
        if h == "H1" and not margin >= cfg.relevance_margin:  # a NaN margin is untestable too
            out[h] = ({"metric": PRIMARY, "verdict": "untestable", "reason": (
                f"relevance rule: the teacher beats raw pixels and MIM-only by {margin:.2f} points "
                f"< {cfg.relevance_margin}")}, None)
            continue
        if h == "H4":
            if h4_frac is None:
                out[h] = ({"metric": PRIMARY, "verdict": "untestable", "reason": (
                    "no GFM curve point lies within half of MIM-only's FLOPs (the teacher pool alone costs more)")},
                    None)
                continue
            comp = _comparison(_counts(main, n, a, seeds, h4_frac), _counts(main, n, b, seeds), reps, cfg.ci,
                               null=-cfg.h4_margin)
            comp["gfm_fraction"] = h4_frac
        else:
            comp = _comparison(_counts(main, n, a, seeds), _counts(main, n, b, seeds), reps, cfg.ci)
        ident = None
        if len(ds.images) > 1 and h in ("H1", "H2", "H3"):
            ident = _comparison(_counts(scores.identity, n, a, seeds, None),
                                _counts(scores.identity, n, b, seeds, None), reps, cfg.ci)
        out[h] = ({"metric": PRIMARY, **comp}, ident)
    return out


def _tile_probes(probe_tables: dict[str, dict[Any, BlockCounts]], n: str, models: list[str], seeds: list[int],
                 reps: Replicates, cfg: Any) -> dict[str, Any]:
    """The secondary tile-level probes on set ``n``: accuracy per model, and the hypotheses' comparisons."""
    out: dict[str, Any] = {}
    for probe, table in probe_tables.items():
        tile_models = [m for m in models if (n, m, FIXED) in table or (n, m, seeds[0]) in table]
        out[probe] = {
            "accuracy": {m: _summary(_counts(table, n, m, seeds, None))[PRIMARY] for m in tile_models},
            "accuracy_sd": {m: _summary(_counts(table, n, m, seeds, None))[PRIMARY + "_sd"] for m in tile_models},
            "comparisons": {h: _comparison(_counts(table, n, a, seeds, None), _counts(table, n, b, seeds, None),
                                           reps, cfg.ci)[PRIMARY] for h, (_, a, b) in HYPOTHESES.items()
                            if h != "H4" and a in tile_models and b in tile_models}}
    return out


def write_report(report: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """``report.json``, ``report.md`` and ``curve.png`` under ``out_dir`` (atomic writes)."""
    paths = {"json": write_json(out_dir / "report.json", report), "curve": _plot(report, out_dir / "curve.png")}
    paths["markdown"] = write_text(out_dir / "report.md", markdown(report))
    return paths


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: verdicts first, then the tables they come from."""
    lines = [f"# Science report\n\n{report['question']}\n", "## Verdicts (pixel accuracy, Holm-adjusted)\n",
             "| hypothesis | set | diff (points) | 95 % CI | p (Holm) | seeds agree | MDD | verdict |",
             "|---|---|---:|---|---:|---:|---:|---|"]
    for h, body in report["hypotheses"].items():
        for s, v in body["sets"].items():
            if v["verdict"] == "untestable":
                lines.append(f"| {h} | {s} | | | | | | untestable: {v['reason']} |")
                continue
            p = v[PRIMARY]
            lines.append(f"| {h} | {s} | {p['diff']:+.2f} | [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] | "
                         f"{v['p_holm']:.3f} | {p['seeds_agree']} | {p['mdd']:.2f} | **{v['verdict']}** |")
    lines += ["", *[f"- **{h}**: {b['statement']}" for h, b in report["hypotheses"].items()], ""]
    for s, table in report["table"].items():
        d, r = report["design"][s], report["relevance"][s]
        lines += [f"## {s}: {d['images']} image(s), {d['blocks']} blocks, {d['pixels']} scored pixels, "
                  f"{d['classes']} classes, {d['seeds']} seeds\n",
                  "| model | pixel accuracy | mIoU |", "|---|---:|---:|"]
        for m, v in table.items():
            lines.append(f"| {m} | {v[PRIMARY]:.2f} ± {v[PRIMARY + '_sd']:.2f} | {v[SECONDARY]:.2f} ± "
                         f"{v[SECONDARY + '_sd']:.2f} |")
        h1 = "testable" if r["testable"] else "untestable"
        lines += ["", f"Relevance ({r['protocol']}): teacher {r['teacher']:.2f}, raw {r['raw']:.2f}, MIM-only "
                  f"{r['mim_only']:.2f}; margin {r['margin']:+.2f} -> H1 {h1}.", ""]
    if report["sensitivity_image_identity"]:
        lines += ["## Sensitivity: image identity as an extra feature\n", "| hypothesis | set | diff | 95 % CI | "
                  "p (Holm) | verdict |", "|---|---|---:|---|---:|---|"]
        for h, sets in report["sensitivity_image_identity"].items():
            for s, v in sets.items():
                p = v[PRIMARY]
                lines.append(f"| {h} | {s} | {p['diff']:+.2f} | [{p['ci'][0]:+.2f}, {p['ci'][1]:+.2f}] | "
                             f"{v['p_holm']:.3f} | {v['verdict']} |")
        lines.append("")
    for s, probes in report.get("tiles", {}).items():
        lines += [f"## Secondary: tile-level probes on {s} (each block one sample, its majority class)\n",
                  "| model | " + " | ".join(f"{p} accuracy" for p in probes) + " |",
                  "|---|" + "---:|" * len(probes)]
        for m in next(iter(probes.values()))["accuracy"]:
            lines.append(f"| {m} | " + " | ".join(f"{t['accuracy'][m]:.1f} ± {t['accuracy_sd'][m]:.1f}"
                                                  for t in probes.values()) + " |")
        lines += ["", "| comparison | " + " | ".join(f"{p}: diff [95 % CI], seeds agree" for p in probes) + " |",
                  "|---|" + "---|" * len(probes)]
        for h in next(iter(probes.values()))["comparisons"]:
            cells = [f"{c['diff']:+.1f} [{c['ci'][0]:+.1f}, {c['ci'][1]:+.1f}], {c['seeds_agree']}"
                     for c in (t["comparisons"][h] for t in probes.values())]
            lines.append(f"| {h} {HYPOTHESES[h][1]} - {HYPOTHESES[h][2]} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["## Pretraining runs (held-out learning)\n", "| variant | seed | masked L1 / trivial | cosine margin "
              "| GFLOP/step | seconds |", "|---|---:|---:|---:|---:|---:|"]
    for r in report["runs"]:
        ratio, cos = r.get("mim_ratio_holdout"), r.get("cos_margin_holdout")
        cells = ["—" if ratio is None else f"{ratio:.3f}", "—" if cos is None else f"{cos:+.3f}"]
        lines.append(f"| {r['variant']} | {r['seed']} | {cells[0]} | {cells[1]} | {r['step_flops'] / 1e9:.1f} | "
                     f"{r['seconds']:.0f} |")
    lines += ["", "![accuracy against training FLOPs](curve.png)", "",
              f"Wall time: {report.get('wall_seconds', {})}"]
    return "\n".join(lines) + "\n"


def _plot(report: dict[str, Any], path: Path) -> Path:

    from gfm_core.evaluation.figures import new_figure, write_png

    sets = list(report["curve"])
    fig = new_figure(5 * len(sets), 3.8)
    for k, s in enumerate(sets):
        ax = fig.add_subplot(1, len(sets), k + 1)
        for v, color in (("gfm", "#c33"), ("mim_only", "#36c")):
            pts = report["curve"][s][v]
            ax.errorbar([p["flops"] / 1e12 for p in pts], [p[PRIMARY] for p in pts],
                        yerr=[p[PRIMARY + "_sd"] for p in pts], marker="o", color=color, label=v, capsize=3)
        for m, style in (("random", ":"), ("raw", "--"), ("teacher", "-.")):
            ax.axhline(report["table"][s][m][PRIMARY], color="#555", ls=style, lw=1, label=m)
        ax.set_title(s, fontsize=10)
        ax.set_xlabel("cumulative training TFLOPs")
        ax.set_ylabel("pixel accuracy (%)")
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    return write_png(fig, path)
