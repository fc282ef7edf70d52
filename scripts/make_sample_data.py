"""Make the embedded real sample from Debian's ``mricron-data`` package.

Input: the Colin27 "ch2" T1 MR template and the AAL atlas on the same 1 mm grid
(``/usr/share/mricron/templates``; ``apt-get install mricron-data``; BSD-3 per
the package's copyright file). Output, under ``Resources/SampleData``:

- ``ch2_deep_grey_t1.nrrd``: a crop of the T1 around the deep grey matter;
- ``ch2_deep_grey_labels.seg.nrrd``: eight AAL structures relabelled 1..8,
  with names and colours in the Slicer segmentation header.

Run: ``python scripts/make_sample_data.py [--templates DIR] [--out DIR]``.
The crop keeps the original physical geometry (origin shifted, direction kept).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SALTSegment"))

from SALTSegmentLib.volume_io import Segment, VolumeGeometry, write_label_map  # noqa: E402

# AAL value -> (name, colour). Left/right kept apart: laterality matters.
STRUCTURES = {
    77: ("Thalamus_L", (0.00, 0.57, 0.79)),
    78: ("Thalamus_R", (0.47, 0.78, 0.93)),
    71: ("Caudate_L", (0.85, 0.33, 0.10)),
    72: ("Caudate_R", (0.96, 0.63, 0.45)),
    73: ("Putamen_L", (0.47, 0.67, 0.19)),
    74: ("Putamen_R", (0.74, 0.87, 0.52)),
    37: ("Hippocampus_L", (0.49, 0.18, 0.56)),
    38: ("Hippocampus_R", (0.80, 0.62, 0.86)),
}

# Voxel index ranges (x, y, z) of the crop: the structures' extent plus a margin
# of context, so slices still look like brain MR to the model.
CROP_START = (30, 60, 40)
CROP_SIZE = (124, 116, 62)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--templates", type=Path, default=Path("/usr/share/mricron/templates"))
    parser.add_argument("--out", type=Path, default=ROOT / "Resources" / "SampleData")
    args = parser.parse_args()

    t1 = sitk.ReadImage(str(args.templates / "ch2.nii.gz"))
    aal = sitk.ReadImage(str(args.templates / "aal.nii.gz"))
    t1_crop = sitk.RegionOfInterest(t1, CROP_SIZE, CROP_START)
    aal_crop = sitk.RegionOfInterest(aal, CROP_SIZE, CROP_START)

    aal_array = sitk.GetArrayFromImage(aal_crop)
    labels = aal_array * 0
    segments = []
    for new_label, (aal_value, (name, color)) in enumerate(STRUCTURES.items(), start=1):
        labels[aal_array == aal_value] = new_label
        segments.append(Segment(label=new_label, name=name, color=color))
        if not (labels == new_label).any():
            raise SystemExit(f"{name} is outside the crop")

    args.out.mkdir(parents=True, exist_ok=True)
    image_path = args.out / "ch2_deep_grey_t1.nrrd"
    sitk.WriteImage(t1_crop, str(image_path), useCompression=True)
    labels_path = args.out / "ch2_deep_grey_labels.seg.nrrd"
    write_label_map(labels_path, labels, VolumeGeometry.from_image(aal_crop), segments)
    for path in (image_path, labels_path):
        print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
