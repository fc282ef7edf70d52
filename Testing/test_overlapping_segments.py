"""Overlapping segments: Slicer's multi-layer ``.seg.nrrd`` read, trained on, propagated and scored.

The layered files are written by Slicer's own storage node (``slicer-core``),
as a Slicer user's would be: each overlapping segment in its own layer, both
layers numbering their segment 1. Outputs are read back with the same node.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch.nn.functional as F

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel writes and reads the real Slicer files")

from SALTSegmentLib import preprocessing as pp  # noqa: E402
from SALTSegmentLib import slicer_bridge as bridge  # noqa: E402
from SALTSegmentLib.label_layers import flatten_layers, segment_mask, stack_in_layers  # noqa: E402
from SALTSegmentLib.models import load_model  # noqa: E402
from SALTSegmentLib.pipeline import (PropagateJob, TrainJob, evaluate_files, read_labelled_volume,  # noqa: E402
                                     run_propagation, run_training)
from SALTSegmentLib.propagation import PropagationConfig, PropagationInputError  # noqa: E402
from SALTSegmentLib.training import FewShotData, FewShotTrainer, TrainingConfig  # noqa: E402
from SALTSegmentLib.volume_io import (Segment, VolumeGeometry, VolumeReadError, read_image,  # noqa: E402
                                      read_label_map, unlisted_label_values, write_label_map)

FIRST, COUNT = 28, 8          # axial slices of the sample (the left thalamus runs through them)
DRAWN = [2, 6]
COLORS = {"Thalamus_L": (0.9, 0.7, 0.2), "Lesion": (0.1, 0.8, 0.3)}
FAST = dict(copies_per_slice=1, batch_size=1, checkpoint_every=0)


def _write_with_slicer(path: Path, geometry: VolumeGeometry, masks: dict[str, np.ndarray]) -> Path:
    """Save ``masks`` as Slicer does: one segment per labelmap (so overlaps get layers), full volume grid."""
    bridge.ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    ijk_to_ras = bridge.ijk_to_ras_from_geometry(geometry)
    bridge.update_volume_from_array(volume, np.zeros(geometry.size[::-1], np.int16), ijk_to_ras)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for name, mask in masks.items():
        segment = slicer.vtkSegment()
        segment.SetName(name)
        segment.SetColor(*COLORS[name])
        segment.AddRepresentation("Binary labelmap", bridge._oriented_image(mask.astype(np.uint8), ijk_to_ras))
        segmentation.GetSegmentation().AddSegment(segment, name)
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.WriteData(segmentation)
    scene.Clear(1)
    return path


def _read_with_slicer(path: Path, geometry: VolumeGeometry) -> tuple[int, dict[str, tuple[tuple, np.ndarray]]]:
    """(layers, {name: (colour, mask)}) as Slicer's storage node loads the file."""
    bridge.ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(segmentation)
    ijk_to_ras = bridge.ijk_to_ras_from_geometry(geometry)
    found = {}
    for segment_id in bridge.segment_ids(segmentation):
        segment = segmentation.GetSegmentation().GetSegment(segment_id)
        found[segment.GetName()] = (tuple(segment.GetColor()), bridge.segment_mask(
            segmentation, segment_id, geometry.size[::-1], ijk_to_ras).astype(bool))
    layers = segmentation.GetSegmentation().GetNumberOfLayers()
    scene.Clear(1)
    return layers, found


@pytest.fixture(scope="module")
def layered_case(tmp_path_factory, sample_image_path, sample_labels_path) -> dict:
    """Eight slices of the sample; the left thalamus and a 'lesion' that covers part of it, in two layers."""
    folder = tmp_path_factory.mktemp("layered_case")
    image = sitk.ReadImage(str(sample_image_path))
    size = list(image.GetSize())
    sitk.WriteImage(sitk.RegionOfInterest(image, [size[0], size[1], COUNT], [0, 0, FIRST]), str(folder / "image.nrrd"))
    _, geometry = read_image(folder / "image.nrrd")
    labels, _, _ = read_label_map(sample_labels_path)
    thalamus = labels[FIRST:FIRST + COUNT] == 1
    _, ys, xs = np.nonzero(thalamus)
    lesion = np.zeros_like(thalamus)
    y0, x0 = int(np.median(ys)), int(np.median(xs))
    lesion[:, y0 - 4:y0 + 8, x0 - 4:x0 + 8] = True          # half inside the thalamus, half outside
    reference = {"Thalamus_L": thalamus, "Lesion": lesion}
    drawn = {}
    for name, mask in reference.items():
        drawn[name] = np.zeros_like(mask)
        drawn[name][DRAWN] = mask[DRAWN]
    assert (drawn["Thalamus_L"] & drawn["Lesion"]).sum() > 20
    return {"folder": folder, "geometry": geometry, "reference": reference, "drawn": drawn,
            "drawn_path": _write_with_slicer(folder / "drawn.seg.nrrd", geometry, drawn),
            "reference_path": _write_with_slicer(folder / "reference.seg.nrrd", geometry, reference)}


def test_slicer_multi_layer_file_is_read_with_names_colours_and_values(layered_case):
    header = Path(layered_case["drawn_path"]).read_bytes()[:400]
    assert b"kinds: list domain domain domain" in header       # what Slicer really wrote
    labels, geometry, segments = read_label_map(layered_case["drawn_path"])
    assert labels.shape == (2, *layered_case["geometry"].size[::-1])
    assert geometry.differences(layered_case["geometry"]) == []
    assert [(s.name, s.layer) for s in segments] == [("Thalamus_L", 0), ("Lesion", 1)]
    assert [s.label for s in segments] == [1, 2]      # both are 1 in their own layer: one value per segment here
    assert all(np.allclose(s.color, COLORS[s.name]) for s in segments)
    for segment in segments:
        assert np.array_equal(segment_mask(labels, segment), layered_case["drawn"][segment.name])


def test_written_layers_load_in_slicer_with_overlaps_intact(layered_case, tmp_path):
    geometry, reference = layered_case["geometry"], layered_case["reference"]
    segments = [Segment(3, "Thalamus_L", COLORS["Thalamus_L"]), Segment(7, "Lesion", COLORS["Lesion"])]
    labels, placed = stack_in_layers(reference.values(), segments, geometry.size[::-1])
    assert labels.ndim == 4 and [s.layer for s in placed] == [0, 1]
    path = write_label_map(tmp_path / "out.seg.nrrd", labels, geometry, placed)
    assert b"kinds: list domain domain domain" in path.read_bytes()[:400]
    layers, found = _read_with_slicer(path, geometry)
    assert layers == 2
    assert set(found) == set(reference)
    for name, (color, mask) in found.items():
        assert np.allclose(color, COLORS[name], atol=1e-5)
        assert np.array_equal(mask, reference[name])
    again, _, read_back = read_label_map(path)
    assert np.array_equal(again, labels) and read_back == placed


def test_segments_that_do_not_overlap_stay_one_layer():
    a, b = np.zeros((2, 3, 3), bool), np.zeros((2, 3, 3), bool)
    a[0], b[1] = True, True
    labels, placed = stack_in_layers([a, b], [Segment(1, "a"), Segment(2, "b")], (2, 3, 3))
    assert labels.shape == (2, 3, 3) and [s.layer for s in placed] == [0, 0]


def test_a_vector_image_that_is_no_segmentation_is_still_refused(tmp_path):
    image = sitk.GetImageFromArray(np.zeros((4, 5, 6, 2), np.uint8), isVector=True)
    sitk.WriteImage(image, str(tmp_path / "rgb.nrrd"))
    with pytest.raises(VolumeReadError, match="2 components per voxel"):
        read_label_map(tmp_path / "rgb.nrrd")


def test_training_builds_each_segments_target_from_its_own_mask(layered_case):
    folder = layered_case["folder"]
    volume = read_labelled_volume(folder / "image.nrrd", layered_case["drawn_path"])
    data = FewShotData(volume.image, volume.labels, volume.geometry.spacing, volume.segments,
                       pp.parse_intensity("auto", volume.image), "axial")
    trainer = FewShotTrainer(load_model("lite_medsam"), data,
                             TrainingConfig(method="lora", steps=0, copies_per_slice=1, checkpoint_every=0))
    assert trainer.slices == DRAWN
    geometry = trainer.slice_geometry
    for copy, index in enumerate(DRAWN):   # one copy per slice: the slice as drawn
        for k, segment in enumerate(data.segments):
            own = pp.mask_to_input(pp.take_slice(layered_case["drawn"][segment.name], "axial", index), geometry)
            factor = own.shape[-1] // trainer.low_res
            expected = pp.binarize_keeping_small(F.avg_pool2d(own[None, None], factor)[0, 0] if factor > 1 else own)
            assert np.array_equal(trainer.bank.targets[copy, k].numpy(), expected.numpy()), segment.name
    assert (trainer.bank.targets[:, 0] & trainer.bank.targets[:, 1]).sum() > 0   # the overlap trains both


@pytest.fixture(scope="module")
def layered_adapter(layered_case) -> Path:
    folder = layered_case["folder"]
    job = TrainJob(image=str(folder / "image.nrrd"), labels=str(layered_case["drawn_path"]),
                   out=str(folder / "adapter.safetensors"),
                   config=TrainingConfig(method="decoder", steps=3, seed=0, **FAST))
    outcome = run_training(job)
    assert [s["name"] for s in outcome.metadata.segments] == ["Thalamus_L", "Lesion"]
    assert outcome.result.steps_done == 3 and all(np.isfinite(outcome.result.losses))
    return outcome.adapter_path


def test_propagation_writes_overlapping_drawn_segments_back_as_layers(layered_case, layered_adapter, tmp_path):
    folder, geometry = layered_case["folder"], layered_case["geometry"]
    out = tmp_path / "result.seg.nrrd"
    outcome = run_propagation(PropagateJob(image=str(folder / "image.nrrd"), adapter=str(layered_adapter),
                                           out=str(out), labels=str(layered_case["drawn_path"]),
                                           config=PropagationConfig(estimate=False, slice_range=(2, 4))))
    assert outcome.labelled_slices == DRAWN and list(outcome.result.slices) == [2, 3, 4]
    labels, _, segments = read_label_map(out)
    assert labels.ndim == 4 and {s.layer for s in segments} == {0, 1}
    for segment in segments:
        mask = segment_mask(labels, segment)
        assert np.array_equal(mask[DRAWN], layered_case["drawn"][segment.name][DRAWN]), segment.name
        assert np.allclose(segment.color, COLORS[segment.name])
    thalamus, lesion = (segment_mask(labels, segment) for segment in segments)
    assert (thalamus & lesion)[3:5].sum() > 0       # propagated slices keep the overlap too
    layers, found = _read_with_slicer(out, geometry)     # Slicer loads it, overlap included
    assert layers == 2
    assert (found["Thalamus_L"][1][DRAWN] & found["Lesion"][1][DRAWN]).sum() == \
        (layered_case["drawn"]["Thalamus_L"] & layered_case["drawn"]["Lesion"]).sum()


def test_propagation_of_layers_that_no_longer_overlap_writes_one_layer(layered_case, layered_adapter, tmp_path):
    folder = layered_case["folder"]
    apart = {"Thalamus_L": layered_case["drawn"]["Thalamus_L"],
             "Lesion": layered_case["drawn"]["Lesion"] & ~layered_case["drawn"]["Thalamus_L"]}
    # Slicer itself packs segments that do not overlap into one layer when it saves; a file edited since
    # (the overlap erased) may still hold two, as this one does.
    layers = np.stack([apart["Thalamus_L"], apart["Lesion"] * 2]).astype(np.uint8)
    drawn = write_label_map(tmp_path / "apart.seg.nrrd", layers, layered_case["geometry"],
                            [Segment(1, "Thalamus_L", COLORS["Thalamus_L"], 0),
                             Segment(2, "Lesion", COLORS["Lesion"], 1)])
    assert read_label_map(drawn)[0].ndim == 4
    out = tmp_path / "result.seg.nrrd"
    run_propagation(PropagateJob(image=str(folder / "image.nrrd"), adapter=str(layered_adapter), out=str(out),
                                 labels=str(drawn), config=PropagationConfig(mode="interpolate")))
    labels, _, segments = read_label_map(out)
    assert labels.ndim == 3
    for segment in segments:
        assert np.array_equal((labels == segment.label)[DRAWN], apart[segment.name][DRAWN])


def test_evaluate_scores_each_overlapping_segment_on_its_own_voxels(layered_case, tmp_path):
    reference_path = layered_case["reference_path"]
    report = evaluate_files(reference_path, reference_path)
    assert [round(s.dice, 6) for s in report.segments] == [1.0, 1.0]
    labels, geometry, segments = read_label_map(reference_path)
    flat = write_label_map(tmp_path / "flat.seg.nrrd", flatten_layers(labels, segments), geometry,
                           [Segment(s.label, s.name, s.color) for s in segments])
    scores = {s.name: s.dice for s in evaluate_files(flat, reference_path).segments}
    assert scores["Lesion"] == 1.0                 # the smaller segment keeps the overlap
    assert 0.5 < scores["Thalamus_L"] < 1.0        # the larger one lost it: scored on its own voxels


def test_propagation_refuses_an_output_that_cannot_hold_layers(layered_case, layered_adapter, tmp_path):
    folder = layered_case["folder"]
    job = PropagateJob(image=str(folder / "image.nrrd"), adapter=str(layered_adapter), out=str(tmp_path / "r.nii.gz"),
                       labels=str(layered_case["drawn_path"]))
    with pytest.raises(PropagationInputError, match="only a .seg.nrrd holds"):
        run_propagation(job)
    assert not (tmp_path / "r.nii.gz").exists()


def test_a_value_a_layer_does_not_list_is_reported(tmp_path):
    layers = np.zeros((2, 3, 4, 5), np.uint8)
    layers[0, 0] = 1
    layers[1, 1] = 2
    layers[1, 2, 0, :2] = 5                    # listed for no segment of layer 1
    layers[1, 2, 1, :3] = 1                    # layer 0's segment value, but not a segment of layer 1
    path = write_label_map(tmp_path / "l.seg.nrrd", layers, VolumeGeometry((5, 4, 3), (1.0, 1.0, 1.0)),
                           [Segment(1, "a", layer=0), Segment(2, "b", layer=1)])
    labels, _, segments = read_label_map(path)
    assert segment_mask(labels, segments[0]).sum() == 20       # a is layer 0's voxels only
    unlisted = unlisted_label_values(labels, segments)
    assert unlisted[5] == 2 and sum(unlisted.values()) == 5


def test_the_slicer_panel_exports_overlapping_segments_as_layers(layered_case, tmp_path):
    geometry, drawn = layered_case["geometry"], layered_case["drawn"]
    bridge.ensure_converter_rules()
    scene = slicer.vtkMRMLScene()
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    bridge.update_volume_from_array(volume, np.zeros(geometry.size[::-1], np.int16),
                                    bridge.ijk_to_ras_from_geometry(geometry))
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(layered_case["drawn_path"]))
    assert storage.ReadData(segmentation)
    exported = bridge.export_label_map_file(segmentation, volume, None, tmp_path / "drawn.seg.nrrd", 0)
    assert exported.array.ndim == 4 and exported.geometry.differences(geometry) == []
    labels, _, segments = read_label_map(tmp_path / "drawn.seg.nrrd")
    for segment in segments:
        assert np.array_equal(segment_mask(labels, segment), drawn[segment.name]), segment.name
    scene.Clear(1)
