"""Make SIMULATED patients of one site from one real volume, for the site adaptation benchmark.

A site's archive holds many patients of the same kind. No registry offers
many labelled patients of one site, so this script simulates them: each
simulated patient is the embedded sample (the Colin27 T1 MR crop with eight
AAL deep grey structures, ``Resources/SampleData``) with

- a random smooth deformation: a small random affine (rotation up to 4
  degrees, scale 0.94-1.06 per axis, shift up to 3 mm) followed by a B-spline
  deformation (a 5 x 5 x 4 control grid, displacements of 2.5 mm standard
  deviation), applied to the image (linear) and to the labels (nearest
  neighbour) together, so the reference follows the anatomy;
- a multiplicative bias field: the exponential of a random quadratic
  polynomial of the position (about +-15 % across the volume);
- a contrast change (gamma 0.85-1.15) and Rician noise (3 % of the
  intensity range).

Every name says *simulated*: the folder (default ``dev-data/site_simulated``),
the cases (``simulated_patient_01`` ...), their ``source`` in ``cases.json``,
and the tables the benchmark prints. They are variations of ONE real brain,
so they are easier than real patients of one site: the numbers they give
measure the mechanics of site adaptation, not its clinical benefit.

Nothing held out is read: the source is the embedded sample (thalamus,
caudate, putamen, hippocampus), never the reserved AAL structures or
volumes.

Run: ``python scripts/make_site_set.py [--out dev-data/site_simulated] [--patients 5] [--seed 13]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SALTSegment"))

from SALTSegmentLib.sample_data import sample_paths  # noqa: E402
from SALTSegmentLib.volume_io import VolumeGeometry, read_label_map, write_label_map  # noqa: E402

SOURCE = "simulated from the embedded sample (Colin27 ch2 T1 + AAL, mricron-data): deformation, bias field, noise"


def random_transform(reference: sitk.Image, rng: np.random.Generator) -> sitk.Transform:
    """A small random affine about the volume centre, then a smooth B-spline deformation."""
    size = np.array(reference.GetSize())
    centre = reference.TransformContinuousIndexToPhysicalPoint((size - 1) / 2.0)
    affine = sitk.AffineTransform(3)
    affine.SetCenter(centre)
    angles = np.deg2rad(rng.uniform(-4, 4, 3))
    rotation = sitk.Euler3DTransform()
    rotation.SetRotation(*angles)
    matrix = np.array(rotation.GetMatrix()).reshape(3, 3) @ np.diag(rng.uniform(0.94, 1.06, 3))
    affine.SetMatrix(matrix.ravel().tolist())
    affine.SetTranslation(rng.uniform(-3, 3, 3).tolist())
    bspline = sitk.BSplineTransformInitializer(reference, [5, 5, 4], order=3)
    parameters = rng.normal(0.0, 2.5, len(bspline.GetParameters()))
    bspline.SetParameters(parameters.tolist())
    return sitk.CompositeTransform([affine, bspline])


def bias_field(shape: tuple[int, ...], rng: np.random.Generator, strength: float = 0.15) -> np.ndarray:
    """exp of a random quadratic polynomial of the normalised position: a smooth multiplicative field."""
    grids = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij")
    terms = [g for g in grids] + [a * b for i, a in enumerate(grids) for b in grids[i:]]
    field = sum(rng.normal(0.0, 1.0) * term for term in terms)
    field = field / max(np.abs(field).max(), 1e-6) * strength
    return np.exp(field).astype(np.float32)


def simulate_patient(image: sitk.Image, labels: np.ndarray, seed: int) -> tuple[sitk.Image, np.ndarray]:
    """One simulated patient: deformed image and labels, bias field, contrast change, Rician noise."""
    rng = np.random.default_rng(seed)
    transform = random_transform(image, rng)
    label_image = sitk.GetImageFromArray(labels.astype(np.uint16))
    label_image.CopyInformation(image)
    moved = sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    moved_labels = sitk.Resample(label_image, image, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt16)
    values = sitk.GetArrayFromImage(moved)
    low, high = np.percentile(values, [0.5, 99.5])
    scaled = np.clip((values - low) / max(high - low, 1e-6), 0, None)
    scaled = scaled ** rng.uniform(0.85, 1.15)
    scaled *= bias_field(values.shape, rng)
    sigma = 0.03
    noisy = np.sqrt((scaled + rng.normal(0, sigma, scaled.shape)) ** 2 + rng.normal(0, sigma, scaled.shape) ** 2)
    result = sitk.GetImageFromArray((noisy * (high - low) + low).astype(np.float32))
    result.CopyInformation(image)
    return result, sitk.GetArrayFromImage(moved_labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dev-data" / "site_simulated")
    parser.add_argument("--patients", type=int, default=5)
    parser.add_argument("--seed", type=int, default=13)
    args = parser.parse_args()
    image_path, labels_path = sample_paths()
    image = sitk.ReadImage(str(image_path), sitk.sitkFloat32)
    labels, _, segments = read_label_map(labels_path)
    args.out.mkdir(parents=True, exist_ok=True)
    cases = []
    for number in range(1, args.patients + 1):
        name = f"simulated_patient_{number:02d}"
        folder = args.out / name
        folder.mkdir(exist_ok=True)
        simulated, simulated_labels = simulate_patient(image, labels, args.seed * 1000 + number)
        sitk.WriteImage(simulated, str(folder / "image.nrrd"), useCompression=True)
        write_label_map(folder / "reference.seg.nrrd", simulated_labels, VolumeGeometry.from_image(simulated),
                        segments)
        kept = {s.name: int((simulated_labels == s.label).sum()) for s in segments}
        cases.append({"name": name, "image": f"{name}/image.nrrd", "labels": f"{name}/reference.seg.nrrd",
                      "modality": "MR", "kind": "anatomy", "axis": "k", "simulated": True,
                      "seed": args.seed * 1000 + number, "source": SOURCE})
        print(f"{name}: voxels per structure {kept}")
    (args.out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    print(f"wrote {len(cases)} simulated patients to {args.out}")


if __name__ == "__main__":
    main()
