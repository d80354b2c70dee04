"""The CLAM panel under a stand-in for the Slicer application (slicer_harness) on real MRML: one test per way the
module misbehaved in Slicer (results of another input, training reported as failed, a stuck log reader, dialogs
under a wait cursor, foreign overlays touched, a default training folder, a stale demo path, colour tables,
CLAM's outputs offered as inputs, the device ignored, template conventions)."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
    import slicer.util

    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError("this `slicer` package has no vtkMRMLScene (is it the unrelated PyPI `slicer`?)")
except ImportError as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs Slicer's MRML from the `slicer-core` wheel: {error}", allow_module_level=True)

sys.path.insert(0, str(Path(__file__).resolve().parent))
import slicer_harness  # noqa: E402

ROOT = Path(__file__).resolve().parents[3]
DEMO = ROOT / "models" / "clam-demo"


@pytest.fixture
def harness(monkeypatch):
    """The stand-in application with CLAM.py loaded under it."""
    h = slicer_harness.Harness(monkeypatch)
    h.clam = h.install()
    yield h
    h.close()


def add_ct(name: str, lesion: bool = False):
    """A small chest-like CT volume node in slicer.mrmlScene."""
    array = np.full((24, 40, 40), -1000, np.int16)
    array[2:22, 6:34, 3:37] = 40
    array[4:20, 9:31, 6:18] = -850
    array[4:20, 9:31, 22:34] = -850
    if lesion:
        array[10:14, 16:21, 25:30] = 30
    return slicer.util.addVolumeFromArray(array, np.diag([1.5, 1.5, 3.0, 1.0]), name=name)


def apply(harness, panel) -> None:
    """Press Apply; fail with the slot's traceback if it raised."""
    panel.ui.applyButton.click()
    assert not harness.slotErrors, harness.slotErrors[-1]
    assert not harness.errors, harness.errors[-1]


def test_results_and_model_card_follow_the_selection(harness, tmp_path):
    """Item 4: choosing another CT shows that CT's results (none), the model card follows the chosen bundle."""
    first, second = add_ct("first"), add_ct("second")
    panel = harness.widget(harness.clam)
    panel.ui.inputVolumeSelector.setCurrentNode(first)
    apply(harness, panel)
    assert panel.ui.assignedClusterLabel.text != "-" and panel.ui.resultsTableView.mrmlTableNode() is not None
    panel.ui.inputVolumeSelector.setCurrentNode(second)
    assert panel.ui.assignedClusterLabel.text == "-" and panel.ui.resultsTableView.mrmlTableNode() is None
    assert panel.ui.shownClusterComboBox.count() == 0
    panel.ui.inputVolumeSelector.setCurrentNode(first)
    assert panel.ui.assignedClusterLabel.text != "-"
    other = tmp_path / "other"
    shutil.copytree(DEMO, other)
    card = (other / "model.json").read_text().replace('"trained_on": "', '"trained_on": "OTHER ')
    (other / "model.json").write_text(card)
    panel.ui.modelPathLineEdit.currentPath = str(other)
    assert "OTHER" in panel.ui.modelCardLabel.text
    panel.ui.useDemoModelButton.click()
    assert "OTHER" not in panel.ui.modelCardLabel.text and panel.ui.modelPathLineEdit.currentPath == str(DEMO)


class FinishedTraining:
    """A `clam train` process that has written its bundle and exited with 0."""

    def __init__(self, out: Path) -> None:
        """Write the bundle (a copy of the demo model) into the output folder, as clam train does."""
        shutil.copytree(DEMO, out)
        self.command, self.progress = ["clam", "train"], 1.0

    def poll(self) -> tuple[list[str], int]:
        """Its last lines and its exit code."""
        return ["[done]"], 0

    def cancel(self) -> None:
        """Nothing left to stop."""


@pytest.mark.parametrize("meanwhile", ["left the module", "closed the scene", "edited the output field"])
def test_finished_training_is_reported_and_selected(harness, tmp_path, monkeypatch, meanwhile):
    """Item 5: the bundle is the one asked for at the start, reported as done and selected, whatever happened."""
    scans = tmp_path / "scans"
    scans.mkdir()
    out = tmp_path / "new-model"
    panel = harness.widget(harness.clam)
    started = {}

    def start(inputs, k, folder, device="auto", extra=()):
        started.update(inputs=inputs, k=k, folder=Path(folder), device=device)
        return FinishedTraining(Path(folder))

    monkeypatch.setattr(panel.logic, "startTraining", start)
    p = panel._parameterNode
    p.trainUseFolder, p.trainFolder, p.trainOutput = True, scans, out
    panel.ui.trainButton.click()
    assert not harness.slotErrors and not harness.errors and started["folder"] == out
    if meanwhile == "left the module":
        panel.exit()
    elif meanwhile == "closed the scene":
        slicer.mrmlScene.Clear(0)
    else:
        panel.ui.trainOutputPathLineEdit.currentPath = str(tmp_path / "elsewhere")
    panel._trainTimer.timeout.emit()
    assert not harness.slotErrors, harness.slotErrors[-1]
    log = panel.ui.trainLogTextEdit.toPlainText()
    assert f"Done: bundle written to {out}" in log and "failed" not in log
    assert Path(panel.logic.getParameterNode().modelPath) == out
    assert panel.ui.trainButton.enabled and not panel.ui.trainCancelButton.enabled


def test_training_folder_has_no_default_and_is_refused_until_chosen(harness, monkeypatch, tmp_path):
    """Item 9: no folder (not the home folder) until one is chosen; Train refuses to walk none."""
    panel = harness.widget(harness.clam)
    p = panel._parameterNode
    assert str(p.trainFolder) in ("", ".") and p.trainFolder != Path.home()
    monkeypatch.setattr(panel.logic, "startTraining", lambda *a, **k: pytest.fail("training started"))
    p.trainUseFolder = True
    panel.ui.trainButton.click()
    assert harness.errors and "Choose the folder of scans" in harness.errors[-1]


def test_training_runs_on_the_chosen_device(harness, monkeypatch, tmp_path):
    """Item 13: the Device setting reaches `clam train --device`."""
    panel = harness.widget(harness.clam)
    commands = []
    monkeypatch.setattr(harness.clam.CLAMMRML, "BackgroundProcess",
                        lambda command, **kwargs: commands.append(command) or FinishedTraining(tmp_path / "m"))
    p = panel._parameterNode
    p.trainUseFolder, p.trainFolder, p.trainOutput = True, tmp_path, tmp_path / "m"
    panel.ui.deviceComboBox.currentText = "CPU"
    panel.ui.trainButton.click()
    assert not harness.errors, harness.errors
    command = commands[-1]
    assert command[command.index("--device") + 1] == "cpu"


def test_saved_demo_path_of_another_installation_is_reset(harness):
    """Item 10: a scene saved with an older Slicer's demo model path selects this installation's demo model."""
    logic = harness.clam.CLAMLogic()
    p = logic.getParameterNode()
    p.modelPath = Path("/opt/Slicer-5.8.1/NA-MIC/Extensions-33216/CLAM/lib/Slicer-5.8/qt-scripted-modules/"
                       "Resources/Models/clam-demo")
    panel = harness.widget(harness.clam)
    assert Path(panel._parameterNode.modelPath) == harness.clam.demoBundlePath()
    assert panel.ui.applyButton.enabled is False  # no CT yet, but the model is found again
    missing_own = Path("/data/my-models/lung-k3")
    panel._parameterNode.modelPath = missing_own
    panel.exit()
    panel.enter()
    assert Path(panel._parameterNode.modelPath) == missing_own  # a user's own bundle is never replaced


def test_log_reader_survives_a_latin1_byte(harness):
    """Item 6: a child printing a byte that is not UTF-8 is read to its end; the exit code is reported."""
    script = "import sys; sys.stdout.buffer.write(b'caf\\xe9 au lait\\n'); sys.stdout.flush(); print('after')"
    process = harness.clam.CLAMMRML.BackgroundProcess([sys.executable, "-c", script])
    lines, code, deadline = [], None, time.monotonic() + 20
    while code is None and time.monotonic() < deadline:
        new, code = process.poll()
        lines += new
        time.sleep(0.05)
    assert code == 0 and lines == ["caf\ufffd au lait", "after"]


def test_child_console_hidden_on_windows(monkeypatch):
    """Item 6: on Windows the child starts with its console window hidden, as slicer.util starts its children."""
    import CLAMMRML

    class StartupInfo:
        def __init__(self):
            self.dwFlags, self.wShowWindow = 0, 1

    monkeypatch.setattr(subprocess, "STARTUPINFO", StartupInfo, raising=False)
    monkeypatch.setattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x200, raising=False)
    options = CLAMMRML.popen_options(windows=True)
    assert options["startupinfo"].dwFlags & 1 and options["startupinfo"].wShowWindow == 0
    assert options["creationflags"] == 0x200
    assert CLAMMRML.popen_options(windows=False) == {"start_new_session": True}


@pytest.fixture
def missing_matplotlib(harness, monkeypatch):
    """matplotlib reported missing until pip has run."""
    state = {"installed": False}
    monkeypatch.setattr(harness.clam.CLAMDependencies, "missing_requirements",
                        lambda requirements=None: [] if state["installed"] else ["matplotlib>=3.6"])
    return state


def test_install_asks_first_outside_the_wait_cursor(harness, missing_matplotlib):
    """Item 7: the question comes before any busy state, names the packages and says it cannot be cancelled."""
    add_ct("ct")
    panel = harness.widget(harness.clam)
    harness.pip.clear()
    harness.answers.append(False)
    panel.ui.applyButton.click()
    text, cursors = harness.dialogs[-1]
    assert cursors == [] and "matplotlib>=3.6" in text and "cannot be cancelled" in text
    assert harness.pip == [] and harness.app.cursors == [] and not harness.slotErrors
    assert len(harness.errors) == 1 and "slicer.util.pip_install('matplotlib>=3.6')" in harness.errors[0]
    assert panel.ui.applyButton.enabled and not panel.ui.cancelButton.enabled


def test_offline_install_failure_is_one_message_saying_what_to_install(harness, missing_matplotlib, monkeypatch):
    """Item 7: pip failing (offline) gives one message with the command to type, not a CalledProcessError."""
    add_ct("ct")
    panel = harness.widget(harness.clam)

    cursors = []

    def offline(requirements):
        cursors.append(list(harness.app.cursors))
        raise subprocess.CalledProcessError(1, ["pip", "install", *requirements])

    monkeypatch.setattr(slicer.util, "pip_install", offline)
    panel.ui.applyButton.click()
    assert len(harness.errors) == 1, harness.errors
    assert "CalledProcessError" not in harness.errors[0] and "pip_install('matplotlib>=3.6')" in harness.errors[0]
    assert cursors == [["wait"]] and harness.errorCursors == [[]] and harness.app.cursors == []


def test_install_uses_pip_ensure_where_slicer_has_it(harness, missing_matplotlib, monkeypatch):
    """Item 7: Slicer 5.12's slicer.packaging.pip_ensure (its own progress dialog), pip_install before that."""
    import types

    calls = []

    def pip_ensure(requirements, constraints=None, prompt_install=True, requester=None, **kwargs):
        calls.append((list(requirements), Path(constraints).read_text(), prompt_install, requester))
        missing_matplotlib["installed"] = True

    monkeypatch.setitem(sys.modules, "slicer.packaging", types.SimpleNamespace(
        pip_ensure=pip_ensure, __spec__=types.SimpleNamespace(name="slicer.packaging")))
    harness.clam.CLAMLogic().ensureDependencies(askConfirmation=True)
    import numpy

    assert calls == [(["matplotlib>=3.6"], f"numpy=={numpy.__version__}\n", False, "CLAM")]
    assert harness.pip == []


def test_display_changes_touch_only_clam_overlays(harness):
    """Item 8: a slice view showing another foreground keeps its opacity when CLAM's opacity changes."""
    ct = add_ct("ct")
    panel = harness.widget(harness.clam)
    panel.ui.inputVolumeSelector.setCurrentNode(ct)
    apply(harness, panel)
    other = add_ct("someone else's overlay")
    composites = {c.GetLayoutName(): c for c in harness.clam.CLAMMRML.slice_composite_nodes()}
    composites["Green"].SetForegroundVolumeID(other.GetID())
    composites["Green"].SetForegroundOpacity(0.9)
    panel.ui.opacitySlider.setValue(0.3)
    assert composites["Green"].GetForegroundOpacity() == pytest.approx(0.9)
    assert composites["Red"].GetForegroundOpacity() == pytest.approx(0.3)


def test_slicer_colour_tables_are_used_when_present(harness):
    """Item 11: Slicer's own Inferno table when the scene has it; CLAM's built copy otherwise (slicer-core)."""
    import CLAMMRML

    built = CLAMMRML.colormap_node("inferno", slicer.mrmlScene)
    assert built.GetAttribute(CLAMMRML.COLORMAP_ATTRIBUTE) == "inferno"
    own = slicer.vtkMRMLColorTableNode()
    own.SetTypeToFile()
    own.SetName("Inferno")
    own.SetSingletonTag("FileInferno.txt")  # as Slicer's colour logic tags Inferno.txt
    own = slicer.mrmlScene.AddNode(own)
    assert own.GetID() == "vtkMRMLColorTableNodeFileInferno.txt"
    assert CLAMMRML.colormap_node("inferno", slicer.mrmlScene) is own
    assert CLAMMRML.colormap_node("viridis", slicer.mrmlScene).GetAttribute(CLAMMRML.COLORMAP_ATTRIBUTE) == "viridis"


def test_input_selectors_hide_clam_outputs(harness):
    """Item 12: after Apply, the maps are hidden from the input and training selectors and never picked."""
    ct = add_ct("ct")
    panel = harness.widget(harness.clam)
    panel.ui.inputVolumeSelector.setCurrentNode(ct)
    apply(harness, panel)
    outputs = set(harness.clam.CLAMMRML.output_node_ids(slicer.mrmlScene))
    maps = {n.GetID() for n in harness.clam.CLAMMRML.find_outputs(ct, "map")}
    assert maps and maps <= outputs
    for selector in (panel.ui.inputVolumeSelector, panel.ui.trainVolumesSelector):
        assert outputs <= set(selector.sortFilterProxyModel().hiddenNodeIDs)
    assert harness.clam.CLAMMRML.input_volumes(slicer.mrmlScene) == [ct]


def test_template_conventions():
    """Item 14: translatable strings, a documentation link in the help, no sys.path entry ahead of the library."""
    source = (ROOT / "CLAM" / "CLAM.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and ast.unparse(node.targets[0]) in (
                "self.parent.title", "self.parent.helpText", "self.parent.acknowledgementText"):
            call = node.value.func.value if isinstance(node.value.func, ast.Attribute) else node.value
            assert isinstance(call, ast.Call) and ast.unparse(call.func) == "_", ast.unparse(node)
        if isinstance(node, ast.Call) and ast.unparse(node.func) in ("ValueError", "CLAMDependencyError"):
            assert isinstance(node.args[0], ast.Call), f"untranslated message: {ast.unparse(node)}"
    assert "sys.path.insert" not in source
    assert 'translate("qSlicerAbstractCoreModule", "Quantification")' in source
    assert '<a href="{documentation}">' in source and 'DOCUMENTATION_URL = "https://' in source


# Python packages a stock 3D Slicer ships (Slicer's SuperBuild/External_python-*.cmake on main, 2026-08;
# Slicer 5.8 has the same set less dcmqi, highdicom, pyjpegls and the python-SimpleITK wheel).
SLICER_BUNDLED = {"certifi", "cffi", "chardet", "charset-normalizer", "couchdb", "cryptography", "dcmqi",
                  "deprecated", "dicomweb-client", "gitdb", "gitpython", "highdicom", "idna", "numpy", "packaging",
                  "pillow", "pip", "pycparser", "pydicom", "pygithub", "pyjwt", "pyjpegls", "pynacl", "pyparsing",
                  "python-dateutil", "requests", "retrying", "scipy", "setuptools", "simpleitk", "six", "smmap",
                  "typing-extensions", "urllib3", "wheel", "wrapt"}
SLICER_ITSELF = {"slicer-core", "vtk", "clam-explain"}  # the application's MRML and VTK; the extension's own code


def allowed_distributions() -> set[str]:
    """What a stock Slicer has once CLAM installed its list and PyTorch: those, torch, and what they require."""
    from importlib import metadata

    import CLAMDependencies
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    wanted = SLICER_BUNDLED | SLICER_ITSELF | {"torch"} | {
        canonicalize_name(r.name) for r in CLAMDependencies.load_requirements()}
    allowed: set[str] = set()
    while wanted:
        name = wanted.pop()
        if name in allowed:
            continue
        allowed.add(name)
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            continue
        for text in requires:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                wanted.add(canonicalize_name(requirement.name))
    return allowed


def test_a_stock_slicer_with_the_install_list_applies_and_trains(tmp_path):
    """Item 1: with every package blocked that Slicer does not bundle and CLAM does not install, Apply and the
    training subprocess (QC pictures and report: matplotlib) both run to the end."""
    from importlib import metadata

    from packaging.utils import canonicalize_name

    allowed = allowed_distributions()
    blocked = sorted(name for name, dists in metadata.packages_distributions().items()
                     if not any(canonicalize_name(d) in allowed for d in dists) and name not in sys.stdlib_module_names
                     and name.isidentifier())
    assert {"pytest", "PySide6"} <= set(blocked) and "matplotlib" not in blocked
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(
        "import importlib.abc, sys\n"
        f"BLOCKED = {set(blocked)!r}\n"
        "class NotInSlicer(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in BLOCKED:\n"
        "            raise ModuleNotFoundError(f'No module named {name!r} (not in a stock Slicer)', name=name)\n"
        "sys.meta_path.insert(0, NotInSlicer())\n")
    env = {**__import__("os").environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, str(Path(slicer_harness.__file__)), str(tmp_path)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "Apply and training ran to the end" in run.stdout
