"""Image-encoder time per slice on this machine's CPU: LiteMedSAM and ViT-B at 256 and 512 px.

Batch 1, ``torch.inference_mode``, a fixed number of threads, fp32 and bf16
autocast. Repetitions are interleaved across the configurations (so a burst
of load from other processes hits all of them alike) and the median is
reported. LiteMedSAM uses its real weights; ViT-B random weights (speed does
not depend on the values).

With ``--batches 1,2,4`` it measures instead how the time per slice (fp32)
changes when slices are encoded together, as propagation does
(``PropagationConfig.batch_size``): the same slices, in batches of each size,
interleaved, and the ratio of each to the first size.

Run: ``python scripts/measure_encoder_speed.py [--repeats 5] [--threads 2] [--models lite_medsam,sam_vit_b@256,...]``
or ``python scripts/measure_encoder_speed.py --models lite_medsam --batches 1,2,4``.
Prints a table, then one JSON line (``{"benchmark": "encoder_speed", ...}`` or ``"encoder_batch"``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

DEFAULT_MODELS = "lite_medsam,sam_vit_b@256,sam_vit_b@512"


def build(name: str):
    from SALTSegmentLib.models import load_model

    model_id, _, size = name.partition("@")
    torch.manual_seed(0)
    model = load_model(model_id, input_size=int(size) if size else None, pretrained=model_id == "lite_medsam")
    return model.eval()


def forward_seconds(model, image: torch.Tensor, dtype: torch.dtype) -> float:
    size = model.input_size
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        start = time.perf_counter()
        embedding = model.encode(image, (size, size))
        elapsed = time.perf_counter() - start
    assert embedding.shape[:2] == (1, 256) and torch.isfinite(embedding.float()).all()
    return elapsed


def batch_seconds_per_slice(model, images: torch.Tensor, batch: int) -> float:
    """Encode ``images`` ``batch`` at a time (fp32, inference mode); seconds per slice."""
    size = model.input_size
    with torch.inference_mode():
        start = time.perf_counter()
        for first in range(0, images.shape[0], batch):
            model.encode(images[first:first + batch], (size, size))
        return (time.perf_counter() - start) / images.shape[0]


def measure_batches(models: dict, batches: list[int], repeats: int, threads: int) -> None:
    """Time per slice at each batch size, interleaved, as a ratio to the first size."""
    generator = torch.Generator().manual_seed(0)
    slices = max(batches)
    results = []
    for model in models.values():
        images = torch.rand(slices, 3, model.input_size, model.input_size, generator=generator)
        batch_seconds_per_slice(model, images, batches[0])   # warm-up
        times: dict[int, list[float]] = {b: [] for b in batches}
        for _ in range(repeats):
            for b in batches:
                times[b].append(batch_seconds_per_slice(model, images, b))
        medians = {b: statistics.median(t) for b, t in times.items()}
        print(f"{model.model_id} at {model.input_size} px, {slices} slices, {threads} threads, median of {repeats}")
        print(f"{'batch':>6}{'s / slice':>11}{'ratio':>8}")
        for b in batches:
            print(f"{b:>6}{medians[b]:>11.3f}{medians[b] / medians[batches[0]]:>8.2f}")
        results.append({"model": model.model_id, "input": model.input_size,
                        "seconds_per_slice": {str(b): round(m, 4) for b, m in medians.items()},
                        "ratio": {str(b): round(medians[b] / medians[batches[0]], 3) for b in batches},
                        "all_s": {str(b): [round(t, 4) for t in times[b]] for b in batches}})
    print(json.dumps({"benchmark": "encoder_batch", "threads": threads, "repeats": repeats,
                      "torch": torch.__version__, "results": results}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", default=DEFAULT_MODELS)
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes, e.g. 1,2,4")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    models = {name: build(name) for name in args.models.split(",")}
    if args.batches:
        measure_batches(models, [int(b) for b in args.batches.split(",")], args.repeats, args.threads)
        return
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    configs = [(name, dtype_name) for name in models for dtype_name in dtypes]
    generator = torch.Generator().manual_seed(0)
    images = {name: torch.rand(1, 3, model.input_size, model.input_size, generator=generator)
              for name, model in models.items()}

    for name, dtype_name in configs:  # warm-up (allocator, kernels, autocast caches)
        forward_seconds(models[name], images[name], dtypes[dtype_name])
    times: dict[tuple[str, str], list[float]] = {config: [] for config in configs}
    for _ in range(args.repeats):
        for name, dtype_name in configs:
            times[(name, dtype_name)].append(forward_seconds(models[name], images[name], dtypes[dtype_name]))

    print(f"Image encoder, batch 1, {args.threads} threads, median of {args.repeats} "
          f"(torch {torch.__version__}, {platform.processor() or platform.machine()})")
    print(f"{'model':<16}{'input':>7}{'params (M)':>12}{'fp32 (s)':>11}{'bf16 (s)':>11}")
    results = []
    for name, model in models.items():
        fp32 = statistics.median(times[(name, "fp32")])
        bf16 = statistics.median(times[(name, "bf16")])
        parameters = sum(p.numel() for p in model.image_encoder.parameters()) / 1e6
        print(f"{model.model_id:<16}{model.input_size:>7}{parameters:>12.1f}{fp32:>11.3f}{bf16:>11.3f}")
        results.append({"model": model.model_id, "input": model.input_size, "encoder_params_m": round(parameters, 2),
                        "fp32_s": round(fp32, 4), "bf16_s": round(bf16, 4),
                        "fp32_all_s": [round(t, 4) for t in times[(name, "fp32")]],
                        "bf16_all_s": [round(t, 4) for t in times[(name, "bf16")]]})
    print(json.dumps({"benchmark": "encoder_speed", "threads": args.threads, "repeats": args.repeats,
                      "torch": torch.__version__, "results": results}))


if __name__ == "__main__":
    main()
