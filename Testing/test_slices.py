"""Slice logic defined once (slices.py): anatomical planes from real NRRD direction matrices, voxel axes,
occupied slices, putting drawn slices back, the range check; and ``--axis`` through the real CLI."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import SimpleITK as sitk

from SALTSegmentLib import cli
from SALTSegmentLib.host import choices
from SALTSegmentLib.slices import (SliceRangeError, adapter_axis_in, array_axis, check_slice_range, labelled_slices,
                                   occupied_slices, plane_axes, plane_voxel_axis, put_back_slices, resolve_axis,
                                   voxel_axis_plane)
from SALTSegmentLib.volume_io import read_image, read_label_map

SIZE = (5, 6, 7)  # (i, j, k) = (x, y, z): distinct, so a slice count names its axis
# LPS direction matrices (row-major; columns = the i, j, k directions) as scanners write them.
AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
SAGITTAL = (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0)   # k runs left-right, j head-feet, i front-back
CORONAL = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0)     # k runs front-back


def _oblique(degrees_z: float, degrees_x: float) -> tuple[float, ...]:
    a, b = np.deg2rad(degrees_z), np.deg2rad(degrees_x)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


def _nrrd(path, direction, values: np.ndarray, pixel=sitk.sitkFloat32):
    image = sitk.GetImageFromArray(values)
    image = sitk.Cast(image, pixel)
    image.SetSpacing((0.9, 1.1, 2.5))
    image.SetOrigin((-10.0, 20.0, 5.0))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(path))
    return path


@pytest.fixture(scope="module")
def volumes(tmp_path_factory):
    """A volume stored axially and the same shape stored sagittally, as NRRD files with real headers."""
    folder = tmp_path_factory.mktemp("orientations")
    values = np.random.default_rng(0).normal(100, 20, SIZE[::-1]).astype(np.float32)
    labels = np.zeros(SIZE[::-1], np.uint8)
    labels[2:5, 2:4, 1:3] = 1
    paths = {}
    for name, direction in (("axial", AXIAL), ("sagittal", SAGITTAL)):
        paths[name] = (_nrrd(folder / f"{name}.nrrd", direction, values),
                       _nrrd(folder / f"{name}-labels.nrrd", direction, labels, sitk.sitkUInt8))
    return paths


def test_the_nrrd_headers_carry_the_orientation(volumes):
    header = volumes["sagittal"][0].read_bytes().split(b"\n\n")[0].decode()
    assert "space: left-posterior-superior" in header
    line = next(line for line in header.splitlines() if line.startswith("space directions:"))
    vectors = [[float(v) for v in part.strip("()").split(",")] for part in line.split(":", 1)[1].split()]
    np.testing.assert_allclose(vectors, [[0, 0.9, 0], [0, 0, -1.1], [-2.5, 0, 0]])   # i, j, k in LPS (mm)


@pytest.mark.parametrize("stored, expected", [("axial", {"axial": "k", "coronal": "j", "sagittal": "i"}),
                                              ("sagittal", {"axial": "j", "coronal": "i", "sagittal": "k"})])
def test_planes_are_the_anatomical_ones_on_a_volume_stored_either_way(volumes, stored, expected):
    path = volumes[stored][0]
    _, geometry = read_image(path)
    image = sitk.ReadImage(str(path))
    world_axis = {"sagittal": 0, "coronal": 1, "axial": 2}   # LPS axis each plane is perpendicular to
    for plane, voxel in expected.items():
        assert resolve_axis(plane, geometry.direction) == (voxel, plane)
        # Every voxel of one slice along that voxel axis lies at the same height (axial), depth or side.
        dim = array_axis(voxel)
        size_zyx = SIZE[::-1]
        others = [range(size_zyx[a]) for a in range(3) if a != dim]
        heights = set()
        for rest in itertools.product(*others):
            index_zyx = list(rest)
            index_zyx.insert(dim, 1)
            point = image.TransformIndexToPhysicalPoint([int(v) for v in index_zyx[::-1]])
            heights.add(round(point[world_axis[plane]], 6))
        assert len(heights) == 1, (plane, voxel)
    # i, j, k are the raw voxel axes whatever the orientation; their plane is reported back
    assert resolve_axis("k", geometry.direction) == ("k", "axial" if stored == "axial" else "sagittal")


def test_planes_and_voxel_axes_pair_one_to_one_even_when_oblique():
    for direction in (AXIAL, SAGITTAL, CORONAL, _oblique(20, -35), _oblique(44, 44), _oblique(-90, 30)):
        pairs = plane_axes(direction)
        assert sorted(pairs.values()) == ["i", "j", "k"]
        for plane, voxel in pairs.items():
            assert plane_voxel_axis(plane, direction) == voxel and voxel_axis_plane(voxel, direction) == plane
    assert plane_axes(_oblique(20, -35)) == {"axial": "k", "coronal": "j", "sagittal": "i"}
    # A 4x4 IJK-to-RAS matrix (spacing and RAS signs included) gives the same answer as the LPS direction.
    ras = np.diag([-1.0, -1.0, 1.0, 1.0])
    ras[:3, :3] = np.diag([-1.0, -1.0, 1.0]) @ np.asarray(SAGITTAL).reshape(3, 3) @ np.diag([0.9, 1.1, 2.5])
    assert plane_axes(ras) == plane_axes(SAGITTAL)
    with pytest.raises(ValueError, match="Unknown axis 'oblique'"):
        resolve_axis("oblique", AXIAL)


def test_an_adapter_runs_along_its_plane_in_each_volume():
    assert adapter_axis_in("k", "axial", AXIAL) == "k"
    assert adapter_axis_in("k", "axial", SAGITTAL) == "j"      # trained on axial slices: axial slices here too
    assert adapter_axis_in("j", None, SAGITTAL) == "j"         # format 1 (no plane): its voxel axis


@pytest.mark.parametrize("stored, axis, count, along", [
    ("axial", "axial", 7, "k"), ("sagittal", "axial", 6, "j"), ("sagittal", "sagittal", 7, "k"),
    ("sagittal", "k", 7, "k"), ("sagittal", "i", 5, "i"), ("axial", "i", 5, "i")])
def test_cli_axis_selects_the_anatomical_plane_or_the_voxel_axis(volumes, capsys, tmp_path, stored, axis, count,
                                                                 along):
    """Through ``saltsegment train``: the labelled-slice check runs on the resolved axis, before any model."""
    image, labels = volumes[stored]
    code = cli.main(["train", "--image", str(image), "--labels", str(labels), "--out", str(tmp_path / "a.safetensors"),
                     "--axis", axis, "--slices", "99", "--device", "cpu"])
    assert code == 1
    assert f"Labelled slice(s) [99] outside 0..{count - 1} along voxel axis {along}" in capsys.readouterr().err
    assert not (tmp_path / "a.safetensors").exists()


def test_evaluate_axis_is_the_anatomical_plane(volumes):
    from SALTSegmentLib.pipeline import evaluate_files

    labels_path = volumes["sagittal"][1]
    labels, _, _ = read_label_map(labels_path)
    for axis, voxel in (("axial", "j"), ("k", "k")):
        report = evaluate_files(labels_path, labels_path, axis=axis)
        assert {score.index for score in report.slices} == set(occupied_slices(labels, voxel)), axis
        assert {score.axis for score in report.slices} == {voxel}


def test_occupied_and_labelled_slices():
    labels = np.zeros((4, 5, 6), np.uint16)
    labels[1, 2, 3] = 2
    labels[3, 0, 5] = 7
    assert occupied_slices(labels, "k") == occupied_slices(labels, 0) == [1, 3]
    assert occupied_slices(labels, "j") == [0, 2] and occupied_slices(labels, "i") == [3, 5]
    assert occupied_slices(labels, "axial") == [1, 3]                        # legacy engine name: voxel axis k
    assert labelled_slices(labels, [7], "k") == [3] and labelled_slices(labels, [1], "k") == []


def test_put_back_slices_whole_or_by_label():
    target = np.full((3, 2, 2), 5, np.uint16)
    source = np.zeros((3, 2, 2), np.uint16)
    source[1, 0, 0] = 2
    whole = put_back_slices(target.copy(), source, [1], "k")
    assert whole[1].tolist() == [[2, 0], [0, 0]] and (whole[[0, 2]] == 5).all()
    target[1, 1, 1] = 2                       # a propagated voxel of label 2 on the drawn slice
    by_label = put_back_slices(target.copy(), source, [1], 0, values=[2])
    assert by_label[1].tolist() == [[2, 5], [5, 0]]    # label 2 as drawn; label 5 (not propagated here) stays
    along_i = put_back_slices(np.zeros((2, 2, 3), np.uint8), np.ones((2, 2, 3), np.uint8), [2], "i")
    assert along_i[..., 2].all() and not along_i[..., :2].any()


def test_the_slice_range_check_names_the_axis():
    assert check_slice_range((2, 4), 8, "voxel axis k (axial)") == [2, 3, 4]
    with pytest.raises(SliceRangeError, match=r"Slice range 5:99 is outside 0:7 along voxel axis k \(axial\)"):
        check_slice_range((5, 99), 8, "voxel axis k (axial)")
    with pytest.raises(KeyError, match="Slice range -1:5"):
        check_slice_range((-1, 5), 8, "k", KeyError)


def test_choices_list_planes_then_voxel_axes():
    assert choices.AXES == ("axial", "coronal", "sagittal", "i", "j", "k")
