"""Measure what huge pages for large tensors change: time, system time and peak memory of real CLI runs.

Every ``saltsegment`` command asks PyTorch to put tensors of 2 MiB or more
on transparent huge pages (:mod:`SALTSegmentLib.allocator`). The setting is
read once per process, so the comparison runs child processes, alternating
the default with ``THP_MEM_ALLOC_ENABLE=0`` (the allocator as it was): a
short ``train`` on the embedded sample (5 labelled slices) and a box
``propagate`` of the whole volume with that adapter. It prints each run and
the medians, with the ratio of the default to the old allocator (Linux
only: it needs ``os.wait4``; the kernel's huge pages must be on ``always``
or ``madvise``, which it prints).

    python scripts/measure_allocator.py [--steps 8] [--repeats 2]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from measure_memory import draw, run_child
from SALTSegmentLib.sample_data import sample_paths
from SALTSegmentLib.volume_io import read_label_map

SETTINGS = {"before (THP_MEM_ALLOC_ENABLE=0)": {"THP_MEM_ALLOC_ENABLE": "0"}, "huge pages (default)": {}}
MEASURES = (("seconds", "wall s"), ("user_seconds", "user s"), ("system_seconds", "system s"), ("peak_mib", "peak MiB"))


def kernel_setting() -> str:
    path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    return path.read_text().strip() if path.exists() else "not available"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="training steps of each train run")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each setting, interleaved")
    args = parser.parse_args()
    print(f"transparent huge pages: {kernel_setting()}", flush=True)
    image, labels = sample_paths()
    reference, geometry, segments = read_label_map(labels)
    rows: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory() as temporary:
        folder = Path(temporary)
        drawn = draw(folder, "sample", reference, geometry, segments, 5)
        for repeat in range(args.repeats):
            for setting, environment in SETTINGS.items():
                adapter = folder / f"adapter{repeat}.safetensors"
                commands = {
                    "train": ["train", "--image", str(image), "--labels", str(drawn), "--steps", str(args.steps),
                              "--out", str(adapter)],
                    "propagate": ["propagate", "--image", str(image), "--adapter", str(adapter), "--labels",
                                  str(drawn), "--out", str(folder / "box.seg.nrrd")]}
                for job, command in commands.items():
                    row = run_child(command, environment)
                    rows.setdefault((job, setting), []).append(row)
                    print(f"{job:9s} {setting:32s} exit {row['exit']}  "
                          + "  ".join(f"{label} {row[key]}" for key, label in MEASURES), flush=True)
    print("\nmedians, and the default / before")
    for job in ("train", "propagate"):
        medians = {setting: {key: statistics.median(r[key] for r in rows[(job, setting)]) for key, _ in MEASURES}
                   for setting in SETTINGS}
        before, after = (medians[setting] for setting in SETTINGS)
        print(f"{job:9s} " + "  ".join(f"{label} {before[key]:.1f} -> {after[key]:.1f} "
                                        f"({after[key] / before[key]:.2f}x)" if before[key] else f"{label} -"
                                        for key, label in MEASURES))
    return 0 if all(r["exit"] == 0 for runs in rows.values() for r in runs) else 1


if __name__ == "__main__":
    sys.exit(main())
