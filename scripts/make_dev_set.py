"""Make the development set: real labelled volumes of several kinds, from registry packages only.

Propagation defaults are chosen by measurement on these cases (``saltsegment
bench quality --dev DIR``), never on one volume. Nothing here is committed:
the script rebuilds the folder (default ``dev-data/``, git-ignored) from

- Debian ``mricron-data`` (``apt-get install mricron-data``): the Colin27
  "ch2" T1 MR with the AAL atlas on its grid (BSD-3-Clause);
- the ``pyradiomics`` 3.0.1 sdist from PyPI (BSD-3-Clause), whose ``data/``
  folder holds CT and MR volumes with one lesion each. Pass ``--pyradiomics``
  with the ``.tar.gz`` or let the script fetch it from PyPI (sha256 checked).

Held out, never read here: the sdist's ``lung2`` and ``brain1`` volumes, two
AAL structure pairs reserved for testing, and the macaque atlas of
``mricron-data``. The AAL values used below are listed explicitly, so a
reserved structure cannot slip in.

Cases (``cases.json`` lists them with their slice axis and protocol):

- ``ch2_aal_small``: MR, four small structures (Heschl's gyri, olfactory
  cortex), axial;
- ``ch2_aal_posterior_fossa``: MR, four small cerebellar structures
  (flocculi, lobules III), axial;
- ``ch2_aal_coronal``: MR, insula and anterior cingulum, labelled on
  *coronal* slices (voxel axis j);
- ``ch2_aal_sagittal``: MR, two vermis lobules (IV-V, VIII) and the gyri
  recti, labelled on *sagittal* slices (voxel axis i);
- ``ch2_aal_medial``: MR, parahippocampal gyri and calcarine cortex, axial
  (the last two cases were added after every default was chosen, so their
  first record measured the defaults on structures and a plane they were not
  chosen on);
- ``lung1_lesion``: CT, a lung lesion (5 mm slices);
- ``brain2_lesion``: MR, a brain lesion (6.5 mm slices);
- ``breast1_lesion``: MR, a breast lesion (2.1 mm slices, 45 x 120 pixels).

Run: ``python scripts/make_dev_set.py [--out dev-data] [--templates DIR] [--pyradiomics FILE]``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import tarfile
import tempfile
import urllib.request
from pathlib import Path

import numpy as np
import SimpleITK as sitk

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "SALTSegment"))

from SALTSegmentLib.volume_io import Segment, VolumeGeometry, write_label_map  # noqa: E402

PYRADIOMICS_URL = ("https://files.pythonhosted.org/packages/1b/35/c7f7fb7affd302fd8107dcee6b6e7aaf3708b75ad69d5f9a3"
                   "dfcadb73eaa/pyradiomics-3.0.1.tar.gz")
PYRADIOMICS_SHA256 = "47c57f441d6cb7973fa3b2ea48d3948df78e3348e1c69e1e2ff19001601fc2f5"
PYRADIOMICS_CASES = ("lung1", "brain2", "breast1")   # lung2 and brain1 are held out
HELD_OUT_NAMES = ("lung2", "brain1")

# name -> AAL values (name, colour) of the structures, voxel crop (start x, y, z; size x, y, z), slice axis
# (voxel axis: k slices axial planes of these volumes, j coronal ones, i sagittal ones).
AAL_CASES = {
    "ch2_aal_small": {
        "structures": {79: ("Heschl_L", (0.85, 0.33, 0.10)), 80: ("Heschl_R", (0.96, 0.63, 0.45)),
                       21: ("Olfactory_L", (0.00, 0.57, 0.79)), 22: ("Olfactory_R", (0.47, 0.78, 0.93))},
        "crop": ((18, 84, 42), (148, 84, 56)), "axis": "k"},
    "ch2_aal_posterior_fossa": {
        "structures": {107: ("Flocculus_L", (0.47, 0.67, 0.19)), 108: ("Flocculus_R", (0.74, 0.87, 0.52)),
                       95: ("Cerebellum_III_L", (0.49, 0.18, 0.56)), 96: ("Cerebellum_III_R", (0.80, 0.62, 0.86))},
        "crop": ((45, 55, 14), (96, 64, 62)), "axis": "k"},
    "ch2_aal_coronal": {
        "structures": {29: ("Insula_L", (0.95, 0.75, 0.25)), 30: ("Insula_R", (0.99, 0.88, 0.55)),
                       31: ("Cingulum_Ant_L", (0.30, 0.65, 0.90)), 32: ("Cingulum_Ant_R", (0.60, 0.80, 0.95))},
        "crop": ((34, 84, 44), (116, 106, 68)), "axis": "j"},
    "ch2_aal_sagittal": {
        "structures": {111: ("Vermis_4_5", (0.55, 0.45, 0.85)), 114: ("Vermis_8", (0.85, 0.55, 0.65)),
                       27: ("Rectus_L", (0.35, 0.75, 0.45)), 28: ("Rectus_R", (0.70, 0.90, 0.55))},
        "crop": ((60, 40, 20), (61, 161, 66)), "axis": "i"},
    "ch2_aal_medial": {
        "structures": {39: ("ParaHippocampal_L", (0.80, 0.60, 0.20)), 40: ("ParaHippocampal_R", (0.95, 0.80, 0.40)),
                       43: ("Calcarine_L", (0.25, 0.45, 0.85)), 44: ("Calcarine_R", (0.50, 0.70, 0.95))},
        "crop": ((50, 15, 30), (86, 136, 71)), "axis": "k"},
}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pyradiomics_sdist(given: Path | None, scratch: Path) -> Path:
    path = given
    if path is None:
        path = scratch / "pyradiomics-3.0.1.tar.gz"
        print(f"fetching {PYRADIOMICS_URL}")
        urllib.request.urlretrieve(PYRADIOMICS_URL, path)
    if _sha256(path) != PYRADIOMICS_SHA256:
        raise SystemExit(f"{path} is not the pyradiomics 3.0.1 sdist (sha256 differs)")
    return path


def _write_case(out: Path, name: str, image: sitk.Image, labels: np.ndarray, segments: list[Segment]) -> dict:
    folder = out / name
    folder.mkdir(parents=True, exist_ok=True)
    image_path = folder / "image.nrrd"
    sitk.WriteImage(image, str(image_path), useCompression=True)
    labels_path = write_label_map(folder / "reference.seg.nrrd", labels, VolumeGeometry.from_image(image), segments)
    return {"name": name, "image": str(image_path.relative_to(out)), "labels": str(labels_path.relative_to(out))}


def make_aal_cases(templates: Path, out: Path) -> list[dict]:
    t1 = sitk.ReadImage(str(templates / "ch2.nii.gz"))
    aal = sitk.ReadImage(str(templates / "aal.nii.gz"))
    cases = []
    for name, spec in AAL_CASES.items():
        start, size = spec["crop"]
        image = sitk.RegionOfInterest(t1, size, start)
        aal_array = sitk.GetArrayFromImage(sitk.RegionOfInterest(aal, size, start))
        labels = np.zeros(aal_array.shape, np.uint16)
        segments = []
        for value, (aal_value, (structure, colour)) in enumerate(spec["structures"].items(), start=1):
            full = int((sitk.GetArrayViewFromImage(aal) == aal_value).sum())
            labels[aal_array == aal_value] = value
            if int((labels == value).sum()) != full:
                raise SystemExit(f"{name}: {structure} is cut by the crop")
            segments.append(Segment(value, structure, colour))
        case = _write_case(out, name, image, labels, segments)
        case.update(modality="MR", kind="anatomy", axis=spec["axis"], source="mricron-data ch2 + AAL")
        cases.append(case)
    return cases


def make_pyradiomics_cases(sdist: Path, out: Path) -> list[dict]:
    cases = []
    with tarfile.open(sdist) as archive, tempfile.TemporaryDirectory() as scratch:
        for stem in PYRADIOMICS_CASES:
            assert stem not in HELD_OUT_NAMES
            members = [f"pyradiomics-3.0.1/data/{stem}_image.nrrd", f"pyradiomics-3.0.1/data/{stem}_label.nrrd"]
            archive.extractall(scratch, members=[archive.getmember(m) for m in members], filter="data")
            image = sitk.ReadImage(str(Path(scratch) / members[0]))
            label_image = sitk.ReadImage(str(Path(scratch) / members[1]))
            labels = (sitk.GetArrayFromImage(label_image) > 0).astype(np.uint16)
            modality = "CT" if stem.startswith("lung") else "MR"
            case = _write_case(out, f"{stem}_lesion", image, labels, [Segment(1, "Lesion", (0.9, 0.35, 0.3))])
            case.update(modality=modality, kind="lesion", axis="k", source=f"pyradiomics 3.0.1 data/{stem}")
            cases.append(case)
    return cases


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "dev-data")
    parser.add_argument("--templates", type=Path, default=Path("/usr/share/mricron/templates"))
    parser.add_argument("--pyradiomics", type=Path, help="pyradiomics-3.0.1.tar.gz (default: fetch from PyPI)")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        cases = make_aal_cases(args.templates, args.out)
        cases += make_pyradiomics_cases(_pyradiomics_sdist(args.pyradiomics, Path(scratch)), args.out)
    (args.out / "cases.json").write_text(json.dumps(cases, indent=2) + "\n")
    for case in cases:
        print(f"{case['name']:<26} {case['modality']} {case['kind']:<8} {case['axis']:<8} {case['image']}")


if __name__ == "__main__":
    main()
