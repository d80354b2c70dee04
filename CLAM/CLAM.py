"""CLAM: cluster activation maps of a chest CT fused over the CT in 3D Slicer (panel, console, self-test)."""

from __future__ import annotations

import importlib.util
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from typing import Annotated, Any, Callable

import qt
import slicer
import vtk
from slicer import vtkMRMLScalarVolumeNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if MODULE_DIR not in sys.path:  # CLAMLib, CLAMMRML and CLAMDependencies live beside this file
    sys.path.append(MODULE_DIR)

import CLAMCohort
import CLAMCohortPanel
import CLAMDependencies
import CLAMMRML
from CLAMMRML import CLAMResult

logger = logging.getLogger(__name__)

TORCH_REQUIREMENT = CLAMDependencies.TORCH_REQUIREMENT
METHODS = {"default": "default", "faithful CLAM": "clam"}  # panel label -> engine method
DEVICES = {"auto": "auto", "CPU": "cpu", "GPU": "cuda"}  # panel label -> engine and `clam train --device`
DOCUMENTATION_URL = "https://github.com/clam-team/SlicerCLAM#readme"
CONSOLE_EXAMPLE = """import CLAM
ct = slicer.util.getNode("chest CT")
result = CLAM.CLAMLogic().process(ct, CLAM.demoBundlePath(), clusters="all", device="auto")
print(result.assignment, result.probabilities)
result.mapNodes[result.assignment]  # overlay volume of the assigned cluster"""


def demoBundlePath() -> pathlib.Path:
    """The demo model shipped with the extension (installed copy first, then the source tree's models/)."""
    candidates = [pathlib.Path(MODULE_DIR, "Resources", "Models", "clam-demo"),
                  pathlib.Path(MODULE_DIR).parent / "models" / "clam-demo"]
    return next((c for c in candidates if (c / "model.json").is_file()), candidates[0])


class CLAMCancelled(Exception):
    """Raised inside a run when the user pressed Cancel."""


class CLAMDependencyError(RuntimeError):
    """A package CLAM needs is missing and was not installed."""


#
# Module
#


class CLAM(ScriptedLoadableModule):
    """Module description shown in Slicer."""

    def __init__(self, parent: Any) -> None:
        """Set the module's title, category, contributors, help and acknowledgement."""
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("CLAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["CLAM team"]
        self.parent.helpText = _("""
<p>Cluster activation mapping (CLAM) explains a deep clustering model of chest CT: a model trained without
labels groups scans into <i>k</i> clusters, and the map of a cluster shows which parts of this scan drive
its membership in that cluster.</p>
<p><b>Use:</b> pick the input CT and a model bundle (the demo model by default), press Apply.
The table gives the soft assignment <i>q</i> of the scan to every cluster (they sum to 1; the largest is the
assigned cluster). Each mapped cluster gets an overlay volume with the CT's exact geometry.</p>
<p><b>Reading the map:</b> values run from 0 to 1 within each map; bright regions are where the scan's
appearance most supports the cluster, dark or transparent regions matter little. Values below the threshold
are hidden. A map shows what the model used, not a diagnosis, and only within what the model was trained on:
read the model card. A low, flat <i>q</i> (close to 1/k everywhere) means the scan fits no cluster well.</p>
<p><b>Methods:</b> <i>default</i> is the engine's map, checked to localise simulated abnormalities;
<i>faithful CLAM</i> is the paper's channel-weighted map, kept for comparison.</p>
<p>See the <a href="{documentation}">documentation</a>.</p>
<p><b>Python console:</b></p><pre>{example}</pre>
""").format(documentation=DOCUMENTATION_URL, example=CONSOLE_EXAMPLE)
        self.parent.acknowledgementText = _("""
Method: Sarah Ryan, Nichole Carlson, Harris Butler, Tasha Fingerlin, Lisa Maier, Fuyong Xing, "Cluster activation
mapping with application to computed tomography scans of the lung", J. Med. Imaging 9(2):026001, 2022,
doi:10.1117/1.JMI.9.2.026001. Extension by the CLAM team.
""")


#
# Parameter node
#


@parameterNodeWrapper
class CLAMParameterNode:
    """Panel settings, saved with the scene; names match the .ui's SlicerParameterName properties."""

    inputVolume: vtkMRMLScalarVolumeNode
    modelPath: pathlib.Path = demoBundlePath()
    device: Annotated[str, Choice(["auto", "CPU", "GPU"])] = "auto"
    clusters: Annotated[str, Choice(["all", "assigned"])] = "all"
    method: Annotated[str, Choice(["default", "faithful CLAM"])] = "default"
    opacity: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.2
    colormap: Annotated[str, Choice(["inferno", "viridis", "magma", "plasma"])] = "inferno"
    shownCluster: int = -1
    trainUseFolder: bool = False
    trainFolder: pathlib.Path = pathlib.Path()  # none until chosen: training refuses it
    trainK: Annotated[int, WithinRange(2, 12)] = 3
    trainOutput: pathlib.Path = pathlib.Path.home() / "CLAM-models" / "my-model"


#
# Widget
#


class CLAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """The panel: loads CLAM.ui, binds it to the parameter node, forwards actions to CLAMLogic."""

    def __init__(self, parent: Any = None) -> None:
        """Initialise state; the GUI is built in setup()."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic: CLAMLogic | None = None
        self._parameterNode: CLAMParameterNode | None = None
        self._parameterNodeGuiTag = None
        self._shown: tuple[str | None, str | None] = (None, None)  # (input node ID, model path) on screen
        self._training: CLAMMRML.BackgroundProcess | None = None
        self._trainOutput: pathlib.Path | None = None
        self._trainTemp: str | None = None
        self._trainTimer = qt.QTimer()
        self._trainTimer.setInterval(500)

    def setup(self) -> None:
        """Build the panel from the .ui file and connect it."""
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/CLAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        for mrmlWidget in (self.ui.inputVolumeSelector, self.ui.trainVolumesSelector, self.ui.resultsTableView):
            mrmlWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = CLAMLogic()
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndImportEvent, self.onSceneEndImport)
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.cancelButton.connect("clicked(bool)", self.onCancel)
        self.ui.useDemoModelButton.connect("clicked(bool)", self.onUseDemo)
        self.ui.shownClusterComboBox.connect("activated(int)", self.onShownCluster)
        self.ui.trainButton.connect("clicked(bool)", self.onTrain)
        self.ui.trainCancelButton.connect("clicked(bool)", self.onTrainCancel)
        self._trainTimer.connect("timeout()", self.pollTraining)
        self.ui.deviceFoundLabel.text = CLAMLogic.describeDevices(importTorch=False)
        self.cohortPanel = CLAMCohortPanel.CohortPanel(self.resourcePath("UI/CLAMCohort.ui"), self.logic,
                                                       self.logic.getParameterNode)
        self.layout.addWidget(self.cohortPanel.widget)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self.onTrainCancel()
        self.cohortPanel.cleanup()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.cohortPanel.enter()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self.setParameterNode(None)
        self.cohortPanel.exit()

    def onSceneStartClose(self, caller: Any, event: Any) -> None:
        """Drop the parameter node before the scene closes."""
        self.setParameterNode(None)

    def onSceneEndClose(self, caller: Any, event: Any) -> None:
        """Make a new parameter node once the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def onSceneEndImport(self, caller: Any, event: Any) -> None:
        """A loaded scene may hold CLAM outputs and a parameter node saved elsewhere."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Get the parameter node; pick a CT if none is chosen; find the demo model again after an update."""
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:
            p.inputVolume = next(iter(CLAMMRML.input_volumes(slicer.mrmlScene)), None)
        if CLAMMRML.is_stale_demo_path(p.modelPath, demoBundlePath()):
            p.modelPath = demoBundlePath()

    def setParameterNode(self, inputParameterNode: CLAMParameterNode | None) -> None:
        """Bind the GUI to a parameter node (connectGui) and observe it for live display updates."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
        self._parameterNode = inputParameterNode
        self._shown = (None, None)
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.onParameterChanged)
            self.onParameterChanged()

    def onParameterChanged(self, caller: Any = None, event: Any = None) -> None:
        """Any change of the settings: Apply's state, the model card and results of the chosen input, display."""
        p = self._parameterNode
        ready = bool(p and p.inputVolume and (pathlib.Path(p.modelPath) / "model.json").is_file())
        self.ui.applyButton.enabled = ready and not self.ui.cancelButton.enabled
        self.ui.applyButton.toolTip = (_("Compute the CLAM maps.") if ready
                                       else _("Select an input CT and a model bundle."))
        self.ui.trainFolderPathLineEdit.enabled = bool(p and p.trainUseFolder)
        self.ui.trainVolumesSelector.enabled = not (p and p.trainUseFolder)
        if not p:
            return
        shown = (p.inputVolume.GetID() if p.inputVolume else None, str(p.modelPath))
        if shown[1] != self._shown[1]:
            self.ui.modelCardLabel.text = CLAMLogic.modelCardSummary(p.modelPath)
        if shown[0] != self._shown[0]:
            self.refreshResults()
        self._shown = shown
        if p.inputVolume:
            maps = CLAMMRML.find_outputs(p.inputVolume, CLAMMRML.ROLE_MAP)
            CLAMMRML.set_display(maps, p.opacity, p.threshold, p.colormap)

    def onUseDemo(self) -> None:
        """Select the demo bundle."""
        self._parameterNode.modelPath = demoBundlePath()

    def refreshResults(self) -> None:
        """Show the assignment, table and shown-cluster choice of the current input's existing outputs."""
        p = self._parameterNode
        volume = p.inputVolume if p else None
        tables = CLAMMRML.find_outputs(volume, CLAMMRML.ROLE_TABLE) if volume else []
        maps = CLAMMRML.find_outputs(volume, CLAMMRML.ROLE_MAP) if volume else []
        table = tables[0] if tables else None
        self.ui.resultsTableView.setMRMLTableNode(table)
        self.ui.assignedClusterLabel.text = table.GetAttribute("CLAM.Assignment") if table else "-"
        self.ui.shownClusterComboBox.clear()
        clusters = sorted((int(n.GetAttribute(CLAMMRML.CLUSTER_ATTRIBUTE)), n.GetID()) for n in maps)
        for cluster, nodeID in clusters:
            self.ui.shownClusterComboBox.addItem(_("Cluster {cluster}").format(cluster=cluster), nodeID)
        shown = [cluster for cluster, _nodeID in clusters]
        self.ui.shownClusterComboBox.setCurrentIndex(shown.index(p.shownCluster) if p and p.shownCluster in shown
                                                     else 0)
        hidden = CLAMMRML.output_node_ids(slicer.mrmlScene)
        for selector in (self.ui.inputVolumeSelector, self.ui.trainVolumesSelector):
            selector.sortFilterProxyModel().setHiddenNodeIDs(hidden)

    def onShownCluster(self, index: int) -> None:
        """Show the chosen cluster's map over the CT."""
        p = self._parameterNode
        node = slicer.mrmlScene.GetNodeByID(self.ui.shownClusterComboBox.itemData(index) or "")
        if p and node:
            p.shownCluster = int(node.GetAttribute(CLAMMRML.CLUSTER_ATTRIBUTE))
            CLAMMRML.show_overlay(node, p.inputVolume, p.opacity, p.threshold, p.colormap)

    def _setBusy(self, busy: bool) -> None:
        """Swap Apply and Cancel while a run is going on."""
        self.ui.cancelButton.enabled = busy
        self.ui.applyButton.enabled = not busy
        self.onParameterChanged()

    def _progress(self, fraction: float, message: str) -> None:
        """Engine progress: update the bar, keep the GUI responsive."""
        self.ui.progressBar.value = round(100 * fraction)
        self.ui.statusLabel.text = message
        slicer.app.processEvents()

    def _ensureDependencies(self) -> bool:
        """Install what is missing after asking, before any busy state or wait cursor; False if not done."""
        try:
            with slicer.util.tryWithErrorDisplay(_("CLAM cannot run yet.")):
                self.logic.ensureDependencies(askConfirmation=True)
        except CLAMDependencyError:
            return False
        return True

    def onApply(self) -> None:
        """Run CLAM on the input (installing dependencies after asking, on the first run)."""
        p = self._parameterNode
        if not self._ensureDependencies():
            return
        self._setBusy(True)
        self.ui.progressBar.value = 0
        try:
            with slicer.util.tryWithErrorDisplay(_("CLAM failed."), waitCursor=True):
                try:
                    result = self.logic.process(p.inputVolume, p.modelPath, clusters=p.clusters, device=p.device,
                                                method=METHODS[p.method], opacity=p.opacity,
                                                threshold=p.threshold, colormap=p.colormap,
                                                shownCluster=p.shownCluster, progress=self._progress)
                except CLAMCancelled:
                    self.ui.statusLabel.text = _("Cancelled.")
                    return
                p.shownCluster = result.assignment
                q = ", ".join(f"{v:.2f}" for v in result.probabilities)
                self.ui.statusLabel.text = _("Assigned cluster {cluster}; q = [{q}].").format(
                    cluster=result.assignment, q=q)
                self.ui.deviceFoundLabel.text = CLAMLogic.describeDevices(importTorch=True)
        finally:
            self._setBusy(False)
            self.refreshResults()

    def onCancel(self) -> None:
        """Ask the running computation to stop."""
        self.logic.cancel()

    def onTrain(self) -> None:
        """Start `clam train` in a background process on the chosen volumes or folder."""
        p = self._parameterNode
        if not self._ensureDependencies():
            return
        with slicer.util.tryWithErrorDisplay(_("Could not start training."), waitCursor=True):
            if p.trainUseFolder:
                folder = pathlib.Path(p.trainFolder)
                if not folder.is_absolute() or not folder.is_dir():
                    raise ValueError(_("Choose the folder of scans to train on first."))
                inputs = [str(folder)]
            else:
                nodes = list(self.ui.trainVolumesSelector.checkedNodes())
                if len(nodes) < p.trainK:
                    raise ValueError(_("Check at least {k} volumes (k = {k}), or use a folder.").format(k=p.trainK))
                self._trainTemp = tempfile.mkdtemp(prefix="CLAM-train-")
                inputs = CLAMMRML.export_volumes(nodes, self._trainTemp)
            self._trainOutput = pathlib.Path(p.trainOutput).absolute()
            self._training = self.logic.startTraining(inputs, p.trainK, self._trainOutput, device=p.device)
            self.ui.trainLogTextEdit.clear()
            self.ui.trainLogTextEdit.appendPlainText(" ".join(self._training.command))
            self.ui.trainProgressBar.value = 0
            self.ui.trainButton.enabled, self.ui.trainCancelButton.enabled = False, True
            self._trainTimer.start()

    def pollTraining(self) -> None:
        """Timer: move training output into the log and the bar; finish when the process ends."""
        if self._training is None:
            return
        lines, code = self._training.poll()
        for line in lines:
            self.ui.trainLogTextEdit.appendPlainText(line)
        self.ui.trainProgressBar.value = round(100 * self._training.progress)
        if code is not None:
            self._finishTraining(code)

    def onTrainCancel(self) -> None:
        """Kill the training process tree."""
        if self._training is not None:
            self._training.cancel()
            self._finishTraining(None)

    def _finishTraining(self, code: int | None) -> None:
        """Report the end of training, select the new bundle (the folder chosen at the start), clean up."""
        self._trainTimer.stop()
        out = self._trainOutput
        if code is None:
            self.ui.trainLogTextEdit.appendPlainText(_("Training cancelled."))
        elif code == 0 and out and (out / "model.json").is_file():
            self.ui.trainLogTextEdit.appendPlainText(
                _("Done: bundle written to {folder}; selected as the model.").format(folder=out))
            self._shown = (self._shown[0], None)  # a bundle retrained in place gets its new card shown
            self.logic.getParameterNode().modelPath = out
        else:
            self.ui.trainLogTextEdit.appendPlainText(
                _("Training failed (exit code {code}); see the log above.").format(code=code))
        self._training = None
        self._trainOutput = None
        if self._trainTemp:
            shutil.rmtree(self._trainTemp, ignore_errors=True)
            self._trainTemp = None
        self.ui.trainButton.enabled, self.ui.trainCancelButton.enabled = True, False


#
# Logic
#


class CLAMLogic(ScriptedLoadableModuleLogic):
    """Computation without GUI: dependencies, model loading, CLAM maps into the scene, training process."""

    def __init__(self) -> None:
        """Start with no model loaded."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._models: dict[tuple[str, float], Any] = {}
        self._cancel = False
        self._cohort: CLAMCohort.CohortBrowser | None = None

    def getParameterNode(self) -> CLAMParameterNode:
        """The module's typed parameter node."""
        return CLAMParameterNode(super().getParameterNode())

    # dependencies

    @staticmethod
    def missingPackages() -> list[str]:
        """Requirements of Resources/requirements.txt that are not installed (or too old)."""
        return CLAMDependencies.missing_requirements()

    def ensureDependencies(self, askConfirmation: bool = True) -> None:
        """Make torch (through PyTorchUtils) and the packages of requirements.txt importable, asking first.

        Call it outside any wait cursor or busy state: it may show dialogs, and the installation itself
        cannot be cancelled once started.
        """
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ImportError as error:
                raise CLAMDependencyError(_("CLAM needs PyTorch. Install the 'PyTorch' extension from the "
                                            "Extensions Manager, restart Slicer, then press Apply again.")) from error
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation=askConfirmation,
                                                                  torchVersionRequirement=TORCH_REQUIREMENT)
            if torch is None:
                raise CLAMDependencyError(_("PyTorch is required but was not installed. Install it with the "
                                            "PyTorch Utils module, then press Apply again."))
        missing = self.missingPackages()
        if missing:
            self._installPackages(missing, askConfirmation)
        import torch

        def release(version: str) -> tuple[int, ...]:
            return tuple(int(x) for x in re.findall(r"\d+", version.split("+")[0])[:2])

        if release(torch.__version__) < release(TORCH_REQUIREMENT):
            raise CLAMDependencyError(_("PyTorch {version} is too old; CLAM needs {requirement}. Update it in the "
                                        "PyTorch Utils module and restart Slicer.").format(
                version=torch.__version__, requirement=TORCH_REQUIREMENT))

    @staticmethod
    def _installPackages(missing: list[str], askConfirmation: bool) -> None:
        """Install the missing packages with Slicer's pip (pip_ensure from Slicer 5.12), Slicer's numpy kept."""
        hint = CLAMDependencies.manual_install_hint(missing)
        text = _("CLAM needs these Python packages, which will now be downloaded and installed:\n\n{packages}\n\n"
                 "This takes a few minutes and cannot be cancelled once started. Slicer's own numpy is kept.").format(
            packages="\n".join(missing))
        if askConfirmation and not slicer.util.confirmOkCancelDisplay(text, _("CLAM: install packages")):
            raise CLAMDependencyError(_("CLAM cannot run without: {packages}. To install them yourself, type in "
                                        "the Python console: {hint}").format(packages=", ".join(missing), hint=hint))
        import numpy

        with tempfile.TemporaryDirectory(prefix="CLAM-pip-") as folder:
            # pinning numpy keeps pip from replacing Slicer's numpy while resolving scikit-learn or matplotlib
            constraints = pathlib.Path(folder, "constraints.txt")
            constraints.write_text(f"numpy=={numpy.__version__}\n", encoding="utf-8")
            try:
                if importlib.util.find_spec("slicer.packaging") is not None:  # Slicer 5.12 and later
                    importlib.import_module("slicer.packaging").pip_ensure(
                        missing, constraints=constraints, prompt_install=False, requester="CLAM")
                else:  # no progress dialog before 5.12: a wait cursor while pip runs, none for the messages
                    with slicer.util.WaitCursor():
                        slicer.util.pip_install([*missing, "-c", str(constraints)])
            except (subprocess.CalledProcessError, OSError, RuntimeError) as error:
                raise CLAMDependencyError(_("Installing {packages} failed (no network, or a proxy?). Install them "
                                            "yourself in Slicer's Python console: {hint}, then restart Slicer."
                                            ).format(packages=", ".join(missing), hint=hint)) from error
        still = CLAMDependencies.missing_requirements()
        if still:
            raise CLAMDependencyError(_("Still missing after installation: {packages}. Restart Slicer, or install "
                                        "them yourself: {hint}").format(packages=", ".join(still), hint=hint))

    @staticmethod
    def describeDevices(importTorch: bool = False) -> str:
        """What compute is available, for the panel (does not import torch unless asked or already loaded)."""
        if "torch" not in sys.modules and not importTorch:
            return "PyTorch not loaded yet" if importlib.util.find_spec("torch") else "PyTorch not installed"
        try:
            import torch
        except ImportError:
            return "PyTorch not installed"
        if torch.cuda.is_available():
            return f"GPU: {torch.cuda.get_device_name(0)} (PyTorch {torch.__version__})"
        return f"CPU only (PyTorch {torch.__version__})"

    # model

    @staticmethod
    def modelCardSummary(path: str | os.PathLike) -> str:
        """One-paragraph summary of a bundle's card (k, grid, trained on), read from model.json only."""
        return CLAMMRML.model_card_summary(path)

    def loadModel(self, bundle: str | os.PathLike | Any) -> Any:
        """A loaded engine model (cached per bundle folder and its modification time)."""
        if not isinstance(bundle, (str, os.PathLike)):
            return bundle  # already a CLAMModel
        folder = pathlib.Path(bundle).resolve()
        stamp = (folder / "model.json").stat().st_mtime if (folder / "model.json").exists() else 0.0
        key = (str(folder), stamp)
        if key not in self._models:
            from CLAMLib import load_bundle

            self._models = {key: load_bundle(folder)}
        return self._models[key]

    # run

    def cancel(self) -> None:
        """Ask the current process() call to stop at its next progress report."""
        self._cancel = True

    def process(self, volumeNode: vtkMRMLScalarVolumeNode, bundle: str | os.PathLike | Any,
                clusters: str | Sequence[int] = "all", device: str = "auto", method: str = "default",
                opacity: float = 0.5, threshold: float = 0.2, colormap: str = "inferno",
                shownCluster: int | None = None,
                progress: Callable[[float, str], None] | None = None) -> CLAMResult:
        """Soft assignment and CLAM maps of a CT volume node, shown over it; no GUI needed.

        Creates or updates one overlay volume per mapped cluster (the input's exact geometry) and one table.
        """
        if volumeNode is None:
            raise ValueError(_("No input volume selected."))
        self._cancel = False
        self.ensureDependencies(askConfirmation=True)

        def report(fraction: float, message: str) -> None:
            if self._cancel:
                raise CLAMCancelled()
            if progress is not None:
                progress(fraction, message)

        report(0.0, "loading model")
        model = self.loadModel(bundle)
        report(0.02, "reading the volume")
        image = CLAMMRML.volume_to_image(volumeNode)
        explanation = model.explain_image(image, clusters=clusters, method=METHODS.get(method, method),
                                          device=DEVICES.get(device, device.lower()), progress=report)
        report(0.95, "writing maps to the scene")
        result = CLAMMRML.apply_result(volumeNode, explanation, opacity=opacity, threshold=threshold,
                                       colormap=colormap, shownCluster=shownCluster)
        report(1.0, "done")
        logger.info(f"CLAM: {volumeNode.GetName()} assigned to cluster {result.assignment}, "
                    f"q = {[round(float(v), 3) for v in result.probabilities]}")
        return result

    @staticmethod
    def openCohortReport(mapsFolder: str | os.PathLike, model: str | os.PathLike | None = None) -> pathlib.Path:
        """Write (or refresh) the cohort report of a `clam map` output folder and open it in the system browser."""
        from CLAMLib.report import build_report

        index = build_report(mapsFolder, model)
        if not qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(index))):
            logger.warning(f"CLAM: no browser could open {index}; open it from a file browser")
        return index

    def startTraining(self, inputs: Sequence[str], k: int, out: str | os.PathLike, device: str = "auto",
                      extra: Sequence[str] = ()) -> CLAMMRML.BackgroundProcess:
        """Run `clam train` (python -m CLAMLib.cli) in the background with Slicer's Python, on the chosen device."""
        python = shutil.which("PythonSlicer") or sys.executable
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([MODULE_DIR, *filter(None, [env.get("PYTHONPATH")])])
        command = CLAMMRML.train_command(inputs, k, pathlib.Path(out).absolute(), python=python,
                                         extra=["--device", DEVICES.get(device, device.lower()), *extra])
        return CLAMMRML.BackgroundProcess(command, cwd=MODULE_DIR, env=env)

    # cohort

    @property
    def cohort(self) -> CLAMCohort.CohortBrowser:
        """The cohort browser on the scene (one scan's nodes at a time); views are fitted in the application."""
        if self._cohort is None:
            app = getattr(slicer, "app", None)
            self._cohort = CLAMCohort.CohortBrowser(applicationLogic=app.applicationLogic() if app else None)
        return self._cohort

    def openCohort(self, folder: str | os.PathLike, clinical: str | os.PathLike | None = None,
                   idColumn: str = "id") -> Any:
        """Open a `clam map` output folder (joining a clinical CSV on idColumn); returns its table."""
        return self.cohort.open(folder, clinical, idColumn)

    def showScan(self, scanId: str, cluster: int | None = None) -> CLAMCohort.ShownScan:
        """Load one scan of the open cohort with a cluster's map (default its own), centred on the map's maximum."""
        return self.cohort.showScan(scanId, cluster)

    def nextScan(self, offset: int = 1) -> CLAMCohort.ShownScan | None:
        """Show the next scan (or, with offset -1, the previous one) of the filtered list."""
        return self.cohort.next(offset)

    def showClusterAverage(self, cluster: int) -> CLAMCohort.ShownScan:
        """Show a cluster's average map (model grid) over the cohort mean image."""
        return self.cohort.showAverage(cluster)

    def associateCohort(self, clinical: str | os.PathLike | None = None, idColumn: str = "id") -> Any:
        """Run `clam associate` on the open cohort; writes association.md/.csv/.json and plots into its folder."""
        from CLAMLib.associate import associate, write_association

        table = self.cohort.table
        if table is None:
            raise ValueError(_("Open a cohort first (a `clam map` output folder)."))
        result = associate(table.folder, clinical, idColumn)
        write_association(result, table.folder)
        return result

    def startMapping(self, bundle: str | os.PathLike, inputs: Sequence[str], out: str | os.PathLike,
                     device: str = "auto", extra: Sequence[str] = ()) -> CLAMMRML.BackgroundProcess:
        """Run `clam map` on scans or folders in the background with Slicer's Python, on the chosen device."""
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([MODULE_DIR, *filter(None, [env.get("PYTHONPATH")])])
        command = CLAMCohort.map_command(pathlib.Path(bundle).absolute(), inputs, pathlib.Path(out).absolute(),
                                         python=shutil.which("PythonSlicer") or sys.executable,
                                         extra=["--device", DEVICES.get(device, device.lower()), *extra])
        return CLAMMRML.BackgroundProcess(command, cwd=MODULE_DIR, env=env)


#
# Test
#


class CLAMTest(ScriptedLoadableModuleTest):
    """Self-test in Slicer: the whole flow on a small synthetic CT with the demo model."""

    def setUp(self) -> None:
        """Start from an empty scene."""
        slicer.mrmlScene.Clear()

    def runTest(self) -> None:
        """Run every test."""
        self.setUp()
        self.test_CLAM_process()

    def test_CLAM_process(self) -> None:
        """Maps on the input's geometry, a table of q, updates in place, input untouched."""
        import numpy as np

        self.delayDisplay("Making a synthetic CT")
        array = np.full((32, 48, 48), -1000, np.int16)
        array[4:28, 8:40, 4:44] = 40
        array[6:26, 12:36, 8:22] = -850
        array[6:26, 12:36, 26:40] = -850
        array[14:18, 20:26, 30:35] = 20
        ijkToRas = np.array([[-0.9, 0.1, 0, 20], [0.1, 0.9, 0, -30], [0, 0, 2.5, -40], [0, 0, 0, 1]])
        ct = slicer.util.addVolumeFromArray(array, ijkToRas, name="synthetic CT")
        before = (array.tobytes(), CLAMMRML.ijk_to_ras_array(ct).tobytes(), ct.GetName())
        bundle = demoBundlePath()
        self.assertTrue((bundle / "model.json").is_file(), f"demo bundle missing at {bundle}")

        self.delayDisplay("Running CLAM")
        logic = CLAMLogic()
        logic.ensureDependencies(askConfirmation=False)  # a self-test must not wait for a dialog
        result = logic.process(ct, bundle, clusters="all", device="auto")
        k = result.k
        self.assertGreaterEqual(k, 2)
        self.assertAlmostEqual(float(np.sum(result.probabilities)), 1.0, places=4)
        self.assertEqual(result.assignment, int(np.argmax(result.probabilities)))
        self.assertEqual(sorted(result.mapNodes), list(range(k)))
        for node in result.mapNodes.values():
            np.testing.assert_allclose(CLAMMRML.ijk_to_ras_array(node), ijkToRas)
            values = slicer.util.arrayFromVolume(node)
            self.assertEqual(values.shape, array.shape)
            self.assertTrue(0.0 <= values.min() and values.max() <= 1.0)
        self.assertEqual(result.tableNode.GetNumberOfRows(), k)
        composite = slicer.mrmlScene.GetNodeByID("vtkMRMLSliceCompositeNodeRed")
        self.assertEqual(composite.GetForegroundVolumeID(), result.mapNodes[result.assignment].GetID())
        self.assertEqual(composite.GetBackgroundVolumeID(), ct.GetID())

        self.delayDisplay("Re-running: outputs are updated, not duplicated")
        count = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
        again = logic.process(ct, bundle, clusters="assigned", device="auto", method="faithful CLAM")
        self.assertEqual(list(again.mapNodes), [again.assignment])
        self.assertEqual(again.tableNode.GetID(), result.tableNode.GetID())
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode"), count - (k - 1))
        after = (slicer.util.arrayFromVolume(ct).tobytes(), CLAMMRML.ijk_to_ras_array(ct).tobytes(), ct.GetName())
        self.assertEqual(after, before)
        self.delayDisplay("Test passed")
