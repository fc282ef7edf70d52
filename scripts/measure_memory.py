"""Measure the peak memory of real ``saltsegment`` runs against the pre-check's estimate.

Each scenario runs ``python -m SALTSegmentLib.cli train|propagate`` as a
child process; its peak resident set size comes from ``os.wait4``
(``ru_maxrss``), its estimate from the ``memory_estimate_mib`` the command
reports in its result event. Inputs: the embedded sample (124 x 116 x 62, eight
structures) with 5 and 15 labelled slices, and a synthetic CT-sized volume
(512 x 512 x 60 int16, three organs) with 5 and 15. The constants in
``preflight.py`` are calibrated from this table (POSIX only: it needs
``os.wait4``).

    python scripts/measure_memory.py --out memory.json [--steps 40] [--only train_sample5,...]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

import numpy as np
import SimpleITK as sitk

from SALTSegmentLib.sample_data import sample_paths, spread_slices
from SALTSegmentLib.volume_io import Segment, VolumeGeometry, read_label_map, write_label_map
from SALTSegmentLib.worker_protocol import parse_line

CT_ORGANS = [  # label, name, centre (z, y, x), radii, Hounsfield units
    (1, "liver", (30, 230, 180), (25, 60, 50), 60),
    (2, "spleen", (30, 300, 330), (20, 40, 40), 150),
    (3, "kidney", (30, 200, 330), (15, 30, 30), -50),
]


def make_ct(folder: Path) -> tuple[Path, np.ndarray, VolumeGeometry, list[Segment]]:
    """A 512 x 512 x 60 CT-like volume (0.8 x 0.8 x 2.5 mm): a body ellipse with three organs and noise."""
    z, y, x = np.ogrid[0:60, 0:512, 0:512]
    ct = np.full((60, 512, 512), -1000, np.int16)
    ct[np.broadcast_to(((x - 256) / 220.0) ** 2 + ((y - 256) / 170.0) ** 2 < 1, ct.shape)] = 40
    labels = np.zeros(ct.shape, np.uint8)
    for label, _, (cz, cy, cx), (rz, ry, rx), units in CT_ORGANS:
        inside = ((z - cz) / rz) ** 2 + ((y - cy) / ry) ** 2 + ((x - cx) / rx) ** 2 < 1
        ct[inside] = units
        labels[inside] = label
    ct = (ct + np.random.default_rng(0).normal(0, 10, ct.shape)).astype(np.int16)
    image = sitk.GetImageFromArray(ct)
    image.SetSpacing((0.8, 0.8, 2.5))
    path = folder / "ct.nrrd"
    sitk.WriteImage(image, str(path), useCompression=True)
    segments = [Segment(label, name, (0.5, 0.5, 0.5)) for label, name, *_ in CT_ORGANS]
    return path, labels, VolumeGeometry.from_image(image), segments


def draw(folder: Path, name: str, reference: np.ndarray, geometry: VolumeGeometry, segments: list[Segment],
         count: int) -> Path:
    """The reference kept on ``count`` spread axial slices: what a user would have drawn."""
    slices = spread_slices(reference, count)
    drawn = np.zeros_like(reference)
    drawn[slices] = reference[slices]
    return write_label_map(folder / f"{name}_drawn{count}.seg.nrrd", drawn, geometry, segments)


def run_child(args: list[str], environment: Optional[dict[str, str]] = None) -> dict:
    """Run one CLI command; its exit code, peak RSS (MiB), seconds (wall, user, system) and its estimate.

    ``environment`` adds to (or overrides) this process's environment.
    """
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), **(environment or {}))
    started = time.perf_counter()
    with tempfile.TemporaryFile("w+") as stdout:
        child = subprocess.Popen([sys.executable, "-m", "SALTSegmentLib.cli", *args, "--progress", "json"],
                                 stdout=stdout, stderr=subprocess.DEVNULL, env=env)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        stdout.seek(0)
        events = [event for event in map(parse_line, stdout.read().splitlines()) if event]
    result = next((e for e in reversed(events) if e["event"] == "result"), {})
    estimate = (result.get("summary") or {}).get("memory_estimate_mib") or {}
    peak = usage.ru_maxrss / 1024 if sys.platform != "darwin" else usage.ru_maxrss / 2 ** 20
    return {"exit": child.returncode, "peak_mib": round(peak), "estimate_mib": estimate.get("total_mib"),
            "terms_mib": {k: v for k, v in estimate.items() if k != "total_mib"},
            "seconds": round(time.perf_counter() - started, 1), "user_seconds": round(usage.ru_utime, 1),
            "system_seconds": round(usage.ru_stime, 1)}


def scenarios(folder: Path, steps: int) -> dict[str, list[str]]:
    image, labels = sample_paths()
    reference, geometry, segments = read_label_map(labels)
    ct, ct_reference, ct_geometry, ct_segments = make_ct(folder)
    inputs = {}
    for count in (5, 15):
        inputs[f"sample{count}"] = (image, draw(folder, "sample", reference, geometry, segments, count), "auto")
        inputs[f"ct{count}"] = (ct, draw(folder, "ct", ct_reference, ct_geometry, ct_segments, count), "abdomen")
    runs = {}
    for name, (volume, drawn, intensity) in inputs.items():
        runs[f"train_{name}"] = ["train", "--image", str(volume), "--labels", str(drawn), "--intensity", intensity,
                                 "--steps", str(steps), "--out", str(folder / f"{name}.safetensors")]
    for name in ("sample", "ct"):
        volume, drawn, _ = inputs[f"{name}5"]
        adapter = str(folder / f"{name}5.safetensors")
        runs[f"propagate_{name}_box"] = ["propagate", "--image", str(volume), "--adapter", adapter, "--labels",
                                         str(drawn), "--out", str(folder / f"{name}_box.seg.nrrd")]
        runs[f"propagate_{name}_auto"] = ["propagate", "--image", str(volume), "--adapter", adapter,
                                          "--out", str(folder / f"{name}_auto.seg.nrrd")]
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("memory.json"))
    parser.add_argument("--steps", type=int, default=40, help="training steps (the CLI's default is 40)")
    parser.add_argument("--only", help="comma-separated scenario names (propagation needs its train_*5 run)")
    args = parser.parse_args()
    rows = {}
    with tempfile.TemporaryDirectory() as temporary:
        runs = scenarios(Path(temporary), args.steps)
        chosen = args.only.split(",") if args.only else list(runs)
        for name in chosen:
            rows[name] = run_child(runs[name])
            row = rows[name]
            ratio = row["peak_mib"] / row["estimate_mib"] if row["estimate_mib"] else float("nan")
            print(f"{name:24s} exit {row['exit']}  peak {row['peak_mib']:6d} MiB  estimate {row['estimate_mib']} MiB"
                  f"  peak/estimate {ratio:.2f}  {row['seconds']:.0f} s", flush=True)
    args.out.write_text(json.dumps(rows, indent=2) + "\n")
    return 0 if all(row["exit"] == 0 for row in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
