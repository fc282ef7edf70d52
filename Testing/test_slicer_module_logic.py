"""The module's Logic run for real on MRML (slicer-core) and the real CLI, with only Qt and the app stubbed.

The Slicer application cannot run here, so ``qt``/``ctk`` are stand-ins that
accept any call and ``slicer.app`` is a small object with the properties the
Logic reads. Everything else is real: the scene, the storage nodes, the
bridge, the files, and the worker command the Logic builds, which is run
with the same driver the tests of the worker use. This catches what static
checks cannot (a wrong name, a missing argument, a result written back
wrong) in the code Slicer would run.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types
from pathlib import Path
from unittest import mock

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="the slicer-core wheel is needed for the MRML tests")

from SALTSegmentLib import slicer_bridge as bridge  # noqa: E402
from SALTSegmentLib.slices import occupied_slices  # noqa: E402
from SALTSegmentLib.host.worker_driver import SubprocessWorker, worker_environment  # noqa: E402
from SALTSegmentLib.volume_io import read_label_map  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
MODULE_DIR = REPO / "SALTSegment"


class FakeApp:
    majorVersion, minorVersion = 5, 10

    def __init__(self, folder: Path) -> None:
        self.temporaryPath = str(folder / "temp")
        self.slicerUserSettingsFilePath = str(folder / "settings" / "Slicer.ini")
        os.makedirs(self.temporaryPath, exist_ok=True)


def _scripted_loadable_module():
    """Stand-ins for slicer.ScriptedLoadableModule (part of the application, not of slicer-core)."""
    module = types.ModuleType("slicer.ScriptedLoadableModule")

    class ScriptedLoadableModuleLogic:
        def __init__(self, parent=None):
            self.moduleName = type(self).__name__[: -len("Logic")]

        def getParameterNode(self):  # as in Slicer: one singleton scripted module node per module
            node = slicer.mrmlScene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
            if node is None:
                node = slicer.mrmlScene.CreateNodeByClass("vtkMRMLScriptedModuleNode")
                node.UnRegister(None)
                node.SetSingletonTag(self.moduleName)
                node = slicer.mrmlScene.AddNode(node)
            return node

    module.ScriptedLoadableModuleLogic = ScriptedLoadableModuleLogic
    for name in ("ScriptedLoadableModule", "ScriptedLoadableModuleWidget", "ScriptedLoadableModuleTest"):
        setattr(module, name, type(name, (), {}))
    return module


@pytest.fixture()
def module(tmp_path, monkeypatch):
    scene = slicer.vtkMRMLScene()
    monkeypatch.setattr(slicer, "mrmlScene", scene, raising=False)
    monkeypatch.setattr(slicer, "app", FakeApp(tmp_path), raising=False)
    monkeypatch.setitem(sys.modules, "qt", mock.MagicMock(name="qt"))
    monkeypatch.setitem(sys.modules, "ctk", mock.MagicMock(name="ctk"))
    monkeypatch.setitem(sys.modules, "slicer.ScriptedLoadableModule", _scripted_loadable_module())
    spec = importlib.util.spec_from_file_location("SALTSegment", MODULE_DIR / "SALTSegment.py")
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    bridge.ensure_converter_rules()
    yield loaded
    scene.Clear(1)


@pytest.fixture(scope="module")
def adapter(thalamus_crop, sample_image_path, sample_labels_path, write_untrained_adapter) -> Path:
    """An untrained LoRA adapter for the sample's first segment, on the crop's axial slices."""
    from SALTSegmentLib.volume_io import read_image

    _, _, segments = read_label_map(sample_labels_path)
    path, _, _ = write_untrained_adapter(thalamus_crop / "module-lora.safetensors", read_image(sample_image_path)[0],
                                         segments[:1])
    return path


def _load(scene, thalamus_crop):
    volume = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "crop")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(thalamus_crop / "image.nrrd"))
    assert storage.ReadData(volume)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(thalamus_crop / "drawn.seg.nrrd"))
    assert storage.ReadData(segmentation)
    return volume, segmentation


def _run(worker) -> object:
    """Run the command the Logic built, as the QProcess would, and hand the outcome to its callback."""
    driver = SubprocessWorker(worker.command, env=worker_environment(str(MODULE_DIR)))
    outcome = driver.run(timeout=900)
    worker.onFinished and worker.onFinished(outcome)
    return outcome


def test_propagate_keeps_every_drawn_slice_and_undoes_in_one_step(module, thalamus_crop, adapter):
    volume, segmentation = _load(slicer.mrmlScene, thalamus_crop)
    logic = module.SALTSegmentLogic()
    logic.currentAdapter = str(adapter)
    thalamus = bridge.segment_ids(segmentation)[0]
    shape = bridge.volume_to_array(volume)[0].shape
    matrix = bridge.volume_ijk_to_ras(volume)
    # a slice drawn after the adapter was chosen, on a segment nobody "checked" (Propagate takes no selection)
    mask = bridge.segment_mask(segmentation, thalamus, shape, matrix)
    mask[4, 40:44, 50:54] = 1
    image = bridge._oriented_image(mask, matrix)
    logic_ = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic_.SetBinaryLabelmapToSegment(image, segmentation, thalamus, logic_.MODE_REPLACE, image.GetExtent())
    before = bridge.segmentation_to_label_map(segmentation, volume).array

    text, problem = logic.adapterSummary(volume)
    assert problem is None and "Thalamus_L" in text
    assert "voxel axis k, the axial plane" in logic.propagationAxisText(volume, "axial")
    assert "not the coronal plane" in logic.propagationAxisText(volume, "coronal")
    assert logic.propagationSliceCount(volume) == 8

    worker = logic.startPropagation(volume, segmentation, {"mode": "box", "device": "cpu", "replace": True})
    command = worker.command
    assert command[command.index("--stop-file") + 1].endswith("stop")
    labels, _, _ = read_label_map(command[command.index("--labels") + 1])
    assert occupied_slices(labels, 0) == [2, 4, 6]
    folder = logic.pendingResult["folder"]

    outcome = _run(worker)
    assert outcome.status == "ok", outcome.message
    summary = logic.applyPropagationResult(outcome)
    assert "Thalamus_L updated" in summary and not os.path.exists(folder)
    findings = logic.lastFindings                   # what the panel shows and the Slicer log gets
    assert findings.extents and findings.extents[0].startswith("Thalamus_L: slices ")
    assert findings.estimate and findings.estimate.startswith("expected Dice on unlabelled slices")
    assert all(0 <= s.slice < 8 and s.slice not in (2, 4, 6) for s in findings.next_slices)
    after = bridge.segmentation_to_label_map(segmentation, volume).array
    for k in (2, 4, 6):
        assert np.array_equal(after[k], before[k]), f"drawn slice {k} changed"
    assert not np.array_equal(after, before), "propagation wrote nothing"

    red = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSliceNode")   # a slice view's node, axial
    red.SetOrientationToAxial()
    ras = logic.jumpToSlice(volume, 5)
    centre_of_slice_5 = matrix @ np.array([(shape[2] - 1) / 2, (shape[1] - 1) / 2, 5, 1.0])   # (i, j, k, 1)
    np.testing.assert_allclose(ras, centre_of_slice_5[:3], atol=1e-6)
    to_ras = red.GetSliceToRAS()
    np.testing.assert_allclose([to_ras.GetElement(r, 3) for r in range(3)], ras, atol=1e-6)

    assert logic.undoPoint is not None
    logic.undoPropagation()
    assert np.array_equal(bridge.segmentation_to_label_map(segmentation, volume).array, before)
    with pytest.raises(ValueError, match="no propagation to undo"):
        logic.undoPropagation()


def test_a_predicted_slice_the_user_emptied_reaches_both_commands_as_absent(module, thalamus_crop, adapter, caplog):
    """After a Propagate, the user erases the thalamus on slice 7 (it does not reach that far): Fine-tune and
    Propagate both tell the worker, on the exported labels' axis and grid, and the Slicer log says so."""
    volume, segmentation = _load(slicer.mrmlScene, thalamus_crop)
    thalamus = bridge.segment_ids(segmentation)[0]
    exported = bridge.segmentation_to_label_map(segmentation, volume)
    predicted = np.zeros_like(exported.array)
    predicted[:, 40:60, 50:70] = 1                  # a prediction on every slice (the drawn 2 and 6 are kept)
    bridge.import_label_map(segmentation, predicted, exported.ijk_to_ras, exported.segments, axis=0,
                            mark_predicted=True)
    mask = bridge.segment_mask(segmentation, thalamus, predicted.shape, exported.ijk_to_ras)
    mask[7] = 0                                      # the Segment Editor's eraser
    image = bridge._oriented_image(mask, exported.ijk_to_ras)
    logic_ = slicer.vtkSlicerSegmentationsModuleLogic
    assert logic_.SetBinaryLabelmapToSegment(image, segmentation, thalamus, logic_.MODE_REPLACE, image.GetExtent())

    logic = module.SALTSegmentLogic()
    logic.currentAdapter = str(adapter)
    with caplog.at_level("INFO"):
        train = logic.startTraining(volume, segmentation, [thalamus], {"method": "lora", "device": "cpu",
                                                                       "axis": "axial"})
        propagate = logic.startPropagation(volume, segmentation, {"mode": "box", "device": "cpu"})
    for command in (train.command, propagate.command):
        assert command.count("--absent") == 1 and command[command.index("--absent") + 1] == "Thalamus_L=7"
        labels, _, _ = read_label_map(command[command.index("--labels") + 1])
        assert occupied_slices(labels, 0) == [2, 6]  # the untouched prediction is no label; slice 7 is empty
    assert "SALTSegment: Thalamus_L: absent on slice 7 (you emptied it after a propagation)" in caplog.text
    outcome = _run(propagate)                        # the panel's line says the emptied slice was kept empty
    assert outcome.status == "ok", outcome.message
    summary = logic.applyPropagationResult(outcome)
    assert "Kept empty where you emptied them: Thalamus_L on slice 7." in summary
    assert not bridge.segment_mask(segmentation, thalamus, predicted.shape, exported.ijk_to_ras)[7].any()
    logic.cleanup()

    untouched = _load(slicer.mrmlScene, thalamus_crop)[1]   # never propagated: no slice is absent
    command = logic.startPropagation(volume, untouched, {"mode": "box", "device": "cpu"}).command
    assert not any(argument.startswith("--absent") for argument in command)
    logic.discardPropagation()


def test_box_propagation_without_drawing_is_refused_before_any_work(module, thalamus_crop, adapter):
    volume, _ = _load(slicer.mrmlScene, thalamus_crop)
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "empty")
    logic = module.SALTSegmentLogic()
    logic.currentAdapter = str(adapter)
    for mode in ("box", "interpolate"):
        with pytest.raises(ValueError, match=f"'{mode}' propagation starts from your drawn slices"):
            logic.startPropagation(volume, empty, {"mode": mode})
    assert os.listdir(slicer.app.temporaryPath) == []   # its run folder is gone too
    worker = logic.startPropagation(volume, empty, {"mode": "auto", "first": 2, "last": 5})
    assert "--labels" not in worker.command and "--range=2:5" in worker.command
    logic.discardPropagation()


def test_training_keeps_only_the_adapter_and_a_cancelled_run_nothing_else(module, thalamus_crop):
    volume, segmentation = _load(slicer.mrmlScene, thalamus_crop)
    logic = module.SALTSegmentLogic()
    ids = bridge.segment_ids(segmentation)
    finished = []
    worker = logic.startTraining(volume, segmentation, ids, {"method": "lora", "steps": 1, "device": "cpu",
                                                             "axis": "axial"}, onFinished=finished.append)
    assert worker.kind == "train" and "--stop-file" in worker.command
    outcome = _run(worker)
    assert outcome.status == "ok", outcome.message
    assert finished == [outcome]
    folder = os.path.dirname(logic.currentAdapter)
    assert os.listdir(folder) == ["adapter.safetensors"]           # the volume copies are gone
    logic.cleanup()
    assert os.path.exists(logic.currentAdapter)                    # the current adapter stays
    empty = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    empty.GetSegmentation().AddEmptySegment("nothing", "nothing")
    with pytest.raises(ValueError, match="no drawn voxels on this slice axis"):
        logic.startTraining(volume, empty, ["nothing"], {})
    assert sorted(os.listdir(slicer.app.temporaryPath)) == [os.path.basename(folder)]  # no folder left behind


def test_continue_training_an_adapter_of_the_library_on_this_volume(module, thalamus_crop, adapter):
    """"Continue training": the library adapter's method and plane win over the panel's; the lineage is kept."""
    from SALTSegmentLib.host.adapter_metadata import file_sha256

    volume, segmentation = _load(slicer.mrmlScene, thalamus_crop)
    logic = module.SALTSegmentLogic()
    parent = logic.addToLibrary(str(adapter), "site")
    worker = logic.startTraining(volume, segmentation, bridge.segment_ids(segmentation),
                                 {"method": "salt", "axis": "coronal", "steps": 1, "device": "cpu", "init": parent})
    command = worker.command
    assert command[command.index("--init") + 1] == parent
    assert "--method" not in command and "--axis" not in command
    labels, _, _ = read_label_map(command[command.index("--labels") + 1])
    assert occupied_slices(labels, 0) == [2, 6]        # drawn slices taken along the adapter's axial plane
    outcome = _run(worker)
    assert outcome.status == "ok", outcome.message
    metadata = logic.adapterMetadata(logic.currentAdapter)
    assert metadata.method == "lora" and metadata.plane == "axial"
    assert metadata.lineage["parent_sha256"] == file_sha256(parent) and metadata.cases[-1]["labelled_slices"] == [2, 6]
    logic.addToLibrary(logic.currentAdapter, "site-2")
    entries = {entry["name"]: entry for entry in logic.listAdapters()}
    assert entries["site-2"]["details"].startswith("learned from 1 volume (image.nrrd); generation 1, continues ")
    assert entries["site"]["details"].startswith("volumes not recorded")


def test_library_models_dependencies_and_panel_state(module, tmp_path, adapter):
    logic = module.SALTSegmentLogic()
    (Path(logic.adapterFolder()) / "broken.safetensors").write_bytes(b"\x00" * 64)
    logic.addToLibrary(str(adapter), "thalamus")
    entries = {entry["name"]: entry for entry in logic.listAdapters()}
    assert entries["thalamus"]["segment_names"] == ["Thalamus_L"] and entries["thalamus"]["axis"] == "axial"
    assert entries["broken"]["details"].startswith("not usable")
    with pytest.raises(Exception, match="not a safetensors file|too short|truncated"):
        logic.addToLibrary(str(Path(logic.adapterFolder()) / "broken.safetensors"), "again")

    assert not logic.modelStatus("lite_medsam")["downloadable"]
    assert logic.modelStatus("sam_vit_b")["downloadable"]
    assert logic.modelStatus("medsam_vit_b")["text"].startswith("needs a local weights file")
    assert logic.missingDependencies() == []   # this environment has every requirement
    assert logic.versionProblem() is None                    # Slicer 5.10 (the fake app) with this Python
    slicer.app.minorVersion = 8
    assert "needs 3D Slicer 5.10 or later" in logic.versionProblem()

    state = module.PanelState(method="lora", device="mps", adapter=str(adapter))
    volume = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    logic.writePanelState(state, {"InputVolume": volume, "Segmentation": None, "ReferenceSegmentation": None})
    values, nodes = logic.readPanelState()
    assert module.PanelState.from_parameters(values) == state and nodes["InputVolume"] is volume


def test_a_worker_that_fails_to_start_frees_the_panel(module):
    """QProcess reports a failed start through errorOccurred; the outcome must reach onFinished, and the widget
    must hold the worker before starting it (or the callback that frees the panel runs before it holds it)."""
    outcomes = []
    worker = module.QProcessWorker("train", ["/no/such/PythonSlicer", "-m", "SALTSegmentLib.cli"], {},
                                   onFinished=outcomes.append)
    qt = sys.modules["qt"]
    worker.process.errorString.return_value = ""
    worker._error(qt.QProcess.FailedToStart)
    worker._error(qt.QProcess.FailedToStart)      # reported once only
    assert [o.status for o in outcomes] == ["error"]
    assert "/no/such/PythonSlicer" in outcomes[0].message and "unknown reason" in outcomes[0].message

    import ast
    import inspect
    source = inspect.getsource(module.SALTSegmentWidget.startJob)
    lines = [ast.unparse(node) for node in ast.parse(source.strip()).body[0].body]
    assert lines.index("self.worker = worker") < lines.index("worker.start()")


def test_model_list_and_evaluation_run_in_the_worker(module, thalamus_crop, tmp_path, monkeypatch):
    monkeypatch.setenv("SALTSEGMENT_CACHE", str(tmp_path / "empty-cache"))
    logic = module.SALTSegmentLogic()
    assert logic.modelStatus("sam_vit_b")["listable"]
    worker = logic.startModelList()
    assert worker.kind == "models" and worker.command[-2:] == ["models", "--json"]
    assert _run(worker).status == "ok"
    assert logic.modelStatus("sam_vit_b") == {"downloadable": True, "size_bytes": logic._modelInfo["sam_vit_b"][
        "size_bytes"], "listable": False, "text": "download on request"}
    download = logic.startDownload("sam_vit_b")
    assert download.command[-4:] == ["--download", "sam_vit_b", "--progress", "json"] and download.plan.stop_file is None

    volume, segmentation = _load(slicer.mrmlScene, thalamus_crop)
    reference = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "reference")
    storage = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(thalamus_crop / "reference.seg.nrrd"))
    assert storage.ReadData(reference)
    worker = logic.startEvaluation(volume, segmentation, bridge.segment_ids(segmentation), reference)
    outcome = _run(worker)
    assert outcome.status == "ok", outcome.message
    assert '"dice"' in logic.evaluationText(outcome)
    assert os.listdir(slicer.app.temporaryPath) == []          # the exported copies are gone
