"""SALT Segment: few-shot fine-tuning of a Segment Anything model from a few labelled slices.

The widget moves values between the panel and the logic; the logic moves
data between MRML nodes and files and drives the ``saltsegment`` CLI in a
child process (all torch work happens there, never in Slicer's process).
"""

import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile

import ctk
import qt
import slicer
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
METHODS = [("SALT", "salt"), ("LoRA", "lora"), ("S-SAM", "ssam"), ("Mask decoder only", "decoder"),
           ("Full fine-tuning", "full")]
# The engine names the axes of the (k, j, i) voxel array; the panel's anatomical plane is mapped to one of them.
ARRAY_AXIS_NAMES = ("axial", "coronal", "sagittal")
RANK_PRESETS = [("Default (the paper's rank-4 setting)", None), ("Small (half the spectrum, residual rank 2)", "small"),
                ("Large (residual rank 32)", "large")]
MODEL_IDS = ["lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"]
# Slicer ships these; pip must never replace them (see installDependencies).
SLICER_OWNED_PACKAGES = ("numpy", "SimpleITK")


class SALTSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SALT Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SALTSegment developers"]
        self.parent.helpText = """
Segment a whole volume from a few labelled slices. <b>SALT</b> (Singular value Adaptation with
Low-rank Transformation) fine-tunes a small adapter on a frozen Segment Anything model: the top
singular values of each weight get a trainable scale and shift, the rest of the spectrum a
low-rank update. Only a few MB are trained, so a few slices are enough.
<ol>
<li>Select the volume and a segmentation; label a few slices of each structure with the Segment Editor.</li>
<li>Check the segments to learn, choose the base model, method and device.</li>
<li><b>Fine-tune</b> (runs in the background; <b>Cancel</b> keeps the last adapter).</li>
<li><b>Propagate</b> to all slices or a range; your drawn slices are kept as drawn.</li>
<li>Save the adapter in the library to reuse it on new volumes of the same kind.</li>
</ol>
Paper: Elsayed et al., <i>SALT: Singular Value Adaptation with Low-Rank Transformation</i>, 2025,
<a href="https://arxiv.org/abs/2503.16055">arXiv:2503.16055</a>.
"""
        self.parent.acknowledgementText = """
Built on Segment Anything (Meta AI, Apache-2.0) and LiteMedSAM / MedSAM (Bo Wang lab, Apache-2.0),
and on the SALT method of Elsayed et al. 2025. Uses the PyTorch extension to install torch.
"""


#
# Widget
#


class SALTSegmentWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self.worker = None
        self.lossPlot = None
        self._observedSegmentation = None

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SALTSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SALTSegmentLogic()

        for text, value in METHODS:
            self.ui.methodComboBox.addItem(text, value)
        for text, value in RANK_PRESETS:
            self.ui.rankComboBox.addItem(text, value)
        for modelId in MODEL_IDS:
            self.ui.modelComboBox.addItem(modelId)
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.weightsPathLineEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt)"]
        self.ui.adapterTableWidget.setHorizontalHeaderLabels(["Name", "Base model", "Method", "Segments", "Created"])
        self.ui.adapterFolderLabel.text = self.logic.adapterFolder()
        self.lossPlot = LossPlot(self.ui.lossPlotFrame)

        self.ui.inputVolumeSelector.currentNodeChanged.connect(self.updateInputs)
        self.ui.segmentationSelector.currentNodeChanged.connect(self.onSegmentationChanged)
        self.ui.segmentsListWidget.itemChanged.connect(self.updateInputs)
        self.ui.axisComboBox.currentIndexChanged.connect(self.updateInputs)
        self.ui.modelComboBox.currentIndexChanged.connect(self.updateModelInfo)
        self.ui.downloadModelButton.clicked.connect(self.onDownloadModel)
        self.ui.fineTuneButton.clicked.connect(self.onFineTune)
        self.ui.wholeVolumeCheckBox.toggled.connect(self.onWholeVolumeToggled)
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.useAdapterButton.clicked.connect(self.onUseAdapter)
        self.ui.saveAdapterButton.clicked.connect(self.onSaveAdapter)
        self.ui.loadAdapterButton.clicked.connect(self.onImportAdapter)
        self.ui.deleteAdapterButton.clicked.connect(self.onDeleteAdapter)
        self.ui.refreshAdaptersButton.clicked.connect(self.refreshAdapterTable)
        self.ui.referenceSegmentationSelector.currentNodeChanged.connect(self.updateInputs)
        self.ui.evaluateButton.clicked.connect(self.onEvaluate)

        self.refreshAdapterTable()
        self.ui.modelInfoLabel.text = "lite_medsam ships with the package; other models download on request"
        self.onSegmentationChanged(self.ui.segmentationSelector.currentNode())

    def cleanup(self):
        self.removeObservers()
        if self.worker is not None:
            self.worker.cancel()

    # --- inputs ---

    def onSegmentationChanged(self, segmentationNode):
        if self._observedSegmentation is not None:
            self.removeObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentAdded, self.onSegmentsModified)
            self.removeObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentRemoved, self.onSegmentsModified)
            self._observedSegmentation = None
        if segmentationNode is not None:
            self._observedSegmentation = segmentationNode.GetSegmentation()
            self.addObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentAdded, self.onSegmentsModified)
            self.addObserver(self._observedSegmentation, slicer.vtkSegmentation.SegmentRemoved, self.onSegmentsModified)
        self.onSegmentsModified()

    def onSegmentsModified(self, *unused):
        checked = set(self.checkedSegmentIds())
        listWidget = self.ui.segmentsListWidget
        wasBlocked = listWidget.blockSignals(True)
        listWidget.clear()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        if segmentationNode is not None:
            segmentation = segmentationNode.GetSegmentation()
            for index in range(segmentation.GetNumberOfSegments()):
                segmentId = segmentation.GetNthSegmentID(index)
                item = qt.QListWidgetItem(segmentation.GetSegment(segmentId).GetName())
                item.setData(qt.Qt.UserRole, segmentId)
                item.setFlags(item.flags() | qt.Qt.ItemIsUserCheckable)
                item.setCheckState(qt.Qt.Checked if (segmentId in checked or not checked) else qt.Qt.Unchecked)
                listWidget.addItem(item)
        listWidget.blockSignals(wasBlocked)
        self.updateInputs()

    def checkedSegmentIds(self):
        listWidget = self.ui.segmentsListWidget
        return [listWidget.item(i).data(qt.Qt.UserRole) for i in range(listWidget.count)
                if listWidget.item(i).checkState() == qt.Qt.Checked]

    def updateInputs(self, *unused):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        segmentIds = self.checkedSegmentIds()
        ready = volumeNode is not None and segmentationNode is not None and bool(segmentIds)
        text = "-"
        if ready:
            try:
                slices, count = self.logic.labelledSlices(volumeNode, segmentationNode, segmentIds,
                                                          self.ui.axisComboBox.currentText)
                text = f"{len(slices)} of {count}" + (f" ({', '.join(str(i) for i in slices[:12])}"
                                                      f"{', ...' if len(slices) > 12 else ''})" if slices else "")
                self.ui.firstSliceSpinBox.maximum = self.ui.lastSliceSpinBox.maximum = max(count - 1, 0)
                if not self.ui.lastSliceSpinBox.value:
                    self.ui.lastSliceSpinBox.value = count - 1
            except ValueError as error:
                text = str(error)
                ready = False
        self.ui.labelledSlicesLabel.text = text
        running = self.worker is not None
        self.ui.fineTuneButton.enabled = running and self.worker.kind == "train" or (ready and not running)
        self.ui.propagateButton.enabled = (volumeNode is not None and segmentationNode is not None
                                           and self.logic.currentAdapter is not None and not running)
        self.ui.evaluateButton.enabled = (segmentationNode is not None and volumeNode is not None
                                          and self.ui.referenceSegmentationSelector.currentNode() is not None)
        self.ui.currentAdapterLabel.text = self.logic.currentAdapter or "none: fine-tune or pick one in the library"

    def onWholeVolumeToggled(self, whole):
        self.ui.firstSliceSpinBox.enabled = not whole
        self.ui.lastSliceSpinBox.enabled = not whole

    # --- base model ---

    def updateModelInfo(self, *unused):
        modelId = self.ui.modelComboBox.currentText
        info = self.logic.modelInfo(modelId)
        self.ui.modelInfoLabel.text = info.get("status_text", "")
        self.ui.downloadModelButton.enabled = bool(info.get("downloadable")) and not info.get("available")

    def onDownloadModel(self):
        modelId = self.ui.modelComboBox.currentText
        info = self.logic.modelInfo(modelId)
        size = info.get("size_bytes")
        sizeText = f"{size / 1e6:.0f} MB" if size else "an unknown size"
        if not slicer.util.confirmOkCancelDisplay(f"Download the weights of {modelId} ({sizeText})?\n"
                                                  "They are kept in your user cache and checked against their checksum."):
            return
        with slicer.util.tryWithErrorDisplay(f"Downloading {modelId} failed.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.logic.downloadModel(modelId)
        self.updateModelInfo()

    # --- fine-tune / propagate ---

    def ensureDependencies(self):
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if "torch" in missing:
            if not self.logic.installTorch():
                return False
            missing = self.logic.missingDependencies()
        if missing and not slicer.util.confirmOkCancelDisplay(
                "SALT Segment needs these Python packages, which will now be installed with pip:\n\n  "
                + "\n  ".join(missing) + "\n\nSlicer's own numpy and SimpleITK are kept as they are."):
            return False
        if missing:
            self.logic.installDependencies(missing)
        return True

    def trainingOptions(self):
        return {
            "method": self.ui.methodComboBox.currentData,
            "rank": self.ui.rankComboBox.currentData,
            "model": self.ui.modelComboBox.currentText,
            "weights": self.ui.weightsPathLineEdit.currentPath or None,
            "axis": self.ui.axisComboBox.currentText,
            "steps": self.ui.stepsSpinBox.value or None,
            "device": self.ui.deviceComboBox.currentText.lower(),
        }

    def onFineTune(self):
        if self.worker is not None:
            self.worker.cancel()
            self.ui.statusLabel.text = "Cancelling: the worker stops at the end of the current step..."
            return
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.lossPlot.clear()
            self.worker = self.logic.startTraining(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                self.checkedSegmentIds(), self.trainingOptions(),
                onProgress=self.onWorkerProgress, onFinished=self.onTrainingFinished)
            self.ui.fineTuneButton.text = "Cancel"
        self.updateInputs()

    def onWorkerProgress(self, monitor, event):
        self.ui.progressBar.value = int(100 * monitor.fraction)
        self.ui.statusLabel.text = monitor.progress_text()
        if event.get("event") == "progress" and event.get("loss") is not None:
            self.lossPlot.update(monitor.losses)

    def onTrainingFinished(self, outcome):
        self.worker = None
        self.ui.fineTuneButton.text = "Fine-tune"
        self.ui.statusLabel.text = outcome.message
        if outcome.status == "error":
            slicer.util.errorDisplay("Fine-tuning failed: " + outcome.message)
        self.refreshAdapterTable()
        self.updateInputs()

    def onPropagate(self):
        with slicer.util.tryWithErrorDisplay("Could not start propagation.", waitCursor=True):
            if not self.ensureDependencies():
                return
            whole = self.ui.wholeVolumeCheckBox.checked
            options = {
                "mode": self.ui.propagationModeComboBox.currentText,
                "axis": self.ui.axisComboBox.currentText,
                "first": None if whole else self.ui.firstSliceSpinBox.value,
                "last": None if whole else self.ui.lastSliceSpinBox.value,
                "device": self.ui.deviceComboBox.currentText.lower(),
                "replace": self.ui.resultModeComboBox.currentIndex == 0,
            }
            self.worker = self.logic.startPropagation(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                self.checkedSegmentIds(), options,
                onProgress=self.onWorkerProgress, onFinished=self.onPropagationFinished)
        self.updateInputs()

    def onPropagationFinished(self, outcome):
        self.worker = None
        self.ui.statusLabel.text = outcome.message
        if outcome.status == "ok":
            with slicer.util.tryWithErrorDisplay("Could not import the propagated segmentation.", waitCursor=True):
                self.logic.applyPropagationResult(outcome)
                self.ui.statusLabel.text = "Propagation done: segments updated."
        elif outcome.status == "error":
            slicer.util.errorDisplay("Propagation failed: " + outcome.message)
        self.updateInputs()

    # --- adapter library ---

    def refreshAdapterTable(self):
        table = self.ui.adapterTableWidget
        entries = self.logic.listAdapters()
        table.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            values = [entry["name"], entry.get("base_model", ""), entry.get("method", ""),
                      ", ".join(entry.get("segment_names", [])), entry.get("created", "")]
            for column, value in enumerate(values):
                item = qt.QTableWidgetItem(str(value))
                item.setData(qt.Qt.UserRole, entry["path"])
                item.setToolTip(entry.get("details", entry["path"]))
                table.setItem(row, column, item)
        table.resizeColumnsToContents()

    def selectedLibraryAdapter(self):
        items = self.ui.adapterTableWidget.selectedItems()
        return items[0].data(qt.Qt.UserRole) if items else None

    def onUseAdapter(self):
        path = self.selectedLibraryAdapter()
        if path:
            self.logic.currentAdapter = path
        self.updateInputs()

    def onSaveAdapter(self):
        if not self.logic.currentAdapter:
            slicer.util.warningDisplay("There is no adapter yet: fine-tune first.")
            return
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), "Save adapter", "Name of the adapter:")
        if name:
            with slicer.util.tryWithErrorDisplay("Could not save the adapter.", waitCursor=True):
                self.logic.currentAdapter = self.logic.addToLibrary(self.logic.currentAdapter, name)
            self.refreshAdapterTable()
            self.updateInputs()

    def onImportAdapter(self):
        path = qt.QFileDialog.getOpenFileName(slicer.util.mainWindow(), "Import adapter", "",
                                              "SALTSegment adapter (*.safetensors)")
        if path:
            with slicer.util.tryWithErrorDisplay("Could not import the adapter.", waitCursor=True):
                self.logic.addToLibrary(path, os.path.splitext(os.path.basename(path))[0])
            self.refreshAdapterTable()

    def onDeleteAdapter(self):
        path = self.selectedLibraryAdapter()
        if path and slicer.util.confirmYesNoDisplay(f"Delete the adapter {os.path.basename(path)}?"):
            os.remove(path)
            if self.logic.currentAdapter == path:
                self.logic.currentAdapter = None
            self.refreshAdapterTable()
            self.updateInputs()

    # --- evaluate ---

    def onEvaluate(self):
        with slicer.util.tryWithErrorDisplay("Evaluation failed.", waitCursor=True):
            report = self.logic.evaluate(self.ui.inputVolumeSelector.currentNode(),
                                         self.ui.segmentationSelector.currentNode(), self.checkedSegmentIds(),
                                         self.ui.referenceSegmentationSelector.currentNode())
            self.ui.evaluationTextEdit.setPlainText(json.dumps(report, indent=2))


class LossPlot:
    """The live loss curve: a table node drawn by a chart in a plot widget inside the panel."""

    def __init__(self, frame):
        self.table = None
        self.frame = frame
        self.widget = None

    def _create(self):
        scene = slicer.mrmlScene
        self.table = scene.AddNewNodeByClass("vtkMRMLTableNode", "SALTSegment loss")
        series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", "training loss")
        series.SetAndObserveTableNodeID(self.table.GetID())
        series.SetXColumnName("step")
        series.SetYColumnName("loss")
        series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
        series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", "SALTSegment loss chart")
        chart.AddAndObservePlotSeriesNodeID(series.GetID())
        chart.SetXAxisTitle("step")
        chart.SetYAxisTitle("loss")
        chart.SetLegendVisibility(False)
        view = scene.AddNewNodeByClass("vtkMRMLPlotViewNode", "SALTSegment loss view")
        view.SetPlotChartNodeID(chart.GetID())
        if self.widget is not None:  # the scene was cleared: the old view node is gone
            self.widget.setParent(None)
        self.widget = slicer.qMRMLPlotWidget()
        self.widget.setMRMLScene(scene)
        self.widget.setMRMLPlotViewNode(view)
        self.frame.layout().addWidget(self.widget)

    def clear(self):
        self.update([])

    def update(self, losses):
        if self.table is None or slicer.mrmlScene.GetNodeByID(self.table.GetID()) is None:
            self._create()
        import numpy as np
        values = np.array(losses, dtype=float).reshape(-1, 2)
        slicer.util.updateTableFromArray(self.table, values, ["step", "loss"])


#
# Child process
#


class QProcessWorker:
    """Runs one CLI command in a QProcess and reports its protocol events; cancel() sends SIGTERM."""

    KILL_AFTER_MS = 60000

    def __init__(self, kind, command, environment, onProgress=None, onFinished=None):
        from SALTSegmentLib.worker_process import WorkerMonitor

        self.kind = kind
        self.monitor = WorkerMonitor()
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.outcome = None
        self.process = qt.QProcess()
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        processEnvironment = qt.QProcessEnvironment()
        for key, value in environment.items():
            processEnvironment.insert(key, value)
        self.process.setProcessEnvironment(processEnvironment)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.connect("finished(int,QProcess::ExitStatus)", self._finished)
        self.process.connect("errorOccurred(QProcess::ProcessError)", self._failedToStart)
        logging.info("SALTSegment worker: " + " ".join(command))
        self.process.start(command[0], command[1:])

    def _read(self):
        text = bytes(self.process.readAllStandardOutput().data()).decode("utf-8", errors="replace")
        for event in self.monitor.feed(text):
            if self.onProgress:
                self.onProgress(self.monitor, event)
        for line in self.monitor.log[-3:]:
            logging.debug("SALTSegment worker: " + line)

    def _finished(self, exitCode, exitStatus):
        self._read()
        crashed = exitStatus == qt.QProcess.CrashExit
        self._done(self.monitor.outcome(-15 if crashed and not exitCode else exitCode))

    def _failedToStart(self, error):
        if error == qt.QProcess.FailedToStart:
            from SALTSegmentLib.worker_process import WorkerOutcome

            self._done(WorkerOutcome("error", "The worker could not be started: " + self.process.errorString(), -1))

    def _done(self, outcome):
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self.onFinished:
            self.onFinished(outcome)

    def cancel(self):
        if self.process.state() != qt.QProcess.NotRunning:
            self.process.terminate()
            qt.QTimer.singleShot(self.KILL_AFTER_MS, self._killIfRunning)

    def _killIfRunning(self):
        if self.process.state() != qt.QProcess.NotRunning:
            self.process.kill()

    def wait(self, timeoutSeconds):
        """Process events until the worker ends (for the self-test and scripts)."""
        import time

        deadline = time.time() + timeoutSeconds
        while self.outcome is None and time.time() < deadline:
            slicer.app.processEvents()
            self.process.waitForFinished(100)
        if self.outcome is None:
            self.cancel()
            raise TimeoutError(f"The {self.kind} worker did not finish within {timeoutSeconds} s")
        return self.outcome


#
# Logic
#


class SALTSegmentLogic(ScriptedLoadableModuleLogic):
    """Moves data between MRML nodes and the engine's files, and starts the CLI worker."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.currentAdapter = None
        self.pendingResult = None
        self._modelInfo = None

    # --- folders and processes ---

    @staticmethod
    def userFolder():
        settingsDir = os.path.dirname(slicer.app.slicerUserSettingsFilePath) if slicer.app else ""
        return os.path.join(settingsDir or os.path.expanduser("~/.saltsegment"), "SALTSegment")

    def adapterFolder(self):
        folder = os.path.join(self.userFolder(), "adapters")
        os.makedirs(folder, exist_ok=True)
        return folder

    @staticmethod
    def newRunFolder(kind):
        return tempfile.mkdtemp(prefix=f"SALTSegment-{kind}-", dir=slicer.app.temporaryPath)

    @staticmethod
    def pythonExecutable():
        return shutil.which("PythonSlicer") or sys.executable

    def workerCommand(self, settings):
        from SALTSegmentLib.worker_process import worker_command, worker_environment

        return worker_command(settings, python=self.pythonExecutable()), worker_environment(MODULE_DIR)

    # --- dependencies ---

    @staticmethod
    def requirements():
        with open(os.path.join(MODULE_DIR, "Resources", "requirements.txt")) as handle:
            lines = [line.split("#")[0].strip() for line in handle]
        return [line for line in lines if line]

    def missingDependencies(self):
        hasTorch = importlib.util.find_spec("torch") and importlib.util.find_spec("torchvision")
        missing = [] if hasTorch else ["torch"]
        for requirement in self.requirements():
            name = requirement.split(";")[0].split("=")[0].split(">")[0].split("<")[0].strip()
            if importlib.util.find_spec(name.replace("-", "_").lower()) is None:
                missing.append(requirement)
        return missing

    @staticmethod
    def installTorch():
        """Install torch through the PyTorch extension (it asks the user and picks the CUDA build)."""
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("SALT Segment needs the PyTorch extension: install it from the Extension Manager "
                               "and restart Slicer.")
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None

    @staticmethod
    def installDependencies(requirements):
        """pip install with Slicer's numpy and SimpleITK pinned, so no requirement can replace them."""
        import importlib.metadata

        pins = []
        for package in SLICER_OWNED_PACKAGES:
            try:
                pins.append(f"{package}=={importlib.metadata.version(package)}")
            except importlib.metadata.PackageNotFoundError:
                pass
        constraints = os.path.join(tempfile.mkdtemp(prefix="SALTSegment-pip-"), "constraints.txt")
        with open(constraints, "w") as handle:
            handle.write("\n".join(pins) + "\n")
        slicer.util.pip_install(list(requirements) + ["-c", constraints])

    # --- base models ---

    def modelInfo(self, modelId):
        """What ``saltsegment models --json`` says about a model (cached; {} when the worker cannot run)."""
        if self._modelInfo is None:
            self._modelInfo = {}
            if importlib.util.find_spec("torch") is not None:
                try:
                    self._modelInfo = {entry.get("id"): entry for entry in self._runJson(self._modelsSettings())}
                except Exception as error:
                    logging.warning(f"SALTSegment: could not list models: {error}")
        info = dict(self._modelInfo.get(modelId, {}))
        if not info:
            info["status_text"] = "unknown until the dependencies are installed"
        elif "status_text" not in info:
            available = info.get("available") or info.get("cached")
            info["available"] = bool(available)
            info["status_text"] = "available locally" if available else (
                "download on request" if info.get("downloadable", True) else "needs a local file")
        return info

    @staticmethod
    def _modelsSettings(download=None):
        from SALTSegmentLib.worker_process import ModelsSettings

        return ModelsSettings(download=download)

    def downloadModel(self, modelId):
        command, environment = self.workerCommand(self._modelsSettings(download=modelId))
        completed = subprocess.run(command, env=environment, capture_output=True, text=True)
        if completed.returncode != 0:
            raise RuntimeError((completed.stderr or completed.stdout).strip().splitlines()[-1])
        self._modelInfo = None

    def _runJson(self, settings):
        command, environment = self.workerCommand(settings)
        completed = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
        if completed.returncode != 0:
            lines = (completed.stderr or completed.stdout).strip().splitlines()
            raise RuntimeError(lines[-1] if lines else f"exit code {completed.returncode}")
        return json.loads(completed.stdout)

    # --- inputs ---

    @staticmethod
    def labelledSlices(volumeNode, segmentationNode, segmentIds, axis):
        """Indices of the labelled slices along ``axis`` and the number of slices on that axis."""
        from SALTSegmentLib import slicer_bridge

        exported = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds)
        arrayAxis = slicer_bridge.slice_axis(axis, exported.ijk_to_ras)
        return slicer_bridge.labelled_slices(exported.array, arrayAxis), exported.array.shape[arrayAxis]

    # --- fine-tune ---

    def startTraining(self, volumeNode, segmentationNode, segmentIds, options, onProgress=None, onFinished=None):
        from SALTSegmentLib import slicer_bridge
        from SALTSegmentLib.worker_process import TrainSettings

        if volumeNode is None or segmentationNode is None or not segmentIds:
            raise ValueError("Select a volume, a segmentation and at least one segment")
        slicer_bridge.ensure_converter_rules()
        folder = self.newRunFolder("train")
        image = os.path.join(folder, "image.nrrd")
        labels = os.path.join(folder, "labels.seg.nrrd")
        slicer_bridge.export_volume_file(volumeNode, image)
        exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, segmentIds, labels)
        arrayAxis = slicer_bridge.slice_axis(options.get("axis", "axial"), exported.ijk_to_ras)
        if not slicer_bridge.labelled_slices(exported.array, arrayAxis):
            raise ValueError("The selected segments have no labelled voxels: label a few slices first")
        adapter = os.path.join(folder, "adapter.safetensors")
        settings = TrainSettings(image=image, labels=labels, out=adapter, method=options.get("method") or "salt",
                                 model=options.get("model"), weights=options.get("weights"),
                                 axis=ARRAY_AXIS_NAMES[arrayAxis], steps=options.get("steps"),
                                 device=options.get("device", "auto"), rank=options.get("rank"))
        command, environment = self.workerCommand(settings)

        def finished(outcome):
            if os.path.exists(outcome.outputs.get("adapter", adapter)):
                self.currentAdapter = outcome.outputs.get("adapter", adapter)
            if onFinished:
                onFinished(outcome)

        return QProcessWorker("train", command, environment, onProgress, finished)

    # --- propagate ---

    def startPropagation(self, volumeNode, segmentationNode, segmentIds, options, onProgress=None, onFinished=None):
        from SALTSegmentLib import slicer_bridge
        from SALTSegmentLib.worker_process import PropagateSettings

        if not self.currentAdapter:
            raise ValueError("No adapter: fine-tune first or pick one in the adapter library")
        folder = self.newRunFolder("propagate")
        image = os.path.join(folder, "image.nrrd")
        output = os.path.join(folder, "result.seg.nrrd")
        slicer_bridge.export_volume_file(volumeNode, image)
        labels, protected, arrayAxis = None, [], 0
        if segmentIds:
            labels = os.path.join(folder, "labels.seg.nrrd")
            exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, segmentIds, labels)
            arrayAxis = slicer_bridge.slice_axis(options.get("axis", "axial"), exported.ijk_to_ras)
            protected = slicer_bridge.labelled_slices(exported.array, arrayAxis)
        settings = PropagateSettings(image=image, adapter=self.currentAdapter, out=output, labels=labels,
                                     mode=options.get("mode", "auto"), first=options.get("first"),
                                     last=options.get("last"), device=options.get("device", "auto"))
        command, environment = self.workerCommand(settings)
        self.pendingResult = {"output": output, "volumeNode": volumeNode, "segmentationNode": segmentationNode,
                              "replace": options.get("replace", True), "protected": protected, "axis": arrayAxis}
        return QProcessWorker("propagate", command, environment, onProgress, onFinished)

    def applyPropagationResult(self, outcome):
        """Put the worker's label map into the segmentation in one step the Segment Editor can undo."""
        from SALTSegmentLib import slicer_bridge

        context = self.pendingResult
        if context is None:
            raise ValueError("No propagation was started")
        path = outcome.outputs.get("segmentation") or context["output"]
        segmentationNode = context["segmentationNode"]
        self._saveStateForUndo(segmentationNode)
        written = slicer_bridge.import_label_map_file(
            path, segmentationNode, context["volumeNode"], replace=context["replace"],
            protected_slices=context["protected"] if context["replace"] else (), axis=context["axis"])
        self.pendingResult = None
        return written

    @staticmethod
    def _saveStateForUndo(segmentationNode):
        try:
            editor = slicer.modules.segmenteditor.widgetRepresentation().self().editor
        except AttributeError:
            return
        if editor.segmentationNode() == segmentationNode:
            editor.saveStateForUndo()

    # --- adapter library ---

    def listAdapters(self):
        entries = []
        folder = self.adapterFolder()
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".safetensors"):
                continue
            path = os.path.join(folder, name)
            entry = {"name": name[: -len(".safetensors")], "path": path}
            try:
                from SALTSegmentLib.adapter_io import read_adapter_metadata

                metadata = read_adapter_metadata(path)
                entry.update({key: str(metadata.get(key, "")) for key in ("base_model", "method", "created")})
                entry["segment_names"] = [s.get("name", "") for s in metadata.get("segments", [])]
                entry["details"] = json.dumps(metadata.get("training", {}), indent=1)
            except Exception as error:  # an unreadable file stays listed, with the reason
                entry["details"] = f"metadata not readable: {error}"
            entries.append(entry)
        return entries

    def addToLibrary(self, path, name):
        safeName = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip()) or "adapter"
        target = os.path.join(self.adapterFolder(), safeName + ".safetensors")
        if os.path.exists(target) and os.path.abspath(target) != os.path.abspath(path):
            raise ValueError(f"An adapter called {safeName} is already in the library")
        if os.path.abspath(target) != os.path.abspath(path):
            shutil.copy2(path, target)
        return target

    # --- evaluate ---

    def evaluate(self, volumeNode, segmentationNode, segmentIds, referenceNode):
        """Metrics of the selected segments against the reference, on the volume's grid (matched by name)."""
        from SALTSegmentLib import slicer_bridge
        from SALTSegmentLib.worker_process import EvaluateSettings

        folder = self.newRunFolder("evaluate")
        prediction = os.path.join(folder, "prediction.seg.nrrd")
        reference = os.path.join(folder, "reference.seg.nrrd")
        exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, segmentIds or None, prediction)
        names = {segment.name for segment in exported.segments}
        referenceIds = [sid for sid in slicer_bridge.segment_ids(referenceNode)
                        if referenceNode.GetSegmentation().GetSegment(sid).GetName() in names]
        if not referenceIds:
            raise ValueError("No segment of the reference has the name of a selected segment")
        slicer_bridge.export_label_map_file(referenceNode, volumeNode, referenceIds, reference)
        return self._runJson(EvaluateSettings(pred=prediction, ref=reference))


#
# Test
#


class SALTSegmentTest(ScriptedLoadableModuleTest):
    """End to end: synthetic volume, three labelled slices, 2 training steps, propagation, result checks."""

    def setUp(self):
        slicer.mrmlScene.Clear(0)

    def runTest(self):
        self.setUp()
        self.test_FineTuneAndPropagate()

    def test_FineTuneAndPropagate(self):
        import numpy as np
        from SALTSegmentLib import slicer_bridge

        self.delayDisplay("Building a synthetic volume and three labelled slices")
        slicer_bridge.ensure_converter_rules()
        z, y, x = np.mgrid[0:16, 0:96, 0:96]
        blob = ((x - 48) / 22.0) ** 2 + ((y - 44) / 16.0) ** 2 + ((z - 8) / 7.0) ** 2 <= 1.0
        rng = np.random.default_rng(0)
        voxels = (200.0 * blob + rng.normal(0, 10, blob.shape)).astype(np.int16)
        ijkToRas = np.diag([-0.8, -0.8, 2.0, 1.0])
        volumeNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "SALTSegmentTestVolume")
        slicer_bridge.update_volume_from_array(volumeNode, voxels, ijkToRas)
        segmentationNode = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", "SALTSegmentTestLabels")
        segmentationNode.SetReferenceImageGeometryParameterFromVolumeNode(volumeNode)
        drawn = np.zeros(blob.shape, np.uint16)
        for k in (5, 8, 11):
            drawn[k] = blob[k]
        from SALTSegmentLib.volume_io import Segment

        segmentIds = slicer_bridge.import_label_map(segmentationNode, drawn, ijkToRas,
                                                    [Segment(1, "blob", (0.9, 0.4, 0.3))])
        before = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds).array

        logic = SALTSegmentLogic()
        missing = logic.missingDependencies()
        if missing:
            self.skipTest("Missing Python packages: " + ", ".join(missing))

        self.delayDisplay("Fine-tuning for 2 steps")
        worker = logic.startTraining(volumeNode, segmentationNode, segmentIds,
                                     {"method": "salt", "model": "lite_medsam", "steps": 2, "device": "cpu"})
        outcome = worker.wait(900)
        self.assertEqual(outcome.status, "ok", outcome.message)
        self.assertTrue(logic.currentAdapter and os.path.exists(logic.currentAdapter))
        self.assertGreaterEqual(len(worker.monitor.losses), 1)

        self.delayDisplay("Propagating")
        worker = logic.startPropagation(volumeNode, segmentationNode, segmentIds,
                                        {"mode": "box", "device": "cpu", "replace": True})
        outcome = worker.wait(900)
        self.assertEqual(outcome.status, "ok", outcome.message)
        written = logic.applyPropagationResult(outcome)
        self.assertEqual(written, segmentIds)

        after = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds).array
        for k in (5, 8, 11):
            self.assertTrue(np.array_equal(after[k], before[k]), f"drawn slice {k} was changed")
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        labelledElsewhere = [k for k in range(after.shape[0]) if k not in (5, 8, 11) and after[k].any()]
        self.assertTrue(labelledElsewhere, "propagation produced no voxels outside the drawn slices")
        self.delayDisplay("Test passed")
