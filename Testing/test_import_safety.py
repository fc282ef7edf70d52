"""Writing a propagation result back never alters a drawn slice, and can be undone in one step (real MRML).

Each case on ``slicer-core``: protection comes from every written segment's
own mask at the moment of the import (whatever the panel had checked, and
including slices drawn while the worker ran), on the segmentation's own grid
(no resampling of drawn voxels), only inside the propagated range. Then undo
in one step, and the panel's choices saved with the scene.
"""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for the MRML tests")

from SALTSegmentLib import slicer_bridge as bridge  # noqa: E402
from SALTSegmentLib.slices import occupied_slices  # noqa: E402
from SALTSegmentLib.host.panel_state import NODE_ROLES, PanelState  # noqa: E402
from SALTSegmentLib.volume_io import Segment, write_label_map  # noqa: E402

SHAPE = (8, 12, 10)   # (k, j, i)
MATRIX = np.diag([-0.9, -0.9, 2.5, 1.0])
LIVER, SPLEEN = Segment(1, "liver", (0.8, 0.3, 0.2)), Segment(2, "spleen", (0.2, 0.4, 0.9))


@pytest.fixture(scope="module", autouse=True)
def converter_rules():
    bridge.ensure_converter_rules()


@pytest.fixture()
def scene():
    scene = slicer.vtkMRMLScene()
    yield scene
    scene.Clear(1)


def _volume(scene):
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "volume")
    bridge.update_volume_from_array(node, np.zeros(SHAPE, np.int16), MATRIX)
    return node


def _draw(segmentation, segment_id, k, rows, cols, shape=SHAPE, matrix=MATRIX):
    """Add voxels to one slice of a segment, as a Segment Editor stroke would (on the segmentation's grid)."""
    mask = bridge.segment_mask(segmentation, segment_id, shape, matrix)
    mask[k, rows, cols] = 1
    logic = slicer.vtkSlicerSegmentationsModuleLogic
    image = bridge._oriented_image(mask, matrix)
    assert logic.SetBinaryLabelmapToSegment(image, segmentation, segment_id, logic.MODE_REPLACE, image.GetExtent())


def _drawn_segmentation(scene):
    """liver drawn on slice 2, spleen on slice 5 (imported as drawing, not as a prediction)."""
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    drawn = np.zeros(SHAPE, np.uint16)
    drawn[2, 3:6, 3:6] = 1
    drawn[5, 6:9, 2:5] = 2
    ids = bridge.import_label_map(segmentation, drawn, MATRIX, [LIVER, SPLEEN])
    return segmentation, ids, drawn


def _prediction() -> np.ndarray:
    predicted = np.zeros(SHAPE, np.uint16)
    predicted[:, 1:10, 1:8] = 1     # liver everywhere, disagreeing with both drawn slices
    predicted[:, 9:11, 8:10] = 2    # spleen somewhere else
    return predicted


def _masks(segmentation, ids):
    return [bridge.segment_mask(segmentation, i, SHAPE, MATRIX) for i in ids]


def test_every_written_segment_keeps_its_own_drawn_slices(scene):
    """Nothing checked in the panel, or a segment the adapter writes but the user did not check: each segment's
    own mask protects it (the import takes no list of protected slices from the panel any more)."""
    segmentation, ids, drawn = _drawn_segmentation(scene)
    written = bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER, SPLEEN], mark_predicted=True)
    assert written == ids
    liver, spleen = _masks(segmentation, ids)
    assert np.array_equal(liver[2], drawn[2] == 1)            # liver's drawn slice, exactly
    assert np.array_equal(spleen[5], drawn[5] == 2)           # spleen's drawn slice, exactly
    prediction = _prediction()
    assert np.array_equal(liver[5], prediction[5] == 1)       # spleen's slice is not liver's drawing
    assert np.array_equal(spleen[2], prediction[2] == 2)
    for k in (0, 1, 3, 4, 6, 7):
        assert np.array_equal(liver[k], prediction[k] == 1) and np.array_equal(spleen[k], prediction[k] == 2)


def test_slices_drawn_while_the_worker_ran_are_kept(scene):
    segmentation, ids, _ = _drawn_segmentation(scene)
    # The worker got its labels here; then the user draws liver on slice 6 before the result comes back.
    _draw(segmentation, ids[0], 6, slice(0, 2), slice(0, 3))
    before = _masks(segmentation, ids)[0][6].copy()
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    assert np.array_equal(_masks(segmentation, ids)[0][6], before)


def test_drawn_voxels_are_not_resampled_when_the_segmentation_grid_is_finer(scene):
    """The segmentation is edited on a grid twice as fine in-plane as the volume's (Segment Editor's
    'oversampling'): a one-voxel checkerboard drawn there must survive the import exactly."""
    volume = _volume(scene)
    fine_shape = (SHAPE[0], SHAPE[1] * 2, SHAPE[2] * 2)
    fine = MATRIX.copy()
    fine[:3, :3] = MATRIX[:3, :3] @ np.diag([0.5, 0.5, 1.0])
    fine[:3, 3] = MATRIX[:3, 3] + MATRIX[:3, :3] @ np.array([-0.25, -0.25, 0.0])  # the same outer bounds
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    checker = np.zeros(fine_shape, np.uint16)
    checker[3, 4:12, 4:12] = (np.indices((8, 8)).sum(axis=0) % 2 == 0)
    ids = bridge.import_label_map(segmentation, checker, fine, [LIVER])
    assert bridge.segmentation_grid(segmentation, volume)[0] == fine_shape

    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    after = bridge.segment_mask(segmentation, ids[0], fine_shape, fine)
    assert np.array_equal(after[3], checker[3] == 1)
    # the other slices hold the prediction, at the fine resolution (each volume voxel becomes 2 x 2)
    expected = np.repeat(np.repeat(_prediction()[4] == 1, 2, axis=0), 2, axis=1)
    assert np.array_equal(after[4], expected)


def test_outside_the_propagated_range_nothing_changes(scene):
    segmentation, ids, _ = _drawn_segmentation(scene)
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    before = _masks(segmentation, ids)[0]
    second = np.zeros(SHAPE, np.uint16)
    second[:, 0:2, 0:2] = 1
    bridge.import_label_map(segmentation, second, MATRIX, [LIVER], slice_range=(3, 4), mark_predicted=True)
    after = _masks(segmentation, ids)[0]
    for k in range(SHAPE[0]):
        if k in (3, 4):
            assert np.array_equal(after[k], second[k] == 1)
        else:
            assert np.array_equal(after[k], before[k]), f"slice {k} outside the range changed"


def test_a_second_propagation_replaces_untouched_predictions_but_keeps_corrections(scene):
    segmentation, ids, drawn = _drawn_segmentation(scene)
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    _draw(segmentation, ids[0], 7, slice(10, 12), slice(8, 10))     # the user corrects predicted slice 7
    corrected = _masks(segmentation, ids)[0][7].copy()
    assert bridge.drawn_slice_indices(segmentation, _volume(scene), ids[:1], 0) == [2, 7]

    second = np.zeros(SHAPE, np.uint16)
    second[:, 4:6, 4:6] = 1
    bridge.import_label_map(segmentation, second, MATRIX, [LIVER], mark_predicted=True)
    after = _masks(segmentation, ids)[0]
    assert np.array_equal(after[2], drawn[2] == 1)
    assert np.array_equal(after[7], corrected)
    for k in (0, 1, 3, 4, 5, 6):
        assert np.array_equal(after[k], second[k] == 1), f"untouched prediction on slice {k} was not replaced"


def test_the_worker_gets_only_drawn_slices_as_labels(scene, tmp_path):
    volume = _volume(scene)
    segmentation, ids, drawn = _drawn_segmentation(scene)
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    exported = bridge.export_label_map_file(segmentation, volume, ids, tmp_path / "labels.seg.nrrd",
                                            drawn_only_axis=0)
    assert occupied_slices(exported.array, 0) == [2, 5]
    assert np.array_equal(exported.array, drawn)


def test_the_result_file_is_written_back_on_the_volume_grid(scene, tmp_path):
    volume = _volume(scene)
    segmentation, ids, drawn = _drawn_segmentation(scene)
    geometry = bridge.volume_geometry(volume)
    path = write_label_map(tmp_path / "result.seg.nrrd", _prediction(), geometry, [LIVER, SPLEEN])
    assert bridge.import_label_map_file(path, segmentation, volume, axis=0) == ids
    liver, spleen = _masks(segmentation, ids)
    assert np.array_equal(liver[2], drawn[2] == 1) and np.array_equal(spleen[5], drawn[5] == 2)


def test_undo_restores_the_whole_segmentation_in_one_step(scene):
    volume = _volume(scene)
    segmentation, ids, drawn = _drawn_segmentation(scene)
    before = bridge.segmentation_to_label_map(segmentation, volume).array
    undo = bridge.UndoPoint(segmentation)
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [LIVER], mark_predicted=True)
    bridge.import_label_map(segmentation, _prediction(), MATRIX, [Segment(3, "new", (0, 1, 0))],
                            replace=False, mark_predicted=True)
    assert segmentation.GetSegmentation().GetNumberOfSegments() == 3
    assert undo.restore()
    assert bridge.segment_ids(segmentation) == ids
    assert np.array_equal(bridge.segmentation_to_label_map(segmentation, volume).array, before)
    assert bridge.prediction_record(segmentation, ids[0]) is None
    assert not undo.restore()  # one step: nothing more to undo


def test_panel_choices_are_saved_with_the_scene(scene, tmp_path):
    volume = _volume(scene)
    segmentation, _, _ = _drawn_segmentation(scene)
    node = scene.AddNewNodeByClass("vtkMRMLScriptedModuleNode")
    state = PanelState(method="lora", rank="large", device="mps", whole_volume=False, first=2, last=5,
                       adapter="/lib/liver.safetensors", result="add")
    bridge.write_parameters(node, state.to_parameters(),
                            {"InputVolume": volume, "Segmentation": segmentation, "ReferenceSegmentation": None})
    scene.SetURL(str(tmp_path / "scene.mrml"))
    assert scene.Commit()

    loaded = slicer.vtkMRMLScene()
    loaded.SetURL(str(tmp_path / "scene.mrml"))
    assert loaded.Connect()
    values, nodes = bridge.read_parameters(loaded.GetFirstNodeByClass("vtkMRMLScriptedModuleNode"), NODE_ROLES)
    assert PanelState.from_parameters(values) == state
    assert nodes["InputVolume"].GetName() == "volume" and nodes["ReferenceSegmentation"] is None
    assert nodes["Segmentation"].GetID() == segmentation.GetID()
    loaded.Clear(1)


def test_grid_of_a_segmentation_without_geometry_is_the_volume_grid(scene):
    volume = _volume(scene)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    shape, matrix = bridge.segmentation_grid(segmentation, volume)
    assert shape == SHAPE and np.allclose(matrix, MATRIX)
