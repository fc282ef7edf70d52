"""SALT Segment: few-shot fine-tuning of a Segment Anything model from a few labelled slices.

The widget moves values between the panel and the logic; the logic moves
data between MRML nodes and files and drives the ``saltsegment`` CLI in a
child process. Slicer's process imports only ``SALTSegmentLib.host`` (no
torch) and ``SALTSegmentLib.slicer_bridge``; all torch work, the model list,
downloads and evaluations run in the worker, so the GUI never waits on them.
"""

import contextlib
import logging
import os
import shutil
import sys

import ctk
import qt
import slicer
import vtk
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from SALTSegmentLib.host import choices, dependencies, run_folders
from SALTSegmentLib.host.adapter_metadata import AdapterFileError, load_adapter_metadata
from SALTSegmentLib.host.drawn_slices import describe_absent, describe_kept_empty
from SALTSegmentLib.host.panel_state import NODE_ROLES, PanelState
from SALTSegmentLib.host.propagation_findings import PropagationFindings
from SALTSegmentLib.host.process_tree import kill_tree, pid_alive
from SALTSegmentLib.host.worker_driver import (CancelPlan, EvaluateCommand, ModelsCommand, PropagateCommand,
                                                TrainCommand, WorkerMonitor, WorkerOutcome, last_line,
                                                worker_command, worker_environment)

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
UNDO_HELP = ("Undo propagation reverts the last Propagate in one step, whichever segmentation it wrote to: the "
             "segmentation comes back exactly as it was just before the import (edits made since are lost; "
             "you are asked first).")


class SALTSegment(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = "SALT Segment"
        self.parent.categories = ["Segmentation"]
        self.parent.dependencies = ["Segmentations"]
        self.parent.contributors = ["SALTSegment developers"]
        self.parent.helpText = f"""
Segment a whole volume from a few labelled slices. <b>SALT</b> (Singular value Adaptation with
Low-rank Transformation) fine-tunes a small adapter on a frozen Segment Anything model: the top
singular values of each weight get a trainable scale and shift, the rest of the spectrum a
low-rank update. Only a few MB are trained, so a few slices are enough.
<ol>
<li>Select the volume and a segmentation; label a few slices of each structure with the Segment Editor.</li>
<li>Check the segments to learn, choose the base model, method and device.</li>
<li><b>Fine-tune</b> (runs in the background; <b>Cancel</b> stops after the current step and keeps the adapter).</li>
<li><b>Propagate</b> along the adapter's slice axis to all slices or a range; every slice you drew is kept
as drawn. {UNDO_HELP}</li>
<li>Save the adapter in the library to reuse it on new volumes of the same kind.</li>
</ol>
Needs 3D Slicer {dependencies.MINIMUM_SLICER[0]}.{dependencies.MINIMUM_SLICER[1]} or later and the PyTorch extension.
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
        self.worker = None          # the job the user started (train, propagate, download, evaluate)
        self.modelList = None       # the background model list
        self.lossPlot = None
        self._segmentation = None   # the vtkSegmentation whose events are observed
        self._edits = 0             # how many edits it had (a cheap count of its modified events)
        self._editsAtImport = None
        self._updatingGUI = False
        self._countTimer = None
        self._idleText = {}

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/SALTSegment.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = SALTSegmentLogic()

        for value, text in choices.METHOD_LABELS:
            self.ui.methodComboBox.addItem(text, value)
        for value, text in choices.RANK_PRESET_LABELS:
            self.ui.rankComboBox.addItem(text, value)
        for modelId in choices.MODEL_IDS:
            self.ui.modelComboBox.addItem(modelId, modelId)
        for value, text in choices.DEVICE_LABELS:
            self.ui.deviceComboBox.addItem(text, value)
        for mode in sorted(choices.PROPAGATION_MODES, key=lambda m: m != "box"):
            self.ui.propagationModeComboBox.addItem(mode, mode)
        self.ui.resultModeComboBox.addItem("replace unlabelled slices of the segments", "replace")
        self.ui.resultModeComboBox.addItem("add as new segments", "add")
        self.ui.weightsPathLineEdit.filters = ctk.ctkPathLineEdit.Files | ctk.ctkPathLineEdit.Readable
        self.ui.weightsPathLineEdit.nameFilters = ["PyTorch checkpoint (*.pth *.pt)"]
        self.ui.adapterTableWidget.setHorizontalHeaderLabels(["Name", "Base model", "Method", "Segments", "Axis",
                                                              "Created"])
        self.ui.adapterFolderLabel.text = self.logic.adapterFolder()
        self.ui.undoInfoLabel.text = UNDO_HELP
        self.lossPlot = LossPlot(self.ui.lossPlotFrame)
        self._countTimer = qt.QTimer()
        self._countTimer.setSingleShot(True)
        self._countTimer.setInterval(300)  # painting fires many events: count the slices once it pauses
        self._countTimer.timeout.connect(self.updateLabelledSlices)

        for selector in (self.ui.inputVolumeSelector, self.ui.segmentationSelector,
                         self.ui.referenceSegmentationSelector):
            selector.currentNodeChanged.connect(self.onNodeSelected)
        for comboBox in (self.ui.methodComboBox, self.ui.rankComboBox, self.ui.deviceComboBox,
                         self.ui.propagationModeComboBox, self.ui.resultModeComboBox, self.ui.axisComboBox):
            comboBox.currentIndexChanged.connect(self.onPanelChanged)
        self.ui.modelComboBox.currentIndexChanged.connect(self.onModelChanged)
        self.ui.stepsSpinBox.valueChanged.connect(self.onPanelChanged)
        self.ui.firstSliceSpinBox.valueChanged.connect(self.onPanelChanged)
        self.ui.lastSliceSpinBox.valueChanged.connect(self.onPanelChanged)
        self.ui.weightsPathLineEdit.currentPathChanged.connect(self.onPanelChanged)
        self.ui.wholeVolumeCheckBox.toggled.connect(self.onPanelChanged)
        self.ui.segmentsListWidget.itemChanged.connect(self.onCheckedSegmentsChanged)
        self.ui.downloadModelButton.clicked.connect(self.onDownloadModel)
        self.ui.fineTuneButton.clicked.connect(self.onFineTune)
        self.ui.propagateButton.clicked.connect(self.onPropagate)
        self.ui.undoPropagationButton.clicked.connect(self.onUndoPropagation)
        self.ui.jumpToSliceButton.clicked.connect(self.onJumpToSuggestedSlice)
        self.ui.useAdapterButton.clicked.connect(self.onUseAdapter)
        self.ui.saveAdapterButton.clicked.connect(self.onSaveAdapter)
        self.ui.loadAdapterButton.clicked.connect(self.onImportAdapter)
        self.ui.deleteAdapterButton.clicked.connect(self.onDeleteAdapter)
        self.ui.continueAdapterButton.clicked.connect(self.onContinueTraining)
        self.ui.refreshAdaptersButton.clicked.connect(self.refreshAdapterTable)
        self.ui.evaluateButton.clicked.connect(self.onEvaluate)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)

        self.initializeParameterNode()
        self.refreshAdapterTable()

    def enter(self):
        self.initializeParameterNode()
        self.updateModelInfo()

    def cleanup(self):
        """The module is closing (application exit, reload): end every worker and its whole process tree."""
        self.removeObservers()
        if self._countTimer is not None:
            self._countTimer.stop()
        for worker in (self.worker, self.modelList):
            if worker is not None:
                worker.shutdown(5000)
        self.worker = self.modelList = None
        if self.logic is not None:
            self.logic.cleanup()

    # --- the parameter node: the panel's choices saved with the scene ---

    def initializeParameterNode(self):
        values, nodes = self.logic.readPanelState()
        state = PanelState.from_parameters(values)
        if nodes["InputVolume"] is None:
            nodes["InputVolume"] = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
        self._updatingGUI = True
        try:
            self.ui.inputVolumeSelector.setCurrentNode(nodes["InputVolume"])
            self.ui.segmentationSelector.setCurrentNode(nodes["Segmentation"])
            self.ui.referenceSegmentationSelector.setCurrentNode(nodes["ReferenceSegmentation"])
            for comboBox, value in ((self.ui.methodComboBox, state.method), (self.ui.rankComboBox, state.rank),
                                    (self.ui.modelComboBox, state.model), (self.ui.deviceComboBox, state.device),
                                    (self.ui.propagationModeComboBox, state.mode),
                                    (self.ui.resultModeComboBox, state.result)):
                comboBox.setCurrentIndex(max(comboBox.findData(value), 0))
            self.ui.axisComboBox.setCurrentIndex(max(self.ui.axisComboBox.findText(state.axis), 0))
            self.ui.weightsPathLineEdit.currentPath = state.weights
            self.ui.stepsSpinBox.value = state.steps
            self.ui.wholeVolumeCheckBox.checked = state.whole_volume
            self.ui.firstSliceSpinBox.value = state.first
            self.ui.lastSliceSpinBox.value = state.last
        finally:
            self._updatingGUI = False
        if state.adapter and os.path.isfile(state.adapter):
            self.logic.currentAdapter = state.adapter
        self.observeSegmentation(self.ui.segmentationSelector.currentNode())
        self.updateModelInfo()

    def panelState(self):
        return PanelState(
            method=self.ui.methodComboBox.currentData, rank=self.ui.rankComboBox.currentData,
            model=self.ui.modelComboBox.currentData, weights=self.ui.weightsPathLineEdit.currentPath,
            axis=self.ui.axisComboBox.currentText, steps=self.ui.stepsSpinBox.value,
            device=self.ui.deviceComboBox.currentData, mode=self.ui.propagationModeComboBox.currentData,
            whole_volume=self.ui.wholeVolumeCheckBox.checked, first=self.ui.firstSliceSpinBox.value,
            last=self.ui.lastSliceSpinBox.value, result=self.ui.resultModeComboBox.currentData,
            adapter=self.logic.currentAdapter or "")

    def onPanelChanged(self, *unused):
        if self._updatingGUI:
            return
        self.logic.writePanelState(self.panelState(), {
            "InputVolume": self.ui.inputVolumeSelector.currentNode(),
            "Segmentation": self.ui.segmentationSelector.currentNode(),
            "ReferenceSegmentation": self.ui.referenceSegmentationSelector.currentNode()})
        self.updateInputs()

    def onNodeSelected(self, *unused):
        self.observeSegmentation(self.ui.segmentationSelector.currentNode())
        self.onPanelChanged()

    # --- scene ---

    def onSceneStartClose(self, caller, event):
        # Results of a running propagation or evaluation would go to nodes that are about to disappear.
        if self.worker is not None and self.worker.kind in ("propagate", "evaluate"):
            self.worker.kill()
        self.observeSegmentation(None)
        self.logic.onSceneClose()
        self._editsAtImport = None

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()
        self.updateInputs()

    def onSceneEndImport(self, caller, event):
        self.initializeParameterNode()  # a loaded scene brings its saved choices

    # --- inputs ---

    def segmentationObservations(self):
        events = slicer.vtkSegmentation
        return [(events.SegmentAdded, self.onSegmentListEvent), (events.SegmentRemoved, self.onSegmentListEvent),
                (events.SegmentModified, self.onSegmentListEvent),  # renamed, recoloured
                (events.SegmentsOrderModified, self.onSegmentListEvent),
                (events.SourceRepresentationModified, self.onSegmentEdited)]  # painted, erased, imported

    def observeSegmentation(self, segmentationNode):
        segmentation = segmentationNode.GetSegmentation() if segmentationNode is not None else None
        if segmentation is not self._segmentation:
            for event, method in self.segmentationObservations():
                if self._segmentation is not None:
                    self.removeObserver(self._segmentation, event, method)
                if segmentation is not None:
                    self.addObserver(segmentation, event, method)
            self._segmentation = segmentation
            self._edits, self._editsAtImport = 0, None
        self.onSegmentsModified()

    def onSegmentListEvent(self, caller, event):
        self._edits += 1
        self.onSegmentsModified()

    def onSegmentEdited(self, caller, event):
        self._edits += 1
        self._countTimer.start()  # counted once the painting pauses

    def onSegmentsModified(self, *unused):
        """Rebuild the segment list (names may have changed), keeping what was checked."""
        listWidget = self.ui.segmentsListWidget
        checked = set(self.checkedSegmentIds())
        known = {listWidget.item(i).data(qt.Qt.UserRole) for i in range(listWidget.count)}
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
                isChecked = segmentId in checked or segmentId not in known  # new segments start checked
                item.setCheckState(qt.Qt.Checked if isChecked else qt.Qt.Unchecked)
                listWidget.addItem(item)
        listWidget.blockSignals(wasBlocked)
        self._countTimer.start()
        self.updateInputs()

    def onCheckedSegmentsChanged(self, *unused):
        self._countTimer.start()
        self.updateInputs()

    def checkedSegmentIds(self):
        listWidget = self.ui.segmentsListWidget
        return [listWidget.item(i).data(qt.Qt.UserRole) for i in range(listWidget.count)
                if listWidget.item(i).checkState() == qt.Qt.Checked]

    def updateLabelledSlices(self):
        """The drawn slices of the checked segments along the panel's plane (the count the panel shows)."""
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        text = "-"
        if (volumeNode is not None and volumeNode.GetImageData() is not None and segmentationNode is not None
                and self.checkedSegmentIds()):
            try:
                slices, count = self.logic.labelledSlices(volumeNode, segmentationNode, self.checkedSegmentIds(),
                                                          self.ui.axisComboBox.currentText)
                shown = ", ".join(str(i) for i in slices[:12]) + (", ..." if len(slices) > 12 else "")
                text = f"{len(slices)} of {count}" + (f" ({shown})" if slices else "")
            except ValueError as error:
                text = str(error)
        self.ui.labelledSlicesLabel.text = text

    def updateInputs(self, *unused):
        volumeNode = self.ui.inputVolumeSelector.currentNode()
        segmentationNode = self.ui.segmentationSelector.currentNode()
        kind = self.worker.kind if self.worker is not None else None
        haveInputs = volumeNode is not None and segmentationNode is not None
        self.ui.fineTuneButton.enabled = kind == "train" or (kind is None and haveInputs
                                                             and bool(self.checkedSegmentIds()))
        # The running training is cancelled with the fine-tune button, which shows Cancel meanwhile.
        self.ui.continueAdapterButton.enabled = kind is None and haveInputs and bool(self.checkedSegmentIds())
        adapter, problem = self.logic.adapterSummary(volumeNode)
        self.ui.currentAdapterLabel.text = adapter
        self.ui.adapterAxisLabel.text = problem or self.logic.propagationAxisText(
            volumeNode, self.ui.axisComboBox.currentText)
        self.ui.propagateButton.enabled = kind == "propagate" or (kind is None and haveInputs and not problem
                                                                  and self.logic.currentAdapter is not None)
        self.ui.undoPropagationButton.enabled = kind is None and self.logic.undoPoint is not None
        self.ui.jumpToSliceButton.enabled = self.ui.nextSliceComboBox.count > 0
        self.ui.evaluateButton.enabled = kind == "evaluate" or (
            kind is None and haveInputs and self.ui.referenceSegmentationSelector.currentNode() is not None)
        self.ui.downloadModelButton.enabled = kind == "download" or (
            kind is None and self.logic.modelStatus(self.ui.modelComboBox.currentData)["downloadable"])
        whole = self.ui.wholeVolumeCheckBox.checked
        self.ui.firstSliceSpinBox.enabled = self.ui.lastSliceSpinBox.enabled = not whole
        count = self.logic.propagationSliceCount(volumeNode)
        if count:
            self.ui.firstSliceSpinBox.maximum = self.ui.lastSliceSpinBox.maximum = count - 1
            if not self.ui.lastSliceSpinBox.value and not self._updatingGUI:
                self.ui.lastSliceSpinBox.value = count - 1

    # --- base model ---

    def onModelChanged(self, *unused):
        self.onPanelChanged()
        self.updateModelInfo()

    def updateModelInfo(self, *unused):
        status = self.logic.modelStatus(self.ui.modelComboBox.currentData)
        self.ui.modelInfoLabel.text = status["text"]
        if status["listable"] and self.modelList is None:
            self.modelList = self.logic.startModelList(onFinished=self.onModelListFinished)
            self.modelList.start()
        self.updateInputs()

    def onModelListFinished(self, outcome):
        self.modelList = None
        if outcome.status != "ok":
            logging.warning(f"SALTSegment: could not list the models: {outcome.message}")
        self.ui.modelInfoLabel.text = self.logic.modelStatus(self.ui.modelComboBox.currentData)["text"]
        self.updateInputs()

    def onDownloadModel(self):
        if self.cancelIfRunning("download"):
            return
        modelId = self.ui.modelComboBox.currentData
        size = self.logic.modelStatus(modelId).get("size_bytes")
        sizeText = f"about {size / 1e6:.0f} MB" if size else "its size is shown once the model list is read"
        if not slicer.util.confirmOkCancelDisplay(f"Download the weights of {modelId} ({sizeText})?\n"
                                                  "They are kept in your user cache and checked against their "
                                                  "checksum. You can cancel the download."):
            return
        with slicer.util.tryWithErrorDisplay(f"Could not start downloading {modelId}.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.startJob(self.logic.startDownload(modelId, onProgress=self.onWorkerProgress,
                                                   onFinished=self.onDownloadFinished))

    def onDownloadFinished(self, outcome):
        self.jobFinished(outcome, "Download")
        self.updateModelInfo()

    # --- jobs: one at a time, each with progress and Cancel ---

    def jobButton(self, kind):
        return {"train": self.ui.fineTuneButton, "propagate": self.ui.propagateButton,
                "download": self.ui.downloadModelButton, "evaluate": self.ui.evaluateButton}[kind]

    def startJob(self, worker):
        """Hold the worker first, then start it: a failed start reports through onFinished and frees the panel."""
        self.worker = worker
        self._idleText[worker.kind] = self.jobButton(worker.kind).text
        self.jobButton(worker.kind).text = "Cancel"
        self.progressWidgets(worker.kind)[0].value = 0
        self.updateInputs()
        worker.start()

    def cancelIfRunning(self, kind):
        """Cancel the running job of this kind (a second press stops it at once); True when one was running."""
        if self.worker is None or self.worker.kind != kind:
            return False
        label = self.progressWidgets(kind)[1]
        if self.worker.cancelRequested:
            self.worker.kill()
            label.text = "Stopping now..."
        else:
            self.worker.cancel()
            self.jobButton(kind).text = "Stop now"
            label.text = ("Cancelling: the worker stops after the current step and keeps the last adapter..."
                          if kind == "train" else "Cancelling...")
        return True

    def progressWidgets(self, kind):
        if kind == "propagate":
            return self.ui.propagateProgressBar, self.ui.propagateStatusLabel
        return self.ui.progressBar, self.ui.statusLabel

    def onWorkerProgress(self, worker, event):
        bar, label = self.progressWidgets(worker.kind)
        bar.value = int(100 * worker.monitor.fraction)
        if not worker.cancelRequested:
            label.text = worker.monitor.progress_text()
        if worker.kind == "train" and event.get("event") == "progress" and event.get("loss") is not None:
            self.lossPlot.update(worker.monitor.losses)

    def jobFinished(self, outcome, what):
        kind = self.worker.kind if self.worker is not None else None
        self.worker = None
        if kind is not None:
            button = self.jobButton(kind)
            button.text = self._idleText.get(kind, button.text)
            self.progressWidgets(kind)[0].value = 100 if outcome.status == "ok" else 0
            self.progressWidgets(kind)[1].text = outcome.message
        if outcome.status == "error":
            slicer.util.errorDisplay(f"{what} failed: {outcome.message}")
        self.updateInputs()

    # --- fine-tune / propagate ---

    def ensureDependencies(self):
        problem = self.logic.versionProblem()
        if problem:
            slicer.util.errorDisplay(problem)
            return False
        missing = self.logic.missingDependencies()
        if not missing:
            return True
        if "torch" in missing:
            if not self.logic.installTorch():
                return False
            missing = self.logic.missingDependencies()
        if missing and not slicer.util.confirmOkCancelDisplay(
                "SALT Segment needs these Python packages, which will now be installed with pip:\n\n  "
                + "\n  ".join(missing) + "\n\nSlicer's numpy and SimpleITK, and the installed torch and "
                "torchvision, are kept as they are."):
            return False
        if missing:
            self.logic.installDependencies(missing)
        self.updateModelInfo()
        return True

    def trainingOptions(self):
        state = self.panelState()
        return {"method": state.method, "rank": state.rank, "model": state.model, "weights": state.weights or None,
                "axis": state.axis, "steps": state.steps or None, "device": state.device}

    def onFineTune(self):
        if self.cancelIfRunning("train"):
            return
        with slicer.util.tryWithErrorDisplay("Could not start fine-tuning.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.lossPlot.clear()
            self.startJob(self.logic.startTraining(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                self.checkedSegmentIds(), self.trainingOptions(),
                onProgress=self.onWorkerProgress, onFinished=self.onTrainingFinished))

    def onContinueTraining(self):
        """Continue the selected library adapter on this volume's drawn slices (the site's next patient)."""
        path = self.selectedLibraryAdapter()
        if not path:
            slicer.util.warningDisplay("Select an adapter of the library to continue.")
            return
        with slicer.util.tryWithErrorDisplay("Could not start training.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.lossPlot.clear()
            self.startJob(self.logic.startTraining(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                self.checkedSegmentIds(), dict(self.trainingOptions(), init=path),
                onProgress=self.onWorkerProgress, onFinished=self.onTrainingFinished))

    def onTrainingFinished(self, outcome):
        self.jobFinished(outcome, "Fine-tuning")
        self.onPanelChanged()  # the new adapter is saved with the panel's choices
        self.refreshAdapterTable()

    def onPropagate(self):
        if self.cancelIfRunning("propagate"):
            return
        with slicer.util.tryWithErrorDisplay("Could not start propagation.", waitCursor=True):
            if not self.ensureDependencies():
                return
            state = self.panelState()
            options = {"mode": state.mode, "device": state.device, "replace": state.result == "replace",
                       "first": None if state.whole_volume else state.first,
                       "last": None if state.whole_volume else state.last}
            self.startJob(self.logic.startPropagation(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(), options,
                onProgress=self.onWorkerProgress, onFinished=self.onPropagationFinished))

    def onPropagationFinished(self, outcome):
        self.jobFinished(outcome, "Propagation")
        if outcome.status == "ok":
            with slicer.util.tryWithErrorDisplay("Could not import the propagated segmentation.", waitCursor=True):
                summary = self.logic.applyPropagationResult(outcome)
                self._editsAtImport = self._edits
                findings = self.logic.lastFindings
                self.ui.propagateStatusLabel.text = " ".join(filter(None, [summary, findings.status_line()]))
                self.showSuggestedSlices(findings)
        else:
            self.logic.discardPropagation()
            if outcome.status == "cancelled":
                self.ui.propagateStatusLabel.text = "Propagation cancelled: the segmentation was not changed."
        self.updateInputs()

    def showSuggestedSlices(self, findings):
        """Offer the propagation's suggested slices (one per segment) to jump to and draw."""
        self.ui.nextSliceComboBox.clear()
        for nextSlice in findings.next_slices:
            self.ui.nextSliceComboBox.addItem(nextSlice.describe(), nextSlice.slice)

    def onJumpToSuggestedSlice(self):
        index = self.ui.nextSliceComboBox.currentData
        if index is not None:
            self.logic.jumpToSlice(self.ui.inputVolumeSelector.currentNode(), int(index))

    def onUndoPropagation(self):
        if self._editsAtImport is not None and self._edits != self._editsAtImport and \
                not slicer.util.confirmOkCancelDisplay("The segmentation was edited after the propagation. "
                                                       "Undo brings it back to how it was before the propagation, "
                                                       "and those edits are lost."):
            return
        with slicer.util.tryWithErrorDisplay("Could not undo the propagation.", waitCursor=True):
            self.ui.propagateStatusLabel.text = self.logic.undoPropagation()
        self._editsAtImport = None
        self.updateInputs()

    # --- adapter library ---

    def refreshAdapterTable(self):
        table = self.ui.adapterTableWidget
        entries = self.logic.listAdapters()
        table.setRowCount(len(entries))
        for row, entry in enumerate(entries):
            values = [entry["name"], entry.get("base_model", ""), entry.get("method", ""),
                      ", ".join(entry.get("segment_names", [])), entry.get("axis", ""), entry.get("created", "")]
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
        self.onPanelChanged()

    def onSaveAdapter(self):
        if not self.logic.currentAdapter:
            slicer.util.warningDisplay("There is no adapter yet: fine-tune first.")
            return
        name = qt.QInputDialog.getText(slicer.util.mainWindow(), "Save adapter", "Name of the adapter:")
        if name:
            with slicer.util.tryWithErrorDisplay("Could not save the adapter.", waitCursor=True):
                self.logic.currentAdapter = self.logic.addToLibrary(self.logic.currentAdapter, name)
            self.refreshAdapterTable()
            self.onPanelChanged()

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
            self.onPanelChanged()

    # --- evaluate ---

    def onEvaluate(self):
        if self.cancelIfRunning("evaluate"):
            return
        with slicer.util.tryWithErrorDisplay("Could not start the evaluation.", waitCursor=True):
            if not self.ensureDependencies():
                return
            self.ui.evaluationTextEdit.setPlainText("Evaluating...")
            self.startJob(self.logic.startEvaluation(
                self.ui.inputVolumeSelector.currentNode(), self.ui.segmentationSelector.currentNode(),
                self.checkedSegmentIds(), self.ui.referenceSegmentationSelector.currentNode(),
                onProgress=self.onWorkerProgress, onFinished=self.onEvaluationFinished))

    def onEvaluationFinished(self, outcome):
        self.jobFinished(outcome, "Evaluation")
        self.ui.evaluationTextEdit.setPlainText(self.logic.evaluationText(outcome))


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
    """Runs one CLI command in a QProcess, reports its protocol events, and cancels it for real.

    Cancel follows :class:`~SALTSegmentLib.host.worker_driver.CancelPlan`:
    the stop file first (the worker saves and exits at its next step), then,
    after the grace period or on a second request, the whole process tree
    (PythonSlicer's launcher forwards no signal to the interpreter).
    """

    def __init__(self, kind, command, environment, stopFile=None, onProgress=None, onFinished=None):
        self.kind = kind
        self.command = command
        self.monitor = WorkerMonitor()
        self.onProgress = onProgress
        self.onFinished = onFinished
        self.outcome = None
        self.plan = CancelPlan(stopFile)
        self.killed = False
        self.process = qt.QProcess()
        self.process.setProcessChannelMode(qt.QProcess.MergedChannels)
        processEnvironment = qt.QProcessEnvironment()
        for key, value in environment.items():
            processEnvironment.insert(key, value)
        self.process.setProcessEnvironment(processEnvironment)
        self.process.readyReadStandardOutput.connect(self._read)
        self.process.connect("finished(int,QProcess::ExitStatus)", self._finished)
        self.process.connect("errorOccurred(QProcess::ProcessError)", self._error)
        self._killTimer = qt.QTimer()
        self._killTimer.setSingleShot(True)
        self._killTimer.timeout.connect(self.kill)

    @property
    def cancelRequested(self):
        return self.plan.requested

    def start(self):
        logging.info("SALTSegment worker: " + " ".join(self.command))
        self.process.start(self.command[0], self.command[1:])

    def _read(self):
        text = bytes(self.process.readAllStandardOutput().data()).decode("utf-8", errors="replace")
        for event in self.monitor.feed(text):
            if self.onProgress:
                self.onProgress(self, event)

    def _finished(self, exitCode, exitStatus):
        self._killTimer.stop()
        self._read()
        crashed = exitStatus == qt.QProcess.CrashExit
        if (crashed or self.killed) and self.monitor.pid and pid_alive(self.monitor.pid):
            kill_tree(None, [self.monitor.pid])  # the launcher died but its interpreter did not
        self._done(self.monitor.outcome(-9 if crashed and not exitCode else exitCode,
                                        cancelled=self.killed or (crashed and self.plan.requested)))

    def _error(self, error):
        if error == qt.QProcess.FailedToStart:
            self._done(WorkerOutcome("error", f"The worker could not be started ({self.command[0]}): "
                                     + last_line(self.process.errorString(), "unknown reason"), -1))

    def _done(self, outcome):
        if self.outcome is not None:
            return
        self.outcome = outcome
        if self.onFinished:
            self.onFinished(outcome)

    def running(self):
        return self.process.state() != qt.QProcess.NotRunning

    def cancel(self):
        """Ask the worker to stop; end the process tree if it has not stopped after the grace period."""
        if not self.running() or self.plan.requested:
            return
        grace = self.plan.request(self.monitor)
        if grace <= 0:
            self.kill()
        else:
            self._killTimer.start(int(grace * 1000))

    def kill(self):
        """End the launcher, the interpreter and anything they started, now."""
        if not self.running():
            return
        self.plan.requested = True
        self.killed = True
        kill_tree(int(self.process.processId()), [self.monitor.pid])

    def shutdown(self, timeoutMs):
        """For module clean-up: ask to stop, wait up to ``timeoutMs``, then end the tree."""
        if not self.running():
            return
        if self.plan.request(self.monitor) <= 0 or not self.process.waitForFinished(timeoutMs):
            self.kill()
            self.process.waitForFinished(5000)

    def wait(self, timeoutSeconds):
        """Process events until the worker ends (for the self-test and scripts)."""
        import time

        deadline = time.time() + timeoutSeconds
        while self.outcome is None and time.time() < deadline:
            slicer.app.processEvents()
            self.process.waitForFinished(100)
        if self.outcome is None:
            self.kill()
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
        self.undoPoint = None
        self.lastFindings = PropagationFindings()   # extents, estimate, suggested slices of the last import
        self.lastAxis = None                        # the array axis the last propagation ran along
        self._modelInfo = None
        self._torchInstalled = None
        self._metadata = {}
        self._runFolders = []
        run_folders.remove_stale_run_folders(self.temporaryFolder())

    # --- folders, processes, panel state ---

    @staticmethod
    def userFolder():
        settingsDir = os.path.dirname(slicer.app.slicerUserSettingsFilePath) if slicer.app else ""
        return os.path.join(settingsDir or os.path.expanduser("~/.saltsegment"), "SALTSegment")

    def adapterFolder(self):
        folder = os.path.join(self.userFolder(), "adapters")
        os.makedirs(folder, exist_ok=True)
        return folder

    @staticmethod
    def temporaryFolder():
        return slicer.app.temporaryPath

    def newRunFolder(self, kind):
        folder = run_folders.new_run_folder(self.temporaryFolder(), kind)
        self._runFolders.append(folder)
        return folder

    def cleanRunFolder(self, folder, keep=()):
        run_folders.clean_run_folder(folder, keep)
        if folder in self._runFolders and not os.path.isdir(folder):
            self._runFolders.remove(folder)

    @contextlib.contextmanager
    def removedOnError(self, folder):
        """Delete a run folder when preparing the run fails (a half-exported volume is of no use)."""
        try:
            yield
        except BaseException:
            self.cleanRunFolder(folder)
            raise

    def cleanup(self):
        """Delete this session's run folders, except the one holding the current adapter."""
        for folder in list(self._runFolders):
            self.cleanRunFolder(folder, keep=[self.currentAdapter] if self.currentAdapter else [])

    @staticmethod
    def pythonExecutable():
        return shutil.which("PythonSlicer") or sys.executable

    def worker(self, kind, cliCommand, onProgress=None, onFinished=None):
        command = worker_command(cliCommand, python=self.pythonExecutable())
        return QProcessWorker(kind, command, worker_environment(MODULE_DIR), cliCommand.stop_file,
                              onProgress, onFinished)

    def readPanelState(self):
        from SALTSegmentLib import slicer_bridge

        return slicer_bridge.read_parameters(self.getParameterNode(), NODE_ROLES)

    def writePanelState(self, state, nodes):
        from SALTSegmentLib import slicer_bridge

        slicer_bridge.write_parameters(self.getParameterNode(), state.to_parameters(), nodes)

    def onSceneClose(self):
        self.discardPropagation()
        self.undoPoint = None

    # --- dependencies ---

    @staticmethod
    def versionProblem():
        return dependencies.version_problem((slicer.app.majorVersion, slicer.app.minorVersion), sys.version_info)

    @staticmethod
    def requirements():
        return dependencies.read_requirements(os.path.join(MODULE_DIR, "Resources", "requirements.txt"))

    def missingDependencies(self):
        """What to install: "torch" (through the PyTorch extension) and the requirements pip must add."""
        self._torchInstalled = None
        missing = [] if self.torchInstalled() else ["torch"]
        return missing + dependencies.missing_requirements(self.requirements())

    def torchInstalled(self):
        """torch and torchvision are installed (read from their metadata once: torch is never imported here)."""
        if self._torchInstalled is None:
            self._torchInstalled = dependencies.torch_installed()
        return self._torchInstalled

    @staticmethod
    def installTorch():
        """Install torch through the PyTorch extension (it asks the user and picks the CUDA build)."""
        try:
            import PyTorchUtils
        except ImportError:
            raise RuntimeError("SALT Segment needs the PyTorch extension: install it from the Extensions Manager "
                               "and restart Slicer.")
        return PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=True) is not None

    def installDependencies(self, requirements):
        """pip install with Slicer's numpy and SimpleITK and the installed torch/torchvision pinned."""
        folder = self.newRunFolder("pip")
        constraints = os.path.join(folder, "constraints.txt")
        with open(constraints, "w", encoding="utf-8") as handle:
            handle.write("\n".join(dependencies.constraints()) + "\n")
        try:
            slicer.util.pip_install(list(requirements) + ["-c", constraints])
        finally:
            self.cleanRunFolder(folder)
            self._modelInfo = self._torchInstalled = None  # the model list can run now

    # --- base models ---

    def modelStatus(self, modelId):
        """What the panel says about a base model, from the last model list (or from what is known without one)."""
        info = dict((self._modelInfo or {}).get(modelId, {}))
        downloadable = modelId in choices.DOWNLOADABLE_MODELS
        status = {"downloadable": downloadable, "size_bytes": info.get("size_bytes"),
                  "listable": self._modelInfo is None and self.torchInstalled()}
        if modelId in choices.PACKAGED_MODELS:
            status["text"] = f"{modelId} ships with the package (offline)"
        elif info:
            available = bool(info.get("available"))
            status["downloadable"] = downloadable and not available
            status["text"] = ("available locally" if available else
                              "download on request" if downloadable else "needs a local weights file")
        else:
            status["text"] = ("download on request" if downloadable else "needs a local weights file") + (
                "" if self._modelInfo is not None else " (checking the cache...)" if status["listable"]
                else " (the status shows once the dependencies are installed)")
        return status

    def startModelList(self, onFinished=None):
        def finished(outcome):
            self._modelInfo = {}  # a failed list is not retried on every change of the combo box
            if outcome.status == "ok" and isinstance(outcome.document, list):
                self._modelInfo = {entry.get("id"): entry for entry in outcome.document if isinstance(entry, dict)}
            if onFinished:
                onFinished(outcome)

        return self.worker("models", ModelsCommand(), onFinished=finished)

    def startDownload(self, modelId, onProgress=None, onFinished=None):
        def finished(outcome):
            self._modelInfo = None
            if onFinished:
                onFinished(outcome)

        return self.worker("download", ModelsCommand(download=modelId), onProgress, finished)

    # --- inputs ---

    @staticmethod
    def labelledSlices(volumeNode, segmentationNode, segmentIds, plane):
        """The drawn slices along the anatomical ``plane`` (voxel axis chosen from the direction matrix), and their count."""
        from SALTSegmentLib import slicer_bridge

        arrayAxis = slicer_bridge.volume_array_axis(volumeNode, plane)
        slices = slicer_bridge.drawn_slice_indices(segmentationNode, volumeNode, segmentIds, arrayAxis)
        return slices, volumeNode.GetImageData().GetDimensions()[2 - arrayAxis]

    @staticmethod
    def absentSlices(volumeNode, segmentationNode, segmentIds, arrayAxis):
        """Segment name -> the slices the user emptied after a propagation, on the exported labels' grid (logged)."""
        from SALTSegmentLib import slicer_bridge

        absent = slicer_bridge.absent_slices_by_name(segmentationNode, volumeNode, segmentIds, arrayAxis)
        for name, slices in absent.items():
            logging.info(f"SALTSegment: {describe_absent(name, slices)}")
        return absent

    # --- fine-tune ---

    def startTraining(self, volumeNode, segmentationNode, segmentIds, options, onProgress=None, onFinished=None):
        from SALTSegmentLib import slicer_bridge

        if volumeNode is None or segmentationNode is None or not segmentIds:
            raise ValueError("Select a volume, a segmentation and at least one segment")
        slicer_bridge.ensure_converter_rules()
        parent = options.get("init")  # continue this adapter: its plane (and method, model, rank) are kept
        plane = options.get("axis", "axial")
        if parent:
            metadata = self.adapterMetadata(parent)
            arrayAxis = slicer_bridge.adapter_array_axis(volumeNode, metadata.axis, metadata.plane)
        else:
            arrayAxis = slicer_bridge.volume_array_axis(volumeNode, plane)  # the CLI resolves the plane the same way
        folder = self.newRunFolder("train")
        image, labels = os.path.join(folder, "image.nrrd"), os.path.join(folder, "labels.seg.nrrd")
        with self.removedOnError(folder):
            exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, segmentIds, labels,
                                                           drawn_only_axis=arrayAxis)
            if not exported.array.any():
                raise ValueError("The selected segments have no drawn voxels on this slice axis: "
                                 "label a few slices first")
            absent = self.absentSlices(volumeNode, segmentationNode, exported.segment_ids, arrayAxis)
            slicer_bridge.export_volume_file(volumeNode, image)
        adapter = os.path.join(folder, "adapter.safetensors")
        cliCommand = TrainCommand(image=image, labels=labels, out=adapter, method=options.get("method") or "salt",
                                  model=options.get("model"), weights=options.get("weights"),
                                  axis=plane, steps=options.get("steps"),
                                  device=options.get("device", "auto"), rank=options.get("rank"),
                                  stop_file=os.path.join(folder, "stop"), init=parent or None, absent=absent)

        def finished(outcome):
            path = outcome.outputs.get("adapter", adapter)
            if os.path.exists(path):
                self.currentAdapter = path
            self.cleanRunFolder(folder, keep=[path])
            if onFinished:
                onFinished(outcome)

        return self.worker("train", cliCommand, onProgress, finished)

    # --- propagate ---

    def adapterMetadata(self, path=None):
        """The checked metadata of an adapter file (read from its header; cached while the file is unchanged)."""
        path = path or self.currentAdapter
        if not path:
            return None
        key = (path, os.path.getmtime(path) if os.path.exists(path) else None)
        if key not in self._metadata:
            self._metadata[key] = load_adapter_metadata(path)
        return self._metadata[key]

    def adapterSummary(self, volumeNode):
        """(text for the panel, a problem that prevents propagation or None)."""
        if not self.currentAdapter:
            return "none: fine-tune or pick one in the library", None
        name = os.path.basename(self.currentAdapter)
        try:
            metadata = self.adapterMetadata()
        except AdapterFileError as error:
            return name, f"This adapter cannot be used: {error}"
        return (f"{name} ({metadata.base_model}, {metadata.method}; segments: "
                f"{', '.join(metadata.segment_names)})"), None

    def propagationAxisText(self, volumeNode, panelPlane):
        """Which slices Propagate runs along: the adapter's plane (old adapters: their voxel axis), in this volume."""
        metadata = self._metadataOrNone()
        if metadata is None:
            return "-"
        text = (f"the adapter's {metadata.plane} plane" if metadata.plane
                else f"the adapter's voxel axis {metadata.axis}")
        if volumeNode is None or volumeNode.GetImageData() is None:
            return text
        from SALTSegmentLib import slicer_bridge

        arrayAxis = slicer_bridge.adapter_array_axis(volumeNode, metadata.axis, metadata.plane)
        text += f": {slicer_bridge.describe_array_axis(volumeNode, arrayAxis)}"
        if slicer_bridge.volume_array_axis(volumeNode, panelPlane) != arrayAxis:
            text += f" (not the {panelPlane} plane chosen above, which applies to fine-tuning)"
        return text

    def _metadataOrNone(self):
        try:
            return self.adapterMetadata()
        except (AdapterFileError, OSError):
            return None

    def propagationSliceCount(self, volumeNode):
        metadata = self._metadataOrNone()
        if metadata is None or volumeNode is None or volumeNode.GetImageData() is None:
            return 0
        from SALTSegmentLib import slicer_bridge

        arrayAxis = slicer_bridge.adapter_array_axis(volumeNode, metadata.axis, metadata.plane)
        return volumeNode.GetImageData().GetDimensions()[2 - arrayAxis]

    def startPropagation(self, volumeNode, segmentationNode, options, onProgress=None, onFinished=None):
        """Propagate the adapter's segments along the adapter's axis; the user's drawn slices seed box mode."""
        from SALTSegmentLib import slicer_bridge

        if volumeNode is None or segmentationNode is None:
            raise ValueError("Select a volume and a segmentation")
        if not self.currentAdapter:
            raise ValueError("No adapter: fine-tune first or pick one in the adapter library")
        metadata = self.adapterMetadata()
        arrayAxis = slicer_bridge.adapter_array_axis(volumeNode, metadata.axis, metadata.plane)  # as the CLI does
        folder = self.newRunFolder("propagate")
        image, output = os.path.join(folder, "image.nrrd"), os.path.join(folder, "result.seg.nrrd")
        drawnIds = [i for i in (slicer_bridge.find_segment_id(segmentationNode, name)
                                for name in metadata.segment_names) if i is not None]
        labels, mode, absent = None, options.get("mode", "box"), {}
        with self.removedOnError(folder):
            if drawnIds:
                labels = os.path.join(folder, "labels.seg.nrrd")
                exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, drawnIds, labels,
                                                               drawn_only_axis=arrayAxis)
                if not exported.array.any():
                    labels = None
                else:  # named as in the exported labels, on their grid, along the adapter's plane
                    absent = self.absentSlices(volumeNode, segmentationNode, exported.segment_ids, arrayAxis)
            if mode != "auto" and labels is None:
                raise ValueError(f"'{mode}' propagation starts from your drawn slices, but none of the adapter's "
                                 f"segments ({', '.join(metadata.segment_names)}) is drawn in this segmentation: "
                                 "draw a few slices, or choose 'auto' prompting")
            slicer_bridge.export_volume_file(volumeNode, image)
        first, last = options.get("first"), options.get("last")
        cliCommand = PropagateCommand(image=image, adapter=self.currentAdapter, out=output, labels=labels, mode=mode,
                                      first=first, last=last, device=options.get("device", "auto"),
                                      stop_file=os.path.join(folder, "stop"), absent=absent)
        self.pendingResult = {"output": output, "folder": folder, "volumeNode": volumeNode,
                              "segmentationNode": segmentationNode, "replace": options.get("replace", True),
                              "axis": arrayAxis, "range": None if first is None else (first, last),
                              "absent": absent}
        return self.worker("propagate", cliCommand, onProgress, onFinished)

    def applyPropagationResult(self, outcome):
        """Write the worker's label map into the segmentation, undoable in one step; return a summary."""
        from SALTSegmentLib import slicer_bridge

        context = self.pendingResult
        if context is None:
            raise ValueError("No propagation was started")
        segmentationNode = context["segmentationNode"]
        try:
            self.undoPoint = slicer_bridge.UndoPoint(segmentationNode)
            self._saveStateInSegmentEditor(segmentationNode)
            written = slicer_bridge.import_label_map_file(
                outcome.outputs.get("segmentation") or context["output"], segmentationNode, context["volumeNode"],
                replace=context["replace"], axis=context["axis"], slice_range=context["range"])
        finally:
            self.discardPropagation()
        names = [segmentationNode.GetSegmentation().GetSegment(i).GetName() for i in written]
        self.lastFindings = PropagationFindings.from_summary(outcome.summary)
        for line in self.lastFindings.extents + [self.lastFindings.estimate or ""]:
            if line:
                logging.info(f"SALTSegment: {line}")
        self.lastAxis = context["axis"]
        keptEmpty = describe_kept_empty(context.get("absent") or {})
        return " ".join(filter(None, [f"Propagation done: {', '.join(names)} updated; every slice you drew was kept "
                                      "as drawn.", keptEmpty, "Undo propagation reverts it."]))

    def jumpToSlice(self, volumeNode, index, arrayAxis=None):
        """Centre every slice view on slice ``index`` (along the last propagation's axis) of the volume.

        Returns the RAS point jumped to. The point is the slice's centre in the
        volume's own grid (a parent transform of the volume is not applied).
        """
        arrayAxis = self.lastAxis if arrayAxis is None else arrayAxis
        if volumeNode is None or arrayAxis is None:
            raise ValueError("Propagate first: the suggested slices come from the last propagation")
        ijk = [(size - 1) / 2.0 for size in volumeNode.GetImageData().GetDimensions()]
        ijk[2 - arrayAxis] = float(index)            # array axis 0 is k, the last IJK index
        matrix = vtk.vtkMatrix4x4()
        volumeNode.GetIJKToRASMatrix(matrix)
        ras = matrix.MultiplyPoint(ijk + [1.0])[:3]
        slicer.vtkMRMLSliceNode.JumpAllSlices(slicer.mrmlScene, *ras, slicer.vtkMRMLSliceNode.CenteredJumpSlice)
        return tuple(ras)

    def discardPropagation(self):
        if self.pendingResult is not None:
            self.cleanRunFolder(self.pendingResult["folder"])
        self.pendingResult = None

    def undoPropagation(self):
        if self.undoPoint is None or not self.undoPoint.restore():
            self.undoPoint = None
            raise ValueError("There is no propagation to undo")
        self.undoPoint = None
        return "The last propagation was undone."

    @staticmethod
    def _saveStateInSegmentEditor(segmentationNode):
        """Let the Segment Editor's Undo revert the import too, when it shows this segmentation."""
        try:
            editor = slicer.util.getModuleWidget("SegmentEditor").editor
        except (RuntimeError, AttributeError):
            return
        if editor is not None and editor.segmentationNode() == segmentationNode:
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
                metadata = self.adapterMetadata(path)
                entry.update(base_model=metadata.base_model, method=metadata.method, created=metadata.created,
                             axis=metadata.plane or metadata.axis, segment_names=metadata.segment_names,
                             details="\n".join([metadata.history()]
                                                + [f"{k}: {v}" for k, v in metadata.training.items()]))
            except (AdapterFileError, OSError) as error:  # an unreadable file stays listed, with the reason
                entry["details"] = f"not usable: {error}"
            entries.append(entry)
        return entries

    def addToLibrary(self, path, name):
        load_adapter_metadata(path)  # refuse a damaged or edited file now, not at the next Propagate
        safeName = "".join(c if c.isalnum() or c in "-_." else "_" for c in name.strip()) or "adapter"
        target = os.path.join(self.adapterFolder(), safeName + ".safetensors")
        if os.path.exists(target) and os.path.abspath(target) != os.path.abspath(path):
            raise ValueError(f"An adapter called {safeName} is already in the library")
        if os.path.abspath(target) != os.path.abspath(path):
            shutil.copy2(path, target)
        return target

    # --- evaluate ---

    def startEvaluation(self, volumeNode, segmentationNode, segmentIds, referenceNode, onProgress=None,
                        onFinished=None):
        """Metrics of the selected segments against the reference, on the volume's grid (matched by name)."""
        from SALTSegmentLib import slicer_bridge

        folder = self.newRunFolder("evaluate")
        prediction = os.path.join(folder, "prediction.seg.nrrd")
        reference = os.path.join(folder, "reference.seg.nrrd")
        with self.removedOnError(folder):
            exported = slicer_bridge.export_label_map_file(segmentationNode, volumeNode, segmentIds or None,
                                                           prediction)
            names = {segment.name for segment in exported.segments}
            referenceIds = [sid for sid in slicer_bridge.segment_ids(referenceNode)
                            if referenceNode.GetSegmentation().GetSegment(sid).GetName() in names]
            if not referenceIds:
                raise ValueError("No segment of the reference has the name of a selected segment")
            slicer_bridge.export_label_map_file(referenceNode, volumeNode, referenceIds, reference)

        def finished(outcome):
            self.cleanRunFolder(folder)
            if onFinished:
                onFinished(outcome)

        return self.worker("evaluate", EvaluateCommand(pred=prediction, ref=reference), onProgress, finished)

    @staticmethod
    def evaluationText(outcome):
        import json

        if outcome.status == "ok" and outcome.document is not None:
            return json.dumps(outcome.document, indent=2)
        return outcome.message


#
# Test
#


class SALTSegmentTest(ScriptedLoadableModuleTest):
    """End to end: synthetic volume, three labelled slices, 2 training steps, propagation, result checks, undo."""

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
        segmentIds = slicer_bridge.import_label_map(segmentationNode, drawn, ijkToRas,
                                                    [slicer_bridge.Segment(1, "blob", (0.9, 0.4, 0.3))])
        before = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds).array

        logic = SALTSegmentLogic()
        if logic.versionProblem():
            self.skipTest(logic.versionProblem())
        missing = logic.missingDependencies()
        if missing:
            self.skipTest("Missing Python packages: " + ", ".join(missing))

        self.delayDisplay("Fine-tuning for 2 steps")
        worker = logic.startTraining(volumeNode, segmentationNode, segmentIds,
                                     {"method": "salt", "model": "lite_medsam", "steps": 2, "device": "cpu"})
        worker.start()
        outcome = worker.wait(900)
        self.assertEqual(outcome.status, "ok", outcome.message)
        self.assertTrue(logic.currentAdapter and os.path.exists(logic.currentAdapter))
        self.assertGreaterEqual(len(worker.monitor.losses), 1)

        self.delayDisplay("Propagating")
        worker = logic.startPropagation(volumeNode, segmentationNode, {"mode": "box", "device": "cpu",
                                                                       "replace": True})
        worker.start()
        outcome = worker.wait(900)
        self.assertEqual(outcome.status, "ok", outcome.message)
        logic.applyPropagationResult(outcome)

        after = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds).array
        for k in (5, 8, 11):
            self.assertTrue(np.array_equal(after[k], before[k]), f"drawn slice {k} was changed")
        self.assertEqual(segmentationNode.GetSegmentation().GetNumberOfSegments(), 1)
        labelledElsewhere = [k for k in range(after.shape[0]) if k not in (5, 8, 11) and after[k].any()]
        self.assertTrue(labelledElsewhere, "propagation produced no voxels outside the drawn slices")

        self.delayDisplay("Undoing the propagation")
        logic.undoPropagation()
        undone = slicer_bridge.segmentation_to_label_map(segmentationNode, volumeNode, segmentIds).array
        self.assertTrue(np.array_equal(undone, before), "undo did not restore the segmentation")
        logic.cleanup()
        self.delayDisplay("Test passed")
