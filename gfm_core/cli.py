"""``gfm`` command line: one subcommand per pipeline stage, plus ``demo`` (everything, end to end).

Every subcommand reads ``params.yaml`` (``--params``) with the preset it names (``--preset``), calls the stage
function in :mod:`gfm_core.stages`, and prints where its outputs are. Known errors print one clear line and exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from gfm_core.errors import GfmError

log = logging.getLogger("gfm")


def _params(args: argparse.Namespace):  # -> Params (lazy import keeps `gfm --help` fast)
    from gfm_core.config import load_params

    return load_params(args.params, preset=args.preset, sets=args.set or ())


def _cmd_demo_data(args: argparse.Namespace) -> None:
    from gfm_core import stages

    res = stages.run_demo_data(_params(args))
    print(f"demo data: {res.root}")


def _cmd_ingest(args: argparse.Namespace) -> None:
    from gfm_core import stages

    res = stages.run_ingest(_params(args))
    print(f"manifest: {res.manifest} ({res.accepted} images, content hash {res.content_hash[:12]})")
    print(f"quarantine: {res.quarantine} ({res.quarantined} files, {res.bad_fraction:.1%})")
    print(f"normalisation stats: {res.stats}")


def _cmd_validate(args: argparse.Namespace) -> None:
    from gfm_core import stages

    res = stages.run_validate(_params(args))
    print(res.summary)
    if not res.success:
        raise SystemExit(1)


def _cmd_shards(args: argparse.Namespace) -> None:
    from gfm_core import stages

    res = stages.run_shards(_params(args))
    state = "written" if res.rebuilt else "up to date"
    print(f"shards {state}: {res.shard_dir} ({res.images} images, {res.shards} file(s), {res.bytes / 1e6:.1f} MB)")


def _cmd_pretrain(args: argparse.Namespace) -> None:
    from gfm_core import stages

    params = _params(args)
    res = stages.run_pretrain(params, args.ablation, resume=args.resume, max_steps=args.max_steps)
    if os.environ.get("RANK", "0") != "0":  # launched on several ranks: rank 0 reports
        return
    print(f"start: {res.start_reason}")
    if res.set_aside:
        print(f"the earlier run's checkpoints were moved to {res.set_aside}")
    print(f"pretraining: {res.steps} steps, final {res.summary()}")
    print(f"exported backbone: {res.backbone}")
    print(f"checkpoints: {res.checkpoint_dir}")


def _cmd_finetune(args: argparse.Namespace) -> None:
    from gfm_core import stages

    runs = stages.run_finetune(_params(args), tasks=args.task, models=args.model, seeds=args.seed)
    for r in runs:
        print(f"{r.task:>14} {r.model:>14} seed {r.seed}: {r.headline} = {r.score:.4f}  ({r.result_json})")


def _cmd_evaluate(args: argparse.Namespace) -> None:
    from gfm_core import stages

    report = stages.run_evaluate(_params(args))
    print(report.paths["markdown"].read_text())
    for kind, path in sorted(report.paths.items()):
        print(f"{kind}: {path}")


def _cmd_promote(args: argparse.Namespace) -> None:
    from gfm_core import stages

    params = _params(args)
    from gfm_core import tracking

    if params.tracking.enabled:
        tracking.configure(params.tracking)
    with tracking.stage_run("promote", params.promote.model_dump(mode="json")) if params.tracking.enabled \
            else contextlib.nullcontext():  # the gate logs its evidence into this run
        res = stages.run_promote(params)  # (refuses when tracking is off)
        tracking.log_metrics(res.tracked_metrics())
    state = "promoted" if res.promoted else "refused"
    print(f"models:/{res.model_name}/{res.version}: {state} (ARP {res.candidate_arp:+.2f}; "
          f"champion before: {res.champion_version or 'none'})")
    for reason in res.reasons:
        print(f"  - {reason}")


def _cmd_demo(args: argparse.Namespace) -> None:
    from gfm_core import stages

    for line in stages.run_demo(_params(args)):
        print(line)


def _cmd_science(args: argparse.Namespace) -> None:
    from gfm_core.science.experiment import run_science

    params = _params(args)
    res = run_science(params, progress=print)
    for h, sets in res.verdicts.items():
        print(f"{h}: " + ", ".join(f"{s} {v}" for s, v in sets.items()))
    print(f"report: {res.report_md} ({res.report_json}); {res.seconds:.0f} s")


def _cmd_embed(args: argparse.Namespace) -> None:
    from gfm_core.inference.commands import run_embed

    for line in run_embed(args, _params(args)):
        print(line)


def _cmd_predict(args: argparse.Namespace) -> None:
    from gfm_core.inference.commands import run_predict

    for line in run_predict(args, _params(args)):
        print(line)


def _cmd_similar(args: argparse.Namespace) -> None:
    from gfm_core.inference.commands import run_similar

    for line in run_similar(args):
        print(line)


#: The paper's figures the estimate is set beside (GeoPile images; Table 1's GFM row).
PAPER_IMAGES, PAPER_V100_HOURS, PAPER_CO2_KG = 587_954, 93.3, 13.3


def _cmd_estimate(args: argparse.Namespace) -> None:
    from gfm_core.errors import ConfigError
    from gfm_core.io import read_json
    from gfm_core.training.ledger import extrapolate

    params = _params(args)
    path = args.summary or params.pretrain.out_dir / "summary.json"
    ledger = read_json(path).get("compute") if Path(path).is_file() else None
    if not ledger:
        raise ConfigError(f"{path}: no compute ledger (run `gfm pretrain` first, or pass --summary)")
    epochs = args.epochs or params.pretrain.epochs
    est = extrapolate(ledger, args.images * epochs)
    s = params.pretrain.student
    print(f"measured: {est['samples_per_s']:.1f} images/s on {ledger['device_count']} x {ledger['device']}, "
          f"{s.arch} at {s.img_size} px, {params.pretrain.precision} ({path})")
    print(f"{args.images:,} images x {epochs} epochs: {est['wall_h']:,.1f} h wall, {est['device_hours']:,.1f} "
          f"device-hours, {est['energy_kwh']:.3g} kWh ({ledger['energy_source']}), {est['co2_kg']:.3g} kg CO2 "
          f"at {ledger['grid_gco2_per_kwh']:g} g/kWh")
    print(f"paper (GFM, Table 1): {PAPER_V100_HOURS} V100-hours, {PAPER_CO2_KG} kg CO2 for {PAPER_IMAGES:,} "
          f"images x 100 epochs (Swin-B student 192 px + Swin-B teacher 224 px)")


def _cmd_release_teacher(args: argparse.Namespace) -> None:
    from gfm_core.registry.release import release_teacher

    folder = _params(args).retrain.teacher_dir
    rel = release_teacher(folder, args.teacher, source=args.weights)
    state = "released" if rel.written else "already released (nothing written)"
    print(f"{rel.arch} {state}: {rel.path} (sha256 {rel.sha256}); sidecar {rel.sidecar}")
    if rel.written:
        print("the Dagster sensor new_teacher_sensor starts one `retrain` run on it once the file holds still")


def _cmd_compare(args: argparse.Namespace) -> None:
    from gfm_core import tracking
    from gfm_core.registry.versions import compare_versions, render_markdown

    params = _params(args)
    tracking.configure(params.tracking)
    rows = compare_versions(params.promote.model_name, args.versions, n_bootstrap=params.evaluate.n_bootstrap,
                            ci=params.evaluate.ci)
    print(render_markdown(rows))


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], None], str]] = {
    "demo-data": (_cmd_demo_data, "build the embedded demo GeoPile and downstream tasks from real imagery"),
    "ingest": (_cmd_ingest, "read the pile once: manifest, quarantine report, normalisation stats"),
    "validate": (_cmd_validate, "great-expectations checks of the manifest (exit 1 on failure, with a summary)"),
    "shards": (_cmd_shards, "decode the validated pile once into uint8 Arrow shards for training"),
    "pretrain": (_cmd_pretrain, "teacher-student continual pretraining (GFM)"),
    "finetune": (_cmd_finetune, "fine-tune every (task, model, seed) with the same heads and budget"),
    "evaluate": (_cmd_evaluate, "the comparison report: table, ARP, bootstrap CIs, radar chart"),
    "promote": (_cmd_promote, "register the foundation model; alias it @champion only if the evaluation gate passes"),
    "estimate": (_cmd_estimate, "extrapolate the last pretraining's measured rates to the full GeoPile schedule"),
    "release-teacher": (_cmd_release_teacher, "export a newer ImageNet teacher (lite0, lite1, lite2) into "
                        "retrain.teacher_dir, where the teacher sensor starts a retrain on it"),
    "compare": (_cmd_compare, "registered versions side by side: raw test scores against the first version, "
                "paired bootstrap intervals on the same samples and seeds (e.g. one student per teacher)"),
    "demo": (_cmd_demo, "run every stage end to end on the embedded demo data"),
    "science": (_cmd_science, "test the paper's claims at small scale (use --preset science): variants x seeds, "
                "dense probes, paired bootstrap, report"),
    "embed": (_cmd_embed, "per-tile embeddings of a whole scene (GeoParquet) from a registered or exported backbone"),
    "predict": (_cmd_predict, "tiled prediction of a whole scene (GeoTIFF) with a fine-tuned task model"),
    "similar": (_cmd_similar, "the tiles nearest a query tile by cosine over gfm embed's GeoParquet, as a PNG grid"),
}


def build_parser() -> argparse.ArgumentParser:
    """The ``gfm`` argument parser."""
    parser = argparse.ArgumentParser(prog="gfm", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, help_) in COMMANDS.items():
        p = sub.add_parser(name, help=help_, description=help_)
        p.add_argument("--params", type=Path, default=Path("params.yaml"), help="params file (default: %(default)s)")
        p.add_argument(
            "--preset", default=None,
            help="named preset from params.yaml's `presets` ('' = none: the paper's values); default: its `preset` key",
        )
        p.add_argument(
            "-S", "--set", action="append", metavar="KEY=VALUE",
            help="override a param after the preset, as `dvc exp run -S` (e.g. -S finetune.epochs=5, "
                 "-S finetune.tasks.scene.epochs=3); repeatable, validated like params.yaml",
        )
        if name == "pretrain":
            p.add_argument("--resume", action="store_true",
                           help="continue the latest complete checkpoint if it is the same run (same data, params "
                                "and teacher); otherwise, and without this flag, an earlier run's checkpoints are "
                                "moved to checkpoints.stale-<time>/ and training starts fresh")
            p.add_argument("--max-steps", type=int, default=None, help="override pretrain.max_steps")
            p.add_argument("--ablation", default=None,
                           help="pretrain the ablation of this name in pretrain.ablations (mim_only, distill_only)")
        if name == "estimate":
            p.add_argument("--summary", type=Path, default=None,
                           help="a pretraining's summary.json (default: pretrain.out_dir's)")
            p.add_argument("--images", type=int, default=PAPER_IMAGES, help="images per epoch (default: GeoPile's)")
            p.add_argument("--epochs", type=int, default=None, help="epochs (default: pretrain.epochs)")
        if name == "release-teacher":
            p.add_argument("teacher", nargs="?", default="",  # missing: the error lists the valid names
                           help="lite0 | lite1 | lite2 (or its timm arch); with --weights, a timm arch")
            p.add_argument("--weights", type=Path, default=None, help="release this weight file instead")
        if name == "compare":
            p.add_argument("versions", nargs="*", help="versions of promote.model_name, the reference first: "
                           "`1 2 3`, `@champion 4` (at least two)")
        if name == "finetune":
            p.add_argument("--task", action="append", help="only this task (repeatable)")
            p.add_argument("--model", action="append", help="only this model (repeatable)")
            p.add_argument("--seed", action="append", type=int, help="only this seed (repeatable)")
        if name in ("embed", "predict"):
            from gfm_core.inference.commands import add_arguments

            add_arguments(p, name)
        if name == "similar":
            from gfm_core.inference.commands import add_similar_arguments

            add_similar_arguments(p)
        p.set_defaults(func=fn)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``gfm`` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S",
    )
    for noisy in ("great_expectations", "timm", "deepspeed", "mlflow", "alembic"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if args.verbose else logging.WARNING)
    try:
        args.func(args)
    except GfmError as e:
        print(f"gfm {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
