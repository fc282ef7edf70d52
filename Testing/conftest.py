"""Shared fixtures: repository paths, the embedded real sample and a loaded LiteMedSAM.

The machines running the suite are small and shared, so torch uses two threads
and the real model is loaded once per session. ``make test`` runs two
pytest-xdist workers (a file each at a time): each then uses one thread, so
the two share the two cores instead of fighting over them.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else 2)

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLE_DIR = REPO_ROOT / "Resources" / "SampleData"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def sample_image_path() -> Path:
    """T1 MR crop (124 x 116 x 62 voxels, 1 mm) around the deep grey matter (Colin27 ch2)."""
    path = SAMPLE_DIR / "ch2_deep_grey_t1.nrrd"
    assert path.is_file(), f"embedded sample missing: {path}"
    return path


@pytest.fixture(scope="session")
def sample_labels_path() -> Path:
    """Eight AAL structures on the sample's grid, labels 1..8 (Thalamus_L/R, Caudate, Putamen, Hippocampus)."""
    path = SAMPLE_DIR / "ch2_deep_grey_labels.seg.nrrd"
    assert path.is_file(), f"embedded sample missing: {path}"
    return path


@pytest.fixture(scope="session")
def lite_medsam():
    """LiteMedSAM with its packaged, verified weights (eval mode, CPU); shared: do not modify it."""
    from SALTSegmentLib.models import load_model

    return load_model("lite_medsam")


@pytest.fixture(scope="module")
def one_thread():
    """Single-threaded torch for a module (shared CPU), without leaking the setting to other suites."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def write_sample_crop(sample_image_path, sample_labels_path):
    """A writer of eight axial slices (28..35) of the sample into a folder: image.nrrd, and drawn.seg.nrrd with
    the segments of the given label values drawn on slices 2 and 6. It returns the crop's full labels, its
    geometry and the drawn segments."""
    from SALTSegmentLib.volume_io import VolumeGeometry, read_label_map, write_label_map

    def write(folder: Path, values: list[int]):
        image = sitk.ReadImage(str(sample_image_path))
        size = list(image.GetSize())
        crop = sitk.RegionOfInterest(image, [size[0], size[1], 8], [0, 0, 28])
        sitk.WriteImage(crop, str(folder / "image.nrrd"))
        labels, _, segments = read_label_map(sample_labels_path)
        labels = labels[28:36]
        drawn = np.zeros_like(labels)
        drawn[[2, 6]] = np.where(np.isin(labels[[2, 6]], values), labels[[2, 6]], 0)
        geometry = VolumeGeometry.from_image(crop)
        kept = [s for s in segments if s.label in values]
        write_label_map(folder / "drawn.seg.nrrd", drawn, geometry, kept)
        return labels, geometry, kept

    return write


@pytest.fixture(scope="module")
def thalamus_crop(tmp_path_factory, write_sample_crop) -> Path:
    """Eight axial slices (28..35) of the sample: image, the left thalamus drawn on slices 2 and 6, full reference."""
    from SALTSegmentLib.volume_io import write_label_map

    folder = tmp_path_factory.mktemp("thalamus_crop")
    labels, geometry, thalamus = write_sample_crop(folder, [1])
    write_label_map(folder / "reference.seg.nrrd", np.where(labels == 1, 1, 0), geometry, thalamus)
    return folder


@pytest.fixture(scope="session")
def write_untrained_adapter():
    """A writer of a valid LoRA adapter file that was never trained, for tests of what runs around an adapter.

    ``write(path, volume, segments)`` adapts a fresh LiteMedSAM (the default
    LoRA preset, axial, the volume's own intensity window) for ``segments``
    and saves it; it returns the path, the adapted model and the metadata.
    Training is not needed to test propagation's plumbing, refusals or
    interruptions, and it would cost minutes per file.
    """
    from SALTSegmentLib import preprocessing as pp
    from SALTSegmentLib.adapter_file import AdapterMetadata, save_adapter
    from SALTSegmentLib.adapters import apply_method, preset_options
    from SALTSegmentLib.models import load_model
    from SALTSegmentLib.prompts import SegmentPrompts

    def write(path: Path, volume: np.ndarray, segments: list):
        model = load_model("lite_medsam")
        config = apply_method(model, "lora", preset_options("lora", "default"))
        metadata = AdapterMetadata(base_model="lite_medsam", base_weights_sha256=model.weights_sha256,
                                   input_size=256, method="lora", method_config=config,
                                   intensity=pp.parse_intensity("auto", volume).to_dict(), axis="k", plane="axial",
                                   segments=AdapterMetadata.segments_to_dicts(segments))
        return save_adapter(path, model, SegmentPrompts(len(segments)), metadata), model, metadata

    return write
