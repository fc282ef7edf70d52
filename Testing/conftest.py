"""Shared fixtures: repository paths, the embedded real sample and a loaded LiteMedSAM.

The machines running the suite are small and shared, so torch uses two threads
and the real model is loaded once per session.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(2)

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
