"""Report files: PNGs that decode to the expected size, JSON/Markdown that round-trip."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from matplotlib.image import imread

from SALTSegmentLib.metrics import evaluate_label_maps
from SALTSegmentLib.report import write_loss_curve, write_montage, write_report
from SALTSegmentLib.volume_io import Segment

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SEGMENTS = [Segment(1, "liver", (0.9, 0.3, 0.3)), Segment(2, "spleen", (0.3, 0.6, 0.9))]


@pytest.fixture(scope="module")
def volumes():
    rng = np.random.default_rng(0)
    image = rng.normal(size=(10, 32, 32)).astype(np.float32)
    ref = np.zeros((10, 32, 32), dtype=np.uint8)
    ref[2:8, 6:20, 6:20] = 1
    ref[3:6, 22:30, 22:30] = 2
    pred = ref.copy()
    pred[5, 6:10, 6:20] = 0
    return image, ref, pred


def assert_png(path, min_width=100, min_height=100):
    assert path.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] >= min_height and pixels.shape[1] >= min_width
    return pixels


def test_montage_default_indices(tmp_path, volumes):
    image, ref, pred = volumes
    path = write_montage(tmp_path / "montage.png", image, ref, pred, SEGMENTS, labelled={2, 7}, max_panels=4)
    pixels = assert_png(path, min_width=4 * 250, min_height=250)
    assert pixels.shape[0] < pixels.shape[1]  # one row of four panels
    assert [p.name for p in tmp_path.iterdir()] == ["montage.png"]


def test_montage_other_axis_without_reference(tmp_path, volumes):
    image, _, pred = volumes
    path = write_montage(tmp_path / "coronal.png", image, None, pred, SEGMENTS, axis="coronal",
                         indices=[10, 25], spacing_xyz=(1.0, 1.0, 3.0))
    assert_png(path)
    with pytest.raises(ValueError, match="outside"):
        write_montage(tmp_path / "bad.png", image, None, pred, SEGMENTS, indices=[99])
    with pytest.raises(ValueError, match="shape"):
        write_montage(tmp_path / "bad.png", image, pred[:5], pred, SEGMENTS)
    assert not (tmp_path / "bad.png").exists()


def test_loss_curve(tmp_path):
    losses = list(np.linspace(1.0, 0.1, 50) + 0.05 * np.sin(np.arange(50)))
    losses[10] = float("nan")
    lrs = list(np.linspace(1e-3, 1e-5, 50))
    path = write_loss_curve(tmp_path / "loss.png", losses, lrs)
    pixels = assert_png(path, min_width=500, min_height=300)
    assert pixels.shape[:2] == (400, 700)
    assert_png(write_loss_curve(tmp_path / "plain.png", [0.5, 0.4], title="short"))
    with pytest.raises(ValueError):
        write_loss_curve(tmp_path / "x.png", [1.0, 2.0], [1e-3])


def test_write_report_round_trip(tmp_path, volumes):
    _, ref, pred = volumes
    pred = pred.copy()
    pred[pred == 2] = 0  # spleen missed -> HD95 NaN
    evaluation = evaluate_label_maps(pred, ref, SEGMENTS, (0.8, 0.8, 2.5))
    summary = {
        "title": "Demo run",
        "settings": {"method": "SALT", "rank": np.int64(4), "lr": np.float32(1e-3), "nested": {"seed": 0}},
        "timings": {"adapt_s": 12.5, "infer_s": np.float64(1.25)},
        "labelled_slices": np.array([2, 7]),
        "unused": float("inf"),
    }
    json_path, md_path = write_report(tmp_path, "run", summary, evaluation)
    assert (json_path.name, md_path.name) == ("run.json", "run.md")
    with json_path.open() as handle:
        data = json.load(handle)
    assert data["settings"]["rank"] == 4 and data["labelled_slices"] == [2, 7]
    assert data["unused"] is None
    spleen = data["evaluation"]["segments"][1]
    assert spleen["name"] == "spleen" and spleen["hd95_mm"] is None
    assert math.isclose(data["evaluation"]["mean_dice"], evaluation.mean_dice)
    text = md_path.read_text()
    assert text.startswith("# Demo run")
    for name in ("liver", "spleen", "method", "nested.seed", "adapt_s", "**Mean**"):
        assert name in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.json", "run.md"]


def test_write_report_without_evaluation(tmp_path):
    json_path, md_path = write_report(tmp_path, "bare", {"note": "no reference"}, None)
    assert json.loads(json_path.read_text()) == {"note": "no reference", "evaluation": None}
    assert "# bare" in md_path.read_text()


def test_missing_folder_raises_and_leaves_nothing(tmp_path, volumes):
    image, ref, pred = volumes
    missing = tmp_path / "missing"
    with pytest.raises(FileNotFoundError):
        write_report(missing, "run", {}, None)
    with pytest.raises(FileNotFoundError):
        write_montage(missing / "m.png", image, ref, pred, SEGMENTS)
    with pytest.raises(FileNotFoundError):
        write_loss_curve(missing / "l.png", [1.0])
    assert list(tmp_path.iterdir()) == []
