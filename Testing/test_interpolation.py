"""Fill between slices (ITK's morphological contour interpolation through its WebAssembly build)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest

from SALTSegmentLib.interpolation import fill_between_slices, interpolate_segment
from SALTSegmentLib import preprocessing as pp


def _ball(shape=(40, 36, 32), centre=(20, 18, 16), radius=12.0) -> np.ndarray:
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
    return ((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2) < radius ** 2


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * (a & b).sum() / (a.sum() + b.sum())


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_interpolates_a_ball_between_drawn_slices_on_every_axis(axis):
    ball = _ball()
    drawn = np.zeros_like(ball)
    slices = [pp.slice_count(ball.shape, axis) // 2 + offset for offset in (-8, 0, 8)]
    for index in slices:
        pp.put_slice(drawn, axis, index, pp.take_slice(ball, axis, index))
    filled = interpolate_segment(drawn, axis)
    for index in slices:  # drawn slices come back as drawn
        assert np.array_equal(pp.take_slice(filled, axis, index), pp.take_slice(ball, axis, index))
    inside = [i for i in range(slices[0], slices[-1] + 1) if i not in slices]
    for index in inside:
        assert _dice(pp.take_slice(filled, axis, index), pp.take_slice(ball, axis, index)) > 0.85
    occupied = pp.occupied_slices(filled, axis)
    assert occupied[0] == slices[0] and occupied[-1] == slices[-1]  # shape only: no extrapolation


@pytest.mark.parametrize("axis", ["axial", "coronal", "sagittal"])
def test_a_labelled_empty_slice_closes_the_shape_towards_it_on_every_axis(axis):
    ball = _ball()
    drawn = np.zeros_like(ball)
    for index in (10, 16):
        pp.put_slice(drawn, axis, index, pp.take_slice(ball, axis, index))
    plain = interpolate_segment(drawn, axis)
    with_negative = interpolate_segment(drawn, axis, labelled_slices=[10, 16, 23])
    assert pp.occupied_slices(plain, axis) == list(range(10, 17))
    assert pp.occupied_slices(with_negative, axis)[0] == 10
    last = pp.occupied_slices(with_negative, axis)[-1]
    assert 16 < last < 23
    assert not pp.take_slice(with_negative, axis, 23).any()


@pytest.mark.parametrize("axis", ["coronal", "sagittal"])
def test_every_axis_interpolates_as_the_axial_one_of_the_turned_volume(axis):
    """ITK's filter given its slice list along x once returned the drawn slices unchanged (sagittal: nothing
    filled in, nothing closed); the same drawing turned so that its slices are axial must give the same shape."""
    ball = _ball(centre=(19, 17, 15), radius=11.5)
    dim = pp.SLICE_AXES[axis]
    drawn = np.zeros_like(ball)
    for index in (9, 15, 21):
        pp.put_slice(drawn, axis, index, pp.take_slice(ball, axis, index))
    listed = [9, 15, 21, 26]
    along = interpolate_segment(drawn, axis, labelled_slices=listed)
    turned = np.moveaxis(interpolate_segment(np.moveaxis(drawn, dim, 0), "axial", labelled_slices=listed), 0, dim)
    assert np.array_equal(along, turned)
    assert along.sum() > 3 * drawn.sum()


def test_fill_between_slices_keeps_labels_apart_and_matches_per_segment_runs():
    left, right = _ball(centre=(20, 18, 9), radius=7), _ball(centre=(20, 18, 24), radius=7)
    labels = np.zeros(left.shape, np.uint16)
    labels[left] = 1
    labels[right] = 2
    drawn = np.zeros_like(labels)
    drawn[[15, 20, 25]] = labels[[15, 20, 25]]
    filled = fill_between_slices(drawn, "axial")
    assert set(np.unique(filled)) == {0, 1, 2}
    for value, truth in ((1, left), (2, right)):
        alone = interpolate_segment(drawn == value, "axial")
        assert _dice(filled == value, alone) > 0.99
        assert _dice(filled[15:26] == value, truth[15:26]) > 0.85


def test_empty_input_gives_empty_output():
    empty = np.zeros((5, 6, 7), np.uint16)
    assert not fill_between_slices(empty, "axial").any()
    assert not interpolate_segment(empty > 0, "axial").any()


def test_several_volumes_in_one_process_exit_cleanly(repo_root):
    """ITK's native wrapping crashed at interpreter exit after several volumes; this build must not."""
    script = textwrap.dedent("""
        import numpy as np
        from SALTSegmentLib.interpolation import fill_between_slices, interpolate_segment
        rng = np.random.default_rng(0)
        for shape in [(20, 30, 30), (12, 40, 24), (30, 16, 16), (9, 9, 9), (25, 50, 40)]:
            labels = np.zeros(shape, np.uint16)
            z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]]
            ball = (z - shape[0] / 2) ** 2 + (y - shape[1] / 2) ** 2 + (x - shape[2] / 2) ** 2 < (min(shape) / 3) ** 2
            labels[ball] = 1 + rng.integers(0, 3)
            drawn = np.zeros_like(labels)
            drawn[[2, shape[0] // 2, shape[0] - 3]] = labels[[2, shape[0] // 2, shape[0] - 3]]
            for axis in ("axial", "coronal"):
                assert fill_between_slices(drawn, axis).shape == shape
            assert interpolate_segment(drawn > 0, "axial").any()
        print("ok")
    """)
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               cwd=repo_root)
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert completed.stdout.strip() == "ok"
