"""``saltsegment bench speed|quality``: the numbers behind the defaults, reproducible by one command each.

Speed: in one process, same base model, batch and input size, train steps of
every method are interleaved and their medians compared (ratios are what
travels between machines); inference per slice for the base model, an
unmerged and a merged adapter; peak RSS of a real ``train`` and ``propagate``
child process. Quality: Dice on the slices the model filled in, against the
number of labelled slices, per method and seed, plus zero-shot box prompts
from the reference as the bar to beat.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from . import preprocessing as pp
from .adapters import merge_adapters
from .metrics import evaluate_label_maps
from .models import load_model
from .propagation import PropagationConfig, VolumePropagator
from .sample_data import sample_paths, spread_slices
from .training import FewShotData, FewShotTrainer, TrainingConfig
from .volume_io import read_image, read_label_map, write_label_map

SPEED_METHODS = ("salt", "lora", "ssam", "decoder", "prompts")


def _sample(labelled_count: int = 5, image_path=None, labels_path=None):
    image_path, labels_path = (image_path, labels_path) if image_path else sample_paths()
    image, geometry = read_image(image_path)
    reference, _, segments = read_label_map(labels_path)
    labelled = spread_slices(reference, labelled_count)
    drawn = np.zeros_like(reference)
    drawn[labelled] = reference[labelled]
    return image, geometry, reference, segments, labelled, drawn


def _trainer(model_id: str, method: str, data: FewShotData, input_size: Optional[int]) -> FewShotTrainer:
    pretrained = model_id == "lite_medsam"
    model = load_model(model_id, pretrained=pretrained, input_size=input_size)
    if method == "prompts":  # the floor: frozen model, only the prompt tokens learn
        trainer = FewShotTrainer(model, data, TrainingConfig(method="decoder"))
        model.requires_grad_(False)
    else:
        trainer = FewShotTrainer(model, data, TrainingConfig(method=method))
    trainer.prepare()
    trainer.step()  # warm-up: allocator and kernel choice
    return trainer


def _child_peak_rss_mb(arguments: list[str]) -> tuple[float, float]:
    """Run the CLI in a child; return (peak RSS in MB, wall seconds) of that child alone."""
    start = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "SALTSegmentLib.cli", *arguments],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"benchmark child failed: {' '.join(arguments)}: {process.stderr.read().decode()[-500:]}")
    return usage.ru_maxrss / 1024.0, seconds


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def bench_speed(models: tuple[str, ...] = ("lite_medsam", "sam_vit_b"), repeats: int = 5,
                say: Callable[[str], None] = print, vit_input_size: int = 256) -> dict:
    """Median train-step times per method, inference overhead, propagation throughput and peak RSS."""
    image, geometry, _, segments, labelled, drawn = _sample()
    data = FewShotData(image, drawn, geometry.spacing, segments, pp.parse_intensity("auto", image), "axial", labelled)
    results: dict = {"threads": torch.get_num_threads(), "repeats": repeats, "train_step_s": {}}
    # Children first: a forked child's peak RSS starts at its parent's, so measure while this process is small.
    results.update(_process_costs(image, drawn, geometry, segments))
    for model_id in models:
        input_size = 256 if model_id == "lite_medsam" else vit_input_size
        say(f"train steps: {model_id} @ {input_size}, batch 2, methods {', '.join(SPEED_METHODS)}")
        trainers = {method: _trainer(model_id, method, data, input_size) for method in SPEED_METHODS}
        times: dict[str, list[float]] = {method: [] for method in SPEED_METHODS}
        for _ in range(repeats):
            for method, trainer in trainers.items():
                _synchronize()
                start = time.perf_counter()
                trainer.step()
                _synchronize()
                times[method].append(time.perf_counter() - start)
        medians = {method: statistics.median(values) for method, values in times.items()}
        results["train_step_s"][f"{model_id}@{input_size}"] = {
            "median_s": {m: round(v, 3) for m, v in medians.items()},
            "ratio_to_lora": {m: round(v / medians["lora"], 3) for m, v in medians.items()}}
        if model_id == "lite_medsam":
            results["inference_per_slice_s"] = _inference_overhead(trainers["salt"], data, repeats)
        del trainers
    if torch.cuda.is_available():
        results["peak_cuda_mb_training"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return results


@torch.inference_mode()
def _inference_overhead(trained: FewShotTrainer, data: FewShotData, repeats: int) -> dict:
    """Encoder + decoder time per slice: base model vs SALT unmerged vs SALT merged."""
    import copy

    base = load_model("lite_medsam")
    unmerged = trained.model
    merged = merge_adapters(copy.deepcopy(unmerged))
    tokens = trained.prompts.tokens.detach()
    volume01 = data.intensity.apply(data.image)
    geometry = pp.slice_geometry_for(data.image.shape[1:], pp.slice_pixel_spacing(data.spacing, "axial"), 256)
    inputs = torch.stack([pp.slice_to_input(pp.rescale_slice(volume01[i]), geometry) for i in (20, 30)])
    variants = {"base": base, "unmerged": unmerged, "merged": merged}
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, model in variants.items():
            start = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=trained.dtype is not None):
                embeddings = model.encode(inputs, geometry.resized_shape)
                for row in range(inputs.shape[0]):
                    model.decode(embeddings[row:row + 1], tokens)
            times[name].append((time.perf_counter() - start) / inputs.shape[0])
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {"median_s": {k: round(v, 3) for k, v in medians.items()},
            "ratio_to_base": {k: round(v / medians["base"], 3) for k, v in medians.items()}}


def _process_costs(image, drawn, geometry, segments) -> dict:
    """Peak RSS and wall time of real CLI children: train (3 steps) and a whole-volume propagation."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        labels = write_label_map(folder / "drawn.seg.nrrd", drawn, geometry, segments)
        image_path, _ = sample_paths()
        adapter = folder / "adapter.safetensors"
        train_rss, _ = _child_peak_rss_mb(["train", "--image", str(image_path), "--labels", str(labels),
                                           "--out", str(adapter), "--steps", "3", "--progress", "json"])
        propagate_rss, propagate_s = _child_peak_rss_mb(
            ["propagate", "--image", str(image_path), "--adapter", str(adapter), "--out", str(folder / "s.nrrd"),
             "--mode", "auto", "--progress", "json"])
    slices = image.shape[0]
    result = {"peak_rss_mb": {"train": round(train_rss), "propagate": round(propagate_rss)},
              "propagation": {"slices": slices, "wall_s_including_start": round(propagate_s, 1),
                              "slices_per_s": round(slices / propagate_s, 2)}}
    return result


@dataclass
class QualityRun:
    method: str
    labelled: int
    seed: int
    mean_dice: float
    dice: dict
    train_s: float


@dataclass
class QualityResults:
    runs: list[QualityRun] = field(default_factory=list)
    zero_shot: dict = field(default_factory=dict)


def zero_shot_box_dice(image, geometry, reference, segments, exclude: set[int]) -> dict:
    """Mean slice Dice of the base model prompted with the reference box (+5 px) on every slice: an oracle."""
    from .predictor import SlicePredictor

    predictor = SlicePredictor(load_model("lite_medsam"))
    volume01 = pp.parse_intensity("auto", image).apply(image)
    spacing = pp.slice_pixel_spacing(geometry.spacing, "axial")
    scores: dict[str, list[float]] = {s.name: [] for s in segments}
    for index in range(image.shape[0]):
        present = [s for s in segments if (reference[index] == s.label).any()]
        if index in exclude or not present:
            continue
        predictor.set_slice(volume01[index], spacing)
        boxes = np.stack([pp.mask_box(reference[index] == s.label, 5) for s in present])
        logits, _ = predictor.predict_boxes(boxes)
        for segment, mask in zip(present, logits.numpy() > 0):
            truth = reference[index] == segment.label
            scores[segment.name].append(2 * (mask & truth).sum() / (mask.sum() + truth.sum()))
    return {name: round(float(np.mean(values)), 4) for name, values in scores.items() if values}


def bench_quality(counts=(1, 3, 5, 9), methods=("salt", "lora", "ssam", "decoder"), seeds=(0, 1), steps: int = 40,
                  mode: str = "box", image_path=None, labels_path=None,
                  say: Callable[[str], None] = print) -> QualityResults:
    """Dice on unlabelled slices vs the number of labelled slices, for each method and seed."""
    results = QualityResults()
    for count in counts:
        image, geometry, reference, segments, labelled, drawn = _sample(count, image_path, labels_path)
        for method in methods:
            for seed in seeds:
                data = FewShotData(image, drawn, geometry.spacing, segments, pp.parse_intensity("auto", image),
                                   "axial", labelled)
                trainer = FewShotTrainer(load_model("lite_medsam"), data,
                                         TrainingConfig(method=method, steps=steps, seed=seed))
                trained = trainer.run()
                merge_adapters(trainer.model)
                propagated = VolumePropagator(trainer.model, trainer.prompts, segments, data.intensity, "axial",
                                              PropagationConfig(mode=mode)).run(image, geometry.spacing, drawn,
                                                                                labelled)
                unseen = evaluate_label_maps(propagated.labels, reference, segments, geometry.spacing, "axial",
                                             exclude_slices=set(labelled))
                run = QualityRun(method, count, seed, round(unseen.mean_dice, 4),
                                 {s.name: round(s.dice, 4) for s in unseen.segments}, round(trained.train_seconds, 1))
                results.runs.append(run)
                say(f"{count} labelled, {method}, seed {seed}: mean Dice {run.mean_dice:.3f} ({run.train_s:.0f} s)")
    image, geometry, reference, segments, labelled, _ = _sample(5, image_path, labels_path)
    results.zero_shot = zero_shot_box_dice(image, geometry, reference, segments, exclude=set())
    return results


def quality_table(results: QualityResults) -> str:
    """Markdown: mean Dice (over seeds) per method and number of labelled slices."""
    counts = sorted({run.labelled for run in results.runs})
    methods = list(dict.fromkeys(run.method for run in results.runs))
    lines = ["| method | " + " | ".join(f"{c} slices" for c in counts) + " |",
             "|---|" + "---|" * len(counts)]
    for method in methods:
        cells = []
        for count in counts:
            values = [r.mean_dice for r in results.runs if r.method == method and r.labelled == count]
            cells.append(f"{np.mean(values):.3f} ± {np.std(values):.3f}" if values else "")
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    if results.zero_shot:
        oracle = float(np.mean(list(results.zero_shot.values())))
        lines.append("| zero-shot, reference box on every slice (oracle) | " + " | ".join(
            f"{oracle:.3f}" for _ in counts) + " |")
    return "\n".join(lines)


def write_quality_outputs(results: QualityResults, folder: Path) -> tuple[Path, Path, Path]:
    """quality.json, quality.md and quality.png (Dice vs labelled slices, one line per method)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from .atomic_files import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    json_path, md_path, png_path = folder / "quality.json", folder / "quality.md", folder / "quality.png"
    with atomic_path(json_path) as temporary:
        temporary.write_text(json.dumps({"runs": [r.__dict__ for r in results.runs],
                                         "zero_shot_oracle_box": results.zero_shot}, indent=2))
    with atomic_path(md_path) as temporary:
        temporary.write_text(quality_table(results) + "\n")
    figure = Figure(figsize=(6, 4), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    for method in dict.fromkeys(run.method for run in results.runs):
        counts = sorted({r.labelled for r in results.runs if r.method == method})
        means = [np.mean([r.mean_dice for r in results.runs if r.method == method and r.labelled == c])
                 for c in counts]
        axes.plot(counts, means, marker="o", label=method)
    if results.zero_shot:
        axes.axhline(float(np.mean(list(results.zero_shot.values()))), color="grey", linestyle="--",
                     label="zero-shot oracle box")
    axes.set_xticks(sorted({run.labelled for run in results.runs}))
    axes.set_xlabel("labelled slices")
    axes.set_ylabel("mean Dice, unlabelled slices")
    axes.set_ylim(0, 1)
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(png_path) as temporary:
        figure.savefig(temporary, format="png")
    return json_path, md_path, png_path
