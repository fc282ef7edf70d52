"""``saltsegment``: the headless main job and the worker the Slicer module runs.

    saltsegment train --image IMG --labels LABELS [--image IMG2 --labels LABELS2 | --cases CSV] --out ADAPTER
                      [--init PARENT] [--method ...] [--steps N] ...
    saltsegment propagate --image IMG --adapter ADAPTER --out SEG [--mode auto|box] [--range A:B]
    saltsegment propagate --cases CSV --adapter ADAPTER --out FOLDER     (many volumes; summary.csv)
    saltsegment evaluate --pred SEG --ref SEG [--json]
    saltsegment demo [--out DIR]
    saltsegment models [--json] [--download ID]
    saltsegment bench speed|quality|site [--out DIR]

``train`` and ``propagate`` also run as ranks of ``torchrun --nproc-per-node N
-m SALTSegmentLib.cli ...`` (see :mod:`distributed`).

Errors print one line (and a hint) and exit 1 (``--debug`` shows the
traceback); SIGTERM/SIGINT, or the file named by ``--stop-file`` appearing,
stop training at the next step, save the adapter and exit 3 (see
:mod:`worker_protocol`); a stop before the first step, or during
propagation, writes nothing and exits 3. Inputs are checked before a
model is loaded.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import re
import sys
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Optional, Sequence

from .host.choices import DEFAULT_STEPS
from .host.stop_request import StopRequest
from .worker_protocol import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, emit


def _int_list(text: str) -> list[int]:
    try:
        return [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated slice numbers, got '{text}'") from None


def _absent_mark(text: str) -> tuple[str, list[int]]:
    """``NAME=S1,S2`` -> (NAME, [S1, S2]); split at the last ``=``, so a name may hold one."""
    from .absent_marks import AbsentMarkError, parse_mark

    try:
        return parse_mark(text)
    except AbsentMarkError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _absent_marks(marks: Optional[Sequence[tuple[str, list[int]]]]) -> dict[str, list[int]]:
    """Repeated ``--absent`` options as one mapping (a name given twice gets both lists)."""
    from .absent_marks import merge_marks

    return merge_marks(marks or ())


_ABSENT_HELP = ("NAME=SLICES: slices you checked and found without segment NAME, numbered along the slice plane; "
                "{what}; repeat per segment (with --cases: each volume's in its 'absent' column)")


def _protocol_list(text: str) -> list[str]:
    from .bench.cases import PROTOCOLS

    names = [item.strip() for item in text.split(",") if item.strip()]
    unknown = [name for name in names if name not in PROTOCOLS]
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown labelling protocol '{','.join(unknown) or text}'; "
                                         f"choose from {', '.join(PROTOCOLS)}")
    return list(dict.fromkeys(names))


def _slice_range(text: str) -> tuple[int, int]:
    try:
        first, last = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected FIRST:LAST slice numbers, got '{text}'") from None
    return first, last


# Options whose values may start with a minus sign; argparse would read "-1:5" as an option name.
_NUMERIC_OPTIONS = ("--range", "--slices")
_NUMERIC_VALUE = re.compile(r"-\d[\d:,\s-]*")


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """``--range -1:5`` -> ``--range=-1:5``, so a negative slice number reaches the range check."""
    attached: list[str] = []
    for item in argv:
        if attached and attached[-1] in _NUMERIC_OPTIONS and _NUMERIC_VALUE.fullmatch(item):
            attached[-1] = f"{attached[-1]}={item}"
        else:
            attached.append(item)
    return attached


class UsageError(ValueError):
    """A command line that names its inputs wrongly (argparse cannot say it: options that go together)."""

    hint = "see 'saltsegment COMMAND --help'"


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got '{text}'")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a positive number, got '{text}'")
    return value


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got '{text}'")
    return value


def build_parser() -> argparse.ArgumentParser:
    from .adapters import METHOD_SPECS
    from .devices import DEVICE_CHOICES
    from .host.choices import AXES, PRECISIONS, RANK_PRESETS
    from .propagation import MODES
    from .segment_matching import MATCH_MODES

    parser = argparse.ArgumentParser(prog="saltsegment", description=__doc__.split("\n")[0])
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    commands = parser.add_subparsers(dest="command", required=True)

    def common(sub: argparse.ArgumentParser) -> None:
        sub.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
        sub.add_argument("--precision", choices=PRECISIONS, default="auto",
                         help="autocast precision (auto: bf16 on CUDA and on CPUs with native bf16, "
                              "fp16 on Apple MPS)")
        sub.add_argument("--progress", choices=("bar", "json"), default="bar",
                         help="a progress bar, or JSON lines for the Slicer worker")
        sub.add_argument("--weights", help="base model weights file (overrides the registry's file)")
        sub.add_argument("--resample-labels", action="store_true",
                         help="resample a label map on another grid onto the image (nearest neighbour)")
        sub.add_argument("--stop-file", metavar="PATH",
                         help="stop cleanly (as on SIGTERM) once this file exists: works on every OS and "
                              "through launchers that forward no signal")
        sub.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    train = commands.add_parser("train", help="fine-tune an adapter on a few labelled slices")
    train.add_argument("--image", action="append",
                       help="volume: NIfTI, NRRD, MHA or a DICOM series folder; repeat with --labels for more volumes")
    train.add_argument("--labels", action="append", help="label map or Slicer .seg.nrrd on the image grid")
    train.add_argument("--cases", metavar="CSV",
                       help="more volumes: a CSV file with a header (image,labels[,slices][,absent]), one volume per "
                            "line (absent: marks such as 'Thalamus_L=52 53; Caudate_R=18')")
    train.add_argument("--init", metavar="ADAPTER",
                       help="continue this adapter (same base model and method): new volumes, new segments")
    train.add_argument("--out", required=True, help="adapter file to write (.safetensors)")
    train.add_argument("--method", choices=tuple(METHOD_SPECS), default=None,
                       help="fine-tuning method (default: salt, or the --init adapter's)")
    train.add_argument("--model", default=None,
                       help="base model id (see 'saltsegment models'; default: lite_medsam, or the --init adapter's)")
    train.add_argument("--rank", choices=RANK_PRESETS, default=None,
                       help="rank preset (default: default, or the --init adapter's)")
    train.add_argument("--segments", type=lambda s: [x.strip() for x in s.split(",") if x.strip()],
                       help="comma-separated segment names or label values (default: all)")
    train.add_argument("--slices", type=_int_list,
                       help="labelled slice numbers; default: every slice where a selected segment has voxels")
    train.add_argument("--absent", type=_absent_mark, action="append", metavar="NAME=SLICES",
                       help=_ABSENT_HELP.format(what="the adapter learns that it is not there"))
    train.add_argument("--axis", choices=AXES, default=None,
                       help="slice plane: axial (default, or the --init adapter's plane), coronal or sagittal (the "
                            "anatomical plane, found from the image's direction matrix), or i, j, k (a voxel axis "
                            "of the image as stored)")
    train.add_argument("--intensity", default="auto",
                       help="auto, mr, ct, a CT preset (lung, bone, ...) or L,W (with --init, auto keeps the "
                            "parent's mapping)")
    train.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS)
    train.add_argument("--learning-rate", type=_positive_float, default=None)
    train.add_argument("--batch-size", type=_positive_int, default=None)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every", type=int, default=25)
    common(train)

    propagate = commands.add_parser("propagate", help="segment a volume (or many) with an adapter")
    propagate.add_argument("--image")
    propagate.add_argument("--cases", metavar="CSV",
                           help="many volumes: a CSV file with a header (image[,labels][,name][,absent]); --out is "
                                "then a folder, and volumes whose output is complete are skipped (resume)")
    propagate.add_argument("--adapter", required=True)
    propagate.add_argument("--out", required=True,
                           help="label map to write (.seg.nrrd keeps names/colours); with --cases, a folder")
    propagate.add_argument("--labels", help="the labels you drew: kept exactly, and seeds for --mode box")
    propagate.add_argument("--mode", choices=MODES,
                           help="box (default with --labels): your drawn slices interpolated (the model blended in "
                                "3+ slices from them), each structure's ends found by the model; "
                                "interpolate: Slicer's Fill between slices alone; "
                                "auto (default without --labels): learned prompts on every slice")
    propagate.add_argument("--range", type=_slice_range, dest="slice_range", help="FIRST:LAST slices (inclusive)")
    propagate.add_argument("--absent", type=_absent_mark, action="append", metavar="NAME=SLICES",
                           help=_ABSENT_HELP.format(what="they stay empty, and box mode's walks stop before them"))
    propagate.add_argument("--match-by", choices=MATCH_MODES, default="auto",
                           help="pair drawn segments with the adapter's by name or by label value "
                                "(auto: by name, by value when the label map carries no names)")
    propagate.add_argument("--threshold", type=_probability, default=0.5)
    propagate.add_argument("--no-cleanup", action="store_true",
                           help="auto mode: keep every connected component of each segment (for segments made of "
                                "several separate pieces, such as multiple lesions); box mode keeps the pieces you drew")
    common(propagate)

    evaluate = commands.add_parser("evaluate", help="Dice and HD95 of a segmentation against a reference")
    evaluate.add_argument("--pred", required=True)
    evaluate.add_argument("--ref", required=True)
    evaluate.add_argument("--axis", choices=AXES, default="axial",
                          help="axis of the per-slice table: an anatomical plane or a voxel axis i, j, k")
    evaluate.add_argument("--json", action="store_true", help="print one JSON document")
    evaluate.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    demo = commands.add_parser("demo", help="fine-tune and propagate on the embedded sample, with a report")
    demo.add_argument("--out", default="demo-output")
    demo.add_argument("--method", choices=tuple(METHOD_SPECS), default="salt")
    demo.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS)
    demo.add_argument("--mode", choices=MODES, default="box")
    demo.add_argument("--labelled", type=_positive_int, default=5, help="number of labelled slices")
    demo.add_argument("--device", choices=DEVICE_CHOICES, default="auto")
    demo.add_argument("--stop-file", metavar="PATH", help="stop cleanly once this file exists")
    demo.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    bench = commands.add_parser("bench", help="benchmarks: speed (ratios between methods) or few-shot quality")
    bench.add_argument("kind", choices=("speed", "quality", "site"))
    bench.add_argument("--out", default="bench-output", help="folder for quality.json/.md/.png and speed.json")
    bench.add_argument("--repeats", type=_positive_int, default=5, help="speed: interleaved repetitions")
    bench.add_argument("--models", default="lite_medsam,sam_vit_b", help="speed: base models (random ViT weights)")
    bench.add_argument("--vit-input-size", type=int, choices=(256, 512, 1024), default=256,
                       help="speed: input size of the ViT models")
    bench.add_argument("--dev", metavar="DIR",
                       help="quality: the development set made by scripts/make_dev_set.py (default: the embedded "
                            "sample only)")
    bench.add_argument("--cases", help="quality: comma-separated case names of the development set (default: all)")
    bench.add_argument("--counts", type=_int_list, default=[3, 5],
                       help="quality: drawn slices per structure (anatomy; lesions get their middle slice)")
    bench.add_argument("--protocol", type=_protocol_list, default=["per_structure"], metavar="NAME[,NAME...]",
                       help="quality: where the user draws: COUNT slices evenly inside each structure "
                            "(per_structure), evenly from two slices inside its ends (near_ends), at random "
                            "inside it (random), on COUNT neighbouring slices around its middle (consecutive), "
                            "or COUNT over all structures (global); several run in turn")
    bench.add_argument("--methods", default="salt,lora", help="quality: methods")
    bench.add_argument("--seeds", type=_int_list, default=[0])
    bench.add_argument("--steps", type=_positive_int, default=DEFAULT_STEPS)
    bench.add_argument("--image", help="quality: a labelled volume of your own (default: the embedded sample)")
    bench.add_argument("--labels", help="quality: its full reference label map")
    bench.add_argument("--axis", default="k", help="quality, with --image: the voxel axis to label along (k, j, i)")
    bench.add_argument("--no-oracle", action="store_true",
                       help="quality: skip the oracle boxes (zero-shot, and each fine-tuned model)")
    bench.add_argument("--no-suggestion", action="store_true",
                       help="quality: skip the extra-slice experiment (suggested vs evenly chosen slice)")
    bench.add_argument("--merge", metavar="JSON[,JSON...]",
                       help="quality, site: run nothing; write one table and plot from earlier runs' "
                            "quality.json (site.json) files")
    bench.add_argument("--site", metavar="DIR",
                       help="site: patients of one site (scripts/make_site_set.py writes simulated ones)")
    bench.add_argument("--left-out", help="site: comma-separated patients to leave out in turn (default: all)")
    bench.add_argument("--site-slices", type=_positive_int, default=3,
                       help="site: slices drawn per structure on each previous patient")
    bench.add_argument("--site-segments", help="site: comma-separated structures to keep (default: all)")
    bench.add_argument("--site-methods",
                       help="site: comma-separated methods to run (default: all): zero-shot, fresh-1, fresh-3, site, "
                            "site-warm")
    bench.add_argument("--site-previous", type=_positive_int,
                       help="site: at most this many previous patients per site adapter (default: all others)")
    bench.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)

    models = commands.add_parser("models", help="list base models, or download one")
    models.add_argument("--json", action="store_true")
    models.add_argument("--download", metavar="ID", help="download the official weights of ID (asks nothing)")
    models.add_argument("--progress", choices=("bar", "json"), default="bar",
                        help="download progress as a bar, or JSON lines for the Slicer worker")
    models.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    return parser


# --------------------------------------------------------------------------- commands

def _train_cases(args):
    """The volumes of ``train``: the --image/--labels pairs, then the --cases file's."""
    from .case_list import read_case_list
    from .pipeline import TrainCase

    images, labels = args.image or [], args.labels or []
    if len(images) != len(labels):
        raise UsageError(f"give one --labels per --image ({len(images)} --image, {len(labels)} --labels)")
    if not images and not args.cases:
        raise UsageError("give --image and --labels, or --cases FILE")
    cases = [TrainCase(image, label) for image, label in zip(images, labels)]
    if args.cases:
        cases += [TrainCase(e.image, e.labels, e.slices, e.absent)
                  for e in read_case_list(args.cases, labels_required=True)]
    if args.slices is not None and len(cases) > 1:
        raise UsageError("--slices applies to one volume; with several, put each volume's slices in the "
                         "'slices' column of --cases")
    if args.absent and len(cases) > 1:
        raise UsageError("--absent applies to one volume; with several, put each volume's marks in the "
                         "'absent' column of --cases (e.g. 'Thalamus_L=52 53; Caudate_R=18')")
    if args.slices:
        cases[0].slices = args.slices
    if args.absent:   # one volume: the options' marks join its line's
        cases[0].absent = _absent_marks([*cases[0].absent.items(), *args.absent])
    return cases


def _train(args, reporter, stop: StopRequest, distributed=None) -> int:
    from .adapters import preset_options
    from .host.adapter_metadata import load_adapter_metadata
    from .pipeline import TrainJob, run_training
    from .training import TrainingConfig

    cases = _train_cases(args)
    method, options = args.method or "salt", preset_options(args.method or "salt", args.rank or "default")
    if args.init:  # a continued adapter keeps its parent's method and options unless told otherwise
        parent = load_adapter_metadata(args.init)
        method = args.method or parent.method
        options = preset_options(method, args.rank) if args.rank else {}
    config = TrainingConfig(method=method, method_options=options,
                            steps=args.steps, seed=args.seed, device=args.device, precision=args.precision,
                            checkpoint_every=args.checkpoint_every)
    if args.learning_rate is not None:
        config = replace(config, learning_rate=args.learning_rate)
    if args.batch_size is not None:
        config = replace(config, batch_size=args.batch_size)
    # Every volume, the first included, is a case with its own slices and marks (a case list's first line too).
    job = TrainJob(image=None, labels=None, out=args.out, model_id=args.model, weights=args.weights,
                   segments=args.segments, axis=args.axis, intensity=args.intensity,
                   resample_labels=args.resample_labels, config=config, cases=cases, init=args.init)
    # The progress bar starts once the inputs are checked, so a bad input prints only its error line.
    outcome = run_training(job, on_step=reporter.train_step, should_stop=stop,
                           on_checkpoint=reporter.checkpoint, on_message=reporter.message,
                           on_ready=lambda: reporter.start("train", args.steps, device=args.device,
                                                           pid=os.getpid()),
                           distributed=distributed)
    if distributed is not None and not distributed.is_main:
        reporter.finished(outcome.result.steps_done, outcome.result.interrupted)
        return EXIT_INTERRUPTED if outcome.result.interrupted else EXIT_OK
    summary = dict(outcome.metadata.training,
                   memory_estimate_mib=outcome.memory_estimate.to_dict() if outcome.memory_estimate else None)
    if outcome.result.interrupted:
        reporter.message(f"stopped after {outcome.result.steps_done} steps; adapter saved to {outcome.adapter_path}")
    reporter.result({"adapter": str(outcome.adapter_path)}, summary)
    return EXIT_INTERRUPTED if outcome.result.interrupted else EXIT_OK


def _propagate(args, reporter, stop: StopRequest, distributed=None) -> int:
    from .pipeline import PropagateJob, run_propagation
    from .propagation import PropagationConfig

    if args.cases:
        if args.absent:
            raise UsageError("--absent applies to one volume; with --cases, put each volume's marks in the "
                             "'absent' column of the CSV file (e.g. 'Thalamus_L=52 53; Caudate_R=18')")
        return _propagate_cases(args, reporter, stop, distributed)
    if not args.image:
        raise UsageError("give --image (one volume) or --cases FILE (many)")
    mode = args.mode or ("box" if args.labels else "auto")
    config = PropagationConfig(mode=mode, slice_range=args.slice_range, threshold=args.threshold,
                               cleanup=not args.no_cleanup, device=args.device, precision=args.precision)
    job = PropagateJob(image=args.image, adapter=args.adapter, out=args.out, labels=args.labels,
                       weights=args.weights, resample_labels=args.resample_labels, match_by=args.match_by,
                       config=config, absent=_absent_marks(args.absent))
    outcome = run_propagation(job, on_progress=reporter.propagation_step, should_stop=stop, on_message=reporter.message,
                              on_ready=lambda: reporter.start("propagate", 0, device=args.device,
                                                              pid=os.getpid()))
    if outcome.result.interrupted:
        reporter.error("propagation stopped before the end; nothing was written", None)
        return EXIT_INTERRUPTED
    result = outcome.result
    for extent in result.extents:
        reporter.message(extent.describe())
    if result.estimate is not None:
        reporter.message(result.estimate.describe())
    for suggestion in result.suggestions:
        reporter.message(suggestion.describe())
    reporter.result({"segmentation": str(outcome.segmentation_path)},
                    {"slices": len(result.slices), "seconds": round(result.seconds, 2),
                     "mode": mode, "kept_labelled_slices": outcome.labelled_slices,
                     "extents": [e.to_dict() for e in result.extents],
                     "estimate": result.estimate.to_dict() if result.estimate else None,
                     "suggested_slices": [s.to_dict() for s in result.suggestions],
                     "kept_drawn_segments": [{"name": k.segment.name, "label": k.segment.label,
                                              "drawn_label": k.drawn_label} for k in outcome.kept_segments],
                     "memory_estimate_mib": outcome.memory_estimate.to_dict() if outcome.memory_estimate else None})
    return EXIT_OK


def _propagate_cases(args, reporter, stop: StopRequest, distributed=None) -> int:
    """``propagate --cases``: every volume of the list into ``--out`` (a folder), shared out across ranks."""
    from .batch_propagation import BatchJob, run_batch_propagation
    from .case_list import read_case_list
    from .propagation import PropagationConfig

    if args.image or args.labels:
        raise UsageError("with --cases, give each volume's image and labels in the CSV file, not --image/--labels")
    config = PropagationConfig(mode=args.mode or "box", slice_range=args.slice_range, threshold=args.threshold,
                               cleanup=not args.no_cleanup, device=args.device, precision=args.precision)
    job = BatchJob(cases=read_case_list(args.cases), adapter=args.adapter, folder=args.out, weights=args.weights,
                   resample_labels=args.resample_labels, match_by=args.match_by, config=config,
                   mode_given=args.mode is not None)
    main = distributed is None or distributed.is_main
    summary = run_batch_propagation(
        job, distributed=distributed, should_stop=stop, on_message=reporter.message,
        on_ready=lambda total: reporter.start("propagate", total, device=args.device, pid=os.getpid()),
        on_volume=reporter.propagation_step)
    if not main:
        return summary.exit_code
    for line in summary.table().splitlines():
        reporter.message(line)
    if summary.exit_code == EXIT_OK:
        reporter.result({"folder": str(summary.folder), "summary": str(summary.summary_path)}, summary.to_dict())
    elif summary.exit_code == EXIT_INTERRUPTED:
        reporter.error(f"stopped: {summary.describe()}; complete outputs are kept, rerun to finish", None)
    else:
        reporter.error(f"{summary.describe()}; see {summary.summary_path}",
                       "the summary names each failed volume and its error; rerun to retry them")
    return summary.exit_code


def _evaluate(args) -> int:
    from .metrics import format_table
    from .pipeline import evaluate_files
    from .report import json_safe

    report = evaluate_files(args.pred, args.ref, axis=args.axis, on_message=lambda text: print(text, file=sys.stderr))
    if args.json:
        print(json.dumps(json_safe(report.to_dict())))
    else:
        print(format_table(report))
    return EXIT_OK


def _models(args) -> int:
    from .models import MODEL_REGISTRY, cached_weights_path, download_weights, weights_available

    if args.download and args.progress == "json":
        return _download_json(args.download)
    if args.download:
        from tqdm import tqdm

        spec = MODEL_REGISTRY.get(args.download)
        size = f" (about {spec.approx_mib} MiB)" if spec and spec.approx_mib else ""
        print(f"downloading {args.download}{size}", file=sys.stderr)
        bar = tqdm(unit="B", unit_scale=True, file=sys.stderr)

        def progress(done: int, total: Optional[int]) -> None:
            bar.total = total
            bar.update(done - bar.n)

        path = download_weights(args.download, progress=progress)
        bar.close()
        print(path)
        return EXIT_OK
    rows = []
    for spec in MODEL_REGISTRY.values():
        path = cached_weights_path(spec.model_id)
        rows.append({"id": spec.model_id, "architecture": spec.architecture, "input_size": spec.default_input,
                     "input_sizes": list(spec.input_sizes), "parameters_millions": spec.parameters_millions,
                     "available": weights_available(spec.model_id), "downloadable": spec.url is not None,
                     "size_bytes": spec.approx_mib * 1024 * 1024 if spec.approx_mib else None,
                     "path": str(path) if path else None, "source": spec.source})
    if args.json:
        print(json.dumps(rows))
        return EXIT_OK
    print(f"{'id':<14}{'architecture':<44}{'input':>6}{'params':>9}  available")
    for row in rows:
        print(f"{row['id']:<14}{row['architecture']:<44}{row['input_size']:>6}{row['parameters_millions']:>8.1f}M"
              f"  {'yes' if row['available'] else 'no'}")
    return EXIT_OK


def _download_json(model_id: str) -> int:
    """``models --download ID --progress json``: the download as protocol events (the Slicer worker)."""
    import time

    from .models import download_weights

    emit("start", command="download", total=0, pid=os.getpid())
    last = [0.0, -1]

    def progress(done: int, total: Optional[int]) -> None:
        percent = int(100 * done / total) if total else -1
        now = time.monotonic()
        if done == total or (now - last[0] >= 0.5 and percent != last[1]):
            last[:] = [now, percent]
            emit("progress", phase="download", step=done, total=total or 0)

    path = download_weights(model_id, progress=progress)
    emit("result", outputs={"weights": str(path)}, summary={"model": model_id})
    return EXIT_OK


def _bench(args) -> int:
    from .atomic_files import atomic_path
    from .bench import cases, quality, speed

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    say = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    if args.kind == "site":
        from .bench import site

        if args.merge:
            results = site.merge_site_results([site.SiteResults.from_dict(json.loads(Path(p.strip()).read_text()))
                                               for p in args.merge.split(",") if p.strip()])
            paths = site.write_site_outputs(results, out)
            print(site.site_table(results))
            print("wrote " + ", ".join(str(p) for p in paths))
            return EXIT_OK
        if not args.site:
            raise UsageError("bench site needs --site DIR (patients of one site; scripts/make_site_set.py)")
        unknown = [m for m in (args.site_methods or "").split(",") if m and m not in site.METHOD_KEYS]
        if unknown:
            raise UsageError(f"unknown --site-methods {', '.join(unknown)} (choose from "
                             f"{', '.join(site.METHOD_KEYS)})")
        patients = cases.development_cases(args.site)
        left_out = [n.strip() for n in args.left_out.split(",")] if args.left_out else None
        results = site.bench_site(patients, left_out, steps=args.steps, site_slices=args.site_slices,
                                  seed=args.seeds[0], folder=out / "site-adapters", say=say,
                                  on_update=lambda so_far: site.write_site_outputs(so_far, out),
                                  segments=args.site_segments.split(",") if args.site_segments else None,
                                  most_previous=args.site_previous,
                                  methods=[site.METHOD_KEYS[m] for m in args.site_methods.split(",") if m]
                                  if args.site_methods else site.METHODS)
        paths = site.write_site_outputs(results, out)
        print(site.site_table(results))
        print("wrote " + ", ".join(str(p) for p in paths))
        return EXIT_OK
    if args.kind == "speed":
        results = speed.bench_speed(tuple(args.models.split(",")), args.repeats, say, args.vit_input_size)
        with atomic_path(out / "speed.json") as temporary:
            temporary.write_text(json.dumps(results, indent=2))
        print(json.dumps(results))
        return EXIT_OK
    if args.merge:
        parts = [quality.QualityResults.from_dict(json.loads(Path(p.strip()).read_text()))
                 for p in args.merge.split(",") if p.strip()]
        results = quality.merge_results(parts)
        paths = quality.write_quality_outputs(results, out)
        print(quality.quality_table(results))
        print("wrote " + ", ".join(str(p) for p in paths))
        return EXIT_OK
    if bool(args.image) != bool(args.labels):
        raise ValueError("Give both --image and --labels (a full reference), or neither")
    if args.image:
        chosen = [cases.load_case(Path(args.image).name, args.image, args.labels, args.axis)]
    elif args.dev:
        names = [n.strip() for n in args.cases.split(",")] if args.cases else None
        chosen = [cases.sample_case()] + cases.development_cases(args.dev, names)
        if names:
            chosen = [c for c in chosen if c.name in names]
    else:
        chosen = [cases.sample_case()]
    results = quality.bench_quality(chosen, tuple(args.counts), tuple(args.methods.split(",")), tuple(args.seeds),
                                    args.steps, args.protocol, oracle=not args.no_oracle,
                                    suggest=not args.no_suggestion, say=say)
    paths = quality.write_quality_outputs(results, out)
    print(quality.quality_table(results))
    print("wrote " + ", ".join(str(p) for p in paths))
    return EXIT_OK


def _demo(args, reporter, stop: StopRequest) -> int:
    from .demo import run_demo

    return run_demo(Path(args.out), method=args.method, steps=args.steps, mode=args.mode,
                    labelled_count=args.labelled, device=args.device, should_stop=stop, reporter=reporter)


# --------------------------------------------------------------------------- errors

def _is_out_of_memory(error: BaseException) -> bool:
    """MemoryError, torch's OutOfMemoryError (CUDA), or the CPU allocator's RuntimeError."""
    if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def _hint(error: BaseException, command: str = "") -> Optional[str]:
    """A one-line suggestion for the errors a user can meet (see README "Troubleshooting")."""
    from .adapter_file import AdapterFileError
    from .models import UnknownModelError, WeightsError
    from .pipeline import GridMismatchError

    if getattr(error, "hint", None):
        return str(error.hint)
    if _is_out_of_memory(error):
        if command == "train":
            return "lower --batch-size (e.g. --batch-size 1), train fewer --segments or label fewer --slices"
        if command == "propagate":
            return "propagate part of the volume with --range FIRST:LAST, or use --device cpu"
        return "close other programs, or run on a smaller volume"
    if isinstance(error, GridMismatchError):
        return "export the segmentation on the image's grid, or pass --resample-labels"
    if isinstance(error, AdapterFileError):
        return "check that the adapter was trained with the same base model (see its metadata)"
    if isinstance(error, WeightsError):
        return "run 'saltsegment models' to see which weights are available"
    if isinstance(error, UnknownModelError):
        return "run 'saltsegment models' for the list of ids"
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return "free disk space and run again; no partial file was left behind"
    if isinstance(error, PermissionError):
        return "choose an output folder you can write to"
    return None


def _message(error: BaseException) -> str:
    if isinstance(error, OSError) and error.errno == errno.ENOSPC:
        return f"disk full while writing {error.filename or 'an output file'}"
    if _is_out_of_memory(error):
        where = "on the GPU" if type(error).__name__ == "OutOfMemoryError" else "in main memory"
        return f"out of memory {where}"
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.strerror}: {error.filename}"
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error)).strip().splitlines()  # no terminal colour codes
    return text[0] if text else type(error).__name__


def _join_torchrun(args):
    """This process's rank when torchrun started it (process group joined), else None."""
    from .distributed import Distributed

    distributed = Distributed.from_environment(args.device)
    if distributed is not None:
        distributed.start()
    return distributed


def main(argv: Optional[Sequence[str]] = None) -> int:
    from .allocator import return_large_blocks_to_the_system, use_huge_pages_for_large_tensors

    use_huge_pages_for_large_tensors()  # before torch is imported: PyTorch reads the switch once
    from .pipeline import JobStopped
    from .progress import make_reporter

    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    return_large_blocks_to_the_system()
    reporter = make_reporter(getattr(args, "progress", "bar"))
    stop = StopRequest(getattr(args, "stop_file", None))
    if args.command in ("train", "propagate", "demo"):  # they poll it; the others keep the default: stop at once
        stop.install()
    distributed, code = None, EXIT_ERROR
    try:
        if args.command in ("train", "propagate"):
            distributed = _join_torchrun(args)
            if distributed is not None and not distributed.is_main:  # progress and results come from rank 0 only
                from .progress import RankReporter

                reporter = RankReporter(distributed.rank)
        if args.command == "train":
            code = _train(args, reporter, stop, distributed)
            return code
        if args.command == "propagate":
            code = _propagate(args, reporter, stop, distributed)
            return code
        if args.command == "evaluate":
            return _evaluate(args)
        if args.command == "models":
            return _models(args)
        if args.command == "bench":
            return _bench(args)
        return _demo(args, reporter, stop)
    except KeyboardInterrupt:
        reporter.error("interrupted", None)
        return EXIT_INTERRUPTED
    except UsageError as error:
        reporter.error(str(error), error.hint)
        return EXIT_USAGE
    except JobStopped as stopped:  # stopped before anything worth keeping: nothing was written
        reporter.error(str(stopped), None)
        code = EXIT_INTERRUPTED  # every rank stops at the same point: they can leave together
        return code
    except Exception as error:  # the one place errors become one line for the user
        if args.debug:
            traceback.print_exc()
        reporter.error(_message(error), _hint(error, args.command))
        return EXIT_ERROR
    finally:
        reporter.close()
        if distributed is not None:
            distributed.close(together=code in (EXIT_OK, EXIT_INTERRUPTED))


if __name__ == "__main__":
    sys.exit(main())
