"""``saltsegment bench speed``: what each method costs, as ratios measured in one process.

In one process, same base model, batch and input size, train steps of every
method are interleaved and their medians compared (ratios are what travels
between machines); inference per slice for the base model, an unmerged and a
merged adapter; peak RSS of a real ``train`` and ``propagate`` child process.
"""

from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .. import preprocessing as pp
from ..adapters import merge_adapters
from ..models import load_model
from ..sample_data import sample_paths, spread_slices
from ..training import FewShotData, FewShotTrainer, TrainingConfig
from ..volume_io import read_image, read_label_map, write_label_map

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
