"""The MRML bridge against real MRML (PyPI ``slicer-core``): scenes, storage nodes, segmentation logic."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for the MRML bridge tests")
vtk = pytest.importorskip("vtk")

from SALTSegmentLib import slicer_bridge as bridge  # noqa: E402
from SALTSegmentLib.slices import occupied_slices  # noqa: E402
from SALTSegmentLib.volume_io import Segment, VolumeGeometry, read_label_map, write_image, write_label_map  # noqa: E402

IDENTITY = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)
# LPS direction matrices (row-major, columns = i, j, k axis directions) of typical acquisitions.
ORIENTATIONS = {
    "axial": IDENTITY,
    "coronal": (1.0, 0.0, 0.0, 0.0, 0.0, -1.0, 0.0, 1.0, 0.0),   # slices (k) run anterior-posterior
    "sagittal": (0.0, 0.0, -1.0, 1.0, 0.0, 0.0, 0.0, -1.0, 0.0),  # slices (k) run left-right
}


def _oblique_direction() -> tuple[float, ...]:
    a, b = np.deg2rad(20.0), np.deg2rad(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    return tuple((rz @ rx).ravel())


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    bridge.ensure_converter_rules()


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


def _labels(shape) -> np.ndarray:
    """Two blobs and a small third structure, touching, on a (z, y, x) grid."""
    labels = np.zeros(shape, dtype=np.uint16)
    z, y, x = shape
    labels[1:z - 1, 2:y // 2, 1:x // 2] = 1
    labels[2:z - 2, y // 2:y - 1, x // 3:x - 2] = 2
    labels[z // 2, 1:3, x - 3:x - 1] = 3
    return labels


SEGMENTS = [Segment(1, "liver", (0.8, 0.3, 0.2)), Segment(2, "spleen", (0.2, 0.4, 0.9)),
            Segment(3, "nodule", (0.9, 0.9, 0.1))]


def _volume(scene, geometry: VolumeGeometry, array: np.ndarray | None = None):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    if array is None:
        array = np.random.default_rng(0).integers(-100, 100, size=geometry.size[::-1]).astype(np.int16)
    bridge.update_volume_from_array(node, array, bridge.ijk_to_ras_from_geometry(geometry))
    return node


def _grid(direction, spacing=(0.7, 1.3, 2.5), size=(11, 9, 7)) -> VolumeGeometry:
    return VolumeGeometry(size=size, spacing=spacing, origin=(12.5, -40.0, 7.25), direction=direction)


GRIDS = {**{name: _grid(direction) for name, direction in ORIENTATIONS.items()},
         "oblique": _grid(_oblique_direction()),
         "unit_spacing": _grid(IDENTITY, spacing=(1.0, 1.0, 1.0))}


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_geometry_matrix_round_trip(name):
    geometry = GRIDS[name]
    matrix = bridge.ijk_to_ras_from_geometry(geometry)
    back = bridge.geometry_from_ijk_to_ras(matrix, geometry.size)
    assert geometry.differences(back) == []
    # LPS -> RAS flips x and y only.
    assert np.allclose(matrix[:3, 3], [-12.5, 40.0, 7.25])


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_mask_round_trip(scene, name):
    geometry = GRIDS[name]
    volume = _volume(scene, geometry)
    labels = _labels(geometry.size[::-1])
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    matrix = bridge.volume_ijk_to_ras(volume)

    ids = bridge.import_label_map(segmentation, labels, matrix, SEGMENTS)
    assert len(ids) == 3
    exported = bridge.segmentation_to_label_map(segmentation, volume, ids)

    assert np.array_equal(exported.array, labels)
    assert [s.name for s in exported.segments] == ["liver", "spleen", "nodule"]
    assert np.allclose(exported.segments[1].color, (0.2, 0.4, 0.9))
    assert exported.geometry.differences(geometry) == []


def test_export_order_sets_label_values(scene):
    geometry = GRIDS["axial"]
    volume = _volume(scene, geometry)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = _labels(geometry.size[::-1])
    ids = bridge.import_label_map(segmentation, labels, bridge.volume_ijk_to_ras(volume), SEGMENTS)
    exported = bridge.segmentation_to_label_map(segmentation, volume, [ids[2], ids[0]])
    assert [s.name for s in exported.segments] == ["nodule", "liver"]
    assert np.array_equal(exported.array == 1, labels == 3)
    assert np.array_equal(exported.array == 2, labels == 1)


def test_segments_on_a_different_grid_are_resampled_onto_the_volume(scene):
    coarse = VolumeGeometry(size=(8, 8, 6), spacing=(2.0, 2.0, 3.0), origin=(0.0, 0.0, 0.0))
    # Twice as fine in-plane, the same slices: coarse voxel centres fall on fine voxel centres.
    fine = VolumeGeometry(size=(16, 16, 6), spacing=(1.0, 1.0, 3.0), origin=(0.0, 0.0, 0.0))
    volume = _volume(scene, coarse)
    expected = np.zeros((6, 8, 8), np.uint16)
    expected[1:5, 2:6, 3:7] = 1
    fine_mask = np.zeros((6, 16, 16), np.uint16)
    fine_mask[1:5, 4:11, 6:13] = 1  # covers fine voxels 2*i for the coarse voxels above, not beyond
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    bridge.import_label_map(segmentation, fine_mask, bridge.ijk_to_ras_from_geometry(fine), SEGMENTS[:1])
    exported = bridge.segmentation_to_label_map(segmentation, volume)
    assert np.array_equal(exported.array, expected)


@pytest.mark.parametrize("axis_name", ["axial", "coronal", "sagittal"])
def test_replace_keeps_drawn_slices_and_other_segments(scene, axis_name):
    geometry = GRIDS[axis_name]
    volume = _volume(scene, geometry)
    matrix = bridge.volume_ijk_to_ras(volume)
    shape = geometry.size[::-1]
    axis = bridge.volume_array_axis(volume, axis_name)
    assert axis == 0  # each of these grids was acquired in its own plane

    drawn = np.zeros(shape, np.uint16)
    drawn[2, 3:6, 3:6] = 1          # the user's "liver" slice
    drawn[4, 1:3, 1:3] = 2          # an unrelated segment that must not change
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    ids = bridge.import_label_map(segmentation, drawn, matrix, SEGMENTS[:2])
    assert occupied_slices(drawn, axis) == [2, 4]

    predicted = np.zeros(shape, np.uint16)
    predicted[1:6, 2:8, 2:8] = 1    # a prediction that disagrees on the drawn slice 2
    written = bridge.import_label_map(segmentation, predicted, matrix, SEGMENTS[:1], axis=axis)
    assert written == [ids[0]]
    result = bridge.segmentation_to_label_map(segmentation, volume, ids).array
    assert np.array_equal(result[2], drawn[2])                      # drawn slice untouched
    assert np.array_equal(result[3] == 1, predicted[3] == 1)        # unlabelled slices replaced
    assert np.array_equal(result == 2, drawn == 2)                  # other segment untouched
    assert bridge.find_segment_id(segmentation, "liver") == ids[0]  # replaced, not added


def _paint(segmentation, segment_id, matrix, shape, where, value: int) -> None:
    """Set a segment's voxels at ``where`` to ``value`` as the Segment Editor would (paint 1, erase 0)."""
    mask = bridge.segment_mask(segmentation, segment_id, shape, matrix)
    mask[where] = value
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = bridge._oriented_image(mask, matrix)
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent())


def test_a_predicted_slice_the_user_emptied_stays_empty_until_drawn_on(scene):
    geometry = GRIDS["axial"]
    volume = _volume(scene, geometry)
    matrix = bridge.volume_ijk_to_ras(volume)
    shape = geometry.size[::-1]                     # 7 slices along array axis 0
    drawn = np.zeros(shape, np.uint16)
    drawn[1, 2:5, 2:5] = 1                          # liver drawn on slice 1
    drawn[1, 6:8, 6:9] = 2                          # spleen too
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    liver, spleen = bridge.import_label_map(segmentation, drawn, matrix, SEGMENTS[:2])
    predicted = np.zeros(shape, np.uint16)
    predicted[1:6, 1:6, 1:6] = 1                    # Propagate: liver on 1..5 (1 is kept as drawn)
    predicted[1:6, 6:8, 6:9] = 2
    bridge.import_label_map(segmentation, predicted, matrix, SEGMENTS[:2], axis=0, mark_predicted=True)
    assert bridge.segment_absent_slices(segmentation, liver, shape, matrix, 0) == []

    # The liver does not reach slice 5: the user erases it there (and only there).
    _paint(segmentation, liver, matrix, shape, 5, 0)
    assert bridge.segment_absent_slices(segmentation, liver, shape, matrix, 0) == [5]
    assert bridge.segment_drawn_slices(segmentation, liver, shape, matrix, 0)[1] == [1]   # emptied is not drawn
    assert bridge.segment_absent_slices(segmentation, liver, shape, matrix, 1) == []     # another axis: unknown
    assert bridge.absent_slices_by_name(segmentation, volume, [liver, spleen], 0) == {"liver": [5]}

    # Propagate again: the new prediction runs to slice 6, but slice 5 stays empty and stays absent.
    second = np.zeros(shape, np.uint16)
    second[1:7, 2:6, 2:6] = 1
    bridge.import_label_map(segmentation, second, matrix, SEGMENTS[:1], axis=0, mark_predicted=True)
    mask = bridge.segment_mask(segmentation, liver, shape, matrix)
    assert not mask[5].any()
    assert np.array_equal(mask[6], second[6] == 1) and np.array_equal(mask[1], drawn[1] == 1)
    assert bridge.prediction_record(segmentation, liver).absent == {5}
    assert bridge.segment_absent_slices(segmentation, liver, shape, matrix, 0) == [5]

    # The user draws the liver on slice 5 after all: it is drawing now, kept by the next import.
    _paint(segmentation, liver, matrix, shape, (5, slice(3, 5), slice(3, 5)), 1)
    assert bridge.segment_absent_slices(segmentation, liver, shape, matrix, 0) == []
    assert bridge.segment_drawn_slices(segmentation, liver, shape, matrix, 0)[1] == [1, 5]
    before = bridge.segment_mask(segmentation, liver, shape, matrix)[5].copy()
    bridge.import_label_map(segmentation, second, matrix, SEGMENTS[:1], axis=0, mark_predicted=True)
    assert np.array_equal(bridge.segment_mask(segmentation, liver, shape, matrix)[5], before)
    assert bridge.prediction_record(segmentation, liver).absent == set()


def test_new_segments_are_added_without_replace(scene):
    geometry = GRIDS["axial"]
    volume = _volume(scene, geometry)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    labels = _labels(geometry.size[::-1])
    matrix = bridge.volume_ijk_to_ras(volume)
    bridge.import_label_map(segmentation, labels, matrix, SEGMENTS)
    bridge.import_label_map(segmentation, labels, matrix, SEGMENTS[:1], replace=False)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 4


def test_the_panel_plane_follows_the_direction_matrix(scene):
    """The bridge asks the engine's one resolver (slices.resolve_axis): planes by direction, i/j/k as stored."""
    axial, coronal = _volume(scene, GRIDS["axial"]), _volume(scene, GRIDS["coronal"])
    assert [bridge.volume_array_axis(axial, a) for a in ("axial", "coronal", "sagittal")] == [0, 1, 2]
    assert [bridge.volume_array_axis(coronal, a) for a in ("axial", "coronal", "sagittal")] == [1, 0, 2]
    assert [bridge.volume_array_axis(coronal, a) for a in ("k", "j", "i")] == [0, 1, 2]
    assert bridge.adapter_array_axis(coronal, "k", "axial") == 1      # the adapter's plane, in this volume
    assert bridge.adapter_array_axis(coronal, "k", None) == 0         # format 1: its voxel axis
    assert bridge.describe_array_axis(coronal, 1) == "voxel axis j, the axial plane of this volume"
    with pytest.raises(ValueError):
        bridge.volume_array_axis(axial, "oblique")


@pytest.mark.parametrize("name", ["oblique", "sagittal"])
def test_volume_node_matches_simpleitk_reading_the_same_file(scene, tmp_path, name):
    geometry = GRIDS[name]
    array = np.random.default_rng(1).normal(size=geometry.size[::-1]).astype(np.float32)
    path = write_image(tmp_path / "image.nrrd", array, geometry)

    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(volume)

    image = sitk.ReadImage(str(path))
    voxels, matrix = bridge.volume_to_array(volume)
    assert np.array_equal(voxels, sitk.GetArrayFromImage(image))
    assert bridge.volume_geometry(volume).differences(VolumeGeometry.from_image(image)) == []

    exported = tmp_path / "exported.nrrd"
    bridge.export_volume_file(volume, exported)
    again = sitk.ReadImage(str(exported))
    assert np.array_equal(sitk.GetArrayFromImage(again), voxels)
    assert VolumeGeometry.from_image(again).differences(geometry) == []


def test_seg_nrrd_from_volume_io_loads_in_slicer(scene, tmp_path):
    geometry = GRIDS["oblique"]
    labels = _labels(geometry.size[::-1]) * 2   # label values 2, 4, 6
    segments = [Segment(s.label * 2, s.name, s.color) for s in SEGMENTS]
    path = write_label_map(tmp_path / "labels.seg.nrrd", labels, geometry, segments)
    volume = _volume(scene, geometry)

    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation)

    exported = bridge.segmentation_to_label_map(segmentation, volume)
    assert [s.name for s in exported.segments] == ["liver", "spleen", "nodule"]
    assert all(np.allclose(a.color, b.color, atol=1e-5) for a, b in zip(exported.segments, segments))
    for new_label, segment in enumerate(segments, start=1):
        assert np.array_equal(exported.array == new_label, labels == segment.label)


def test_label_map_files_round_trip_through_the_segmentation(scene, tmp_path):
    geometry = GRIDS["coronal"]
    volume = _volume(scene, geometry)
    labels = _labels(geometry.size[::-1])
    source = write_label_map(tmp_path / "result.seg.nrrd", labels, geometry, SEGMENTS)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    bridge.import_label_map_file(source, segmentation, volume)

    out = tmp_path / "labels.seg.nrrd"
    bridge.export_label_map_file(segmentation, volume, None, out)
    array, read_geometry, segments = read_label_map(out)
    assert np.array_equal(array, labels)
    assert read_geometry.differences(geometry) == []
    assert [(s.label, s.name) for s in segments] == [(s.label, s.name) for s in SEGMENTS]


def test_label_map_on_another_grid_is_refused(scene, tmp_path):
    volume = _volume(scene, GRIDS["axial"])
    other = GRIDS["unit_spacing"]
    path = write_label_map(tmp_path / "result.seg.nrrd", _labels(other.size[::-1]), other, SEGMENTS)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    with pytest.raises(bridge.BridgeError, match="not on the grid"):
        bridge.import_label_map_file(path, segmentation, volume)


@pytest.mark.parametrize("linear", [True, False])
def test_volumes_under_a_transform_are_refused(scene, linear):
    volume = _volume(scene, GRIDS["axial"])
    if linear:
        transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    else:
        transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
        grid = slicer.vtkOrientedGridTransform()
        field = vtk.vtkImageData()
        field.SetDimensions(2, 2, 2)
        field.AllocateScalars(vtk.VTK_DOUBLE, 3)
        field.GetPointData().GetScalars().Fill(0.5)
        grid.SetDisplacementGridData(field)
        transform.SetAndObserveTransformFromParent(grid)
    volume.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(bridge.BridgeError, match="Harden the transform"):
        bridge.volume_to_array(volume)


def test_converter_rules_allow_closed_surfaces(scene):
    geometry = GRIDS["axial"]
    volume = _volume(scene, geometry)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    bridge.import_label_map(segmentation, _labels(geometry.size[::-1]), bridge.volume_ijk_to_ras(volume), SEGMENTS)
    assert segmentation.CreateClosedSurfaceRepresentation()
