"""A stand-in for the parts of the 3D Slicer application that the CLAM module's panel touches, for headless tests.

Real MRML underneath (the ``slicer-core`` wheel: scene, parameter nodes, volumes, slice composite nodes). On top,
what the panel's behaviour depends on, imitated from Slicer's source (Base/Python/slicer/parameterNodeWrapper,
ScriptedLoadableModule.py, util.py) and PythonQt:

- A signal runs its slots in the order they were connected; old-style ``widget.connect("sig(args)", slot)`` and
  new-style ``widget.sig.connect(slot)`` share one list; a slot gets as many arguments as it takes; an exception
  in a slot is recorded (PythonQt prints it) and the other slots still run.
- ``@parameterNodeWrapper``'s ``connectGui``: one connector per widget whose SlicerParameterName is set in the .ui,
  connected to the widget's change signal when connectGui runs. The parameter node changes only in that slot; the
  node's ModifiedEvent writes every value back to the widgets (without blocking their signals).
- Widgets emit their change signal only when the value changes, as Qt's do.
- ``slicer.app``'s override cursor stack; message boxes record the cursors they were shown under.
"""

from __future__ import annotations

import inspect
import os
import pathlib
import sys
import traceback
import types
import typing
import xml.etree.ElementTree as ET
from typing import Any, Callable

import slicer
import slicer.util
import vtk

MODULE_DIR = pathlib.Path(__file__).resolve().parents[2]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CLAM.ui"
CHANGE_SIGNAL = {"qMRMLNodeComboBox": "currentNodeChanged", "ctkPathLineEdit": "currentPathChanged",
                 "QComboBox": "currentIndexChanged", "ctkSliderWidget": "valueChanged", "QSpinBox": "valueChanged",
                 "QCheckBox": "stateChanged"}


class Signal:
    """A PythonQt signal: slots in connection order, each given as many arguments as it accepts."""

    def __init__(self, owner: Harness) -> None:
        """No slots yet."""
        self.owner = owner
        self.slots: list[Callable] = []

    def connect(self, slot: Callable) -> None:
        """Append a slot."""
        self.slots.append(slot)

    def disconnect(self, slot: Callable) -> None:
        """Remove a slot."""
        self.slots.remove(slot)

    def emit(self, *args: Any) -> None:
        """Run every slot in connection order; an exception is recorded and the next slot still runs."""
        for slot in list(self.slots):
            try:
                slot(*args[:_positional_count(slot, len(args))])
            except Exception:
                self.owner.slotErrors.append(traceback.format_exc())


def _positional_count(slot: Callable, available: int) -> int:
    """How many of the signal's arguments a slot takes."""
    try:
        parameters = inspect.signature(slot).parameters.values()
    except (TypeError, ValueError):
        return available
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return available
    return min(available, sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters))


class ProxyModel:
    """qMRMLSortFilterProxyModel: only what hides nodes."""

    def __init__(self) -> None:
        """No node hidden."""
        self.hiddenNodeIDs: list[str] = []

    def setHiddenNodeIDs(self, ids: list[str]) -> None:
        """Hide these nodes from the selector."""
        self.hiddenNodeIDs = list(ids)


class Widget:
    """A Qt / CTK / MRML widget of the .ui: the properties and signals the module uses."""

    def __init__(self, harness: Harness, cls: str, name: str, properties: dict[str, str],
                 items: list[str]) -> None:
        """A widget of class ``cls`` named ``name`` with the .ui's dynamic properties and combo items."""
        self._harness, self.className, self.objectName, self._properties = harness, cls, name, properties
        self._signals: dict[str, Signal] = {}
        self.enabled, self.visible, self.text, self.toolTip = properties.get("enabled") != "false", True, \
            properties.get("text", ""), ""
        self.value, self.checked = 0.0, properties.get("checked") == "true"
        self._currentNode, self._checkedNodes, self._table = None, [], None
        self._currentPath = ""
        self._items: list[tuple[str, Any]] = [(text, None) for text in items]
        self._index = 0 if items else -1
        self._log: list[str] = []
        self._proxy = ProxyModel()

    def __getattr__(self, name: str) -> Signal:
        """Signals are made on first use (new-style connections: widget.clicked.connect(slot))."""
        if name.startswith("_"):
            raise AttributeError(name)
        return self._signals.setdefault(name, Signal(self._harness))

    def connect(self, signature: str, slot: Callable) -> None:
        """Old-style connection: widget.connect("clicked(bool)", slot)."""
        getattr(self, signature.split("(")[0]).connect(slot)

    # MRML widgets
    def setMRMLScene(self, scene: Any) -> None:
        """Accepted and ignored: the harness uses slicer.mrmlScene."""

    def currentNode(self) -> Any:
        """The selected node."""
        return self._currentNode

    def setCurrentNode(self, node: Any) -> None:
        """Select a node; currentNodeChanged only if it changed."""
        if node is not self._currentNode:
            self._currentNode = node
            self.currentNodeChanged.emit(node)

    def horizontalHeader(self) -> Widget:
        """A table widget's header: the table itself here, which carries the header's sectionClicked signal."""
        return self

    def sortFilterProxyModel(self) -> ProxyModel:
        """The selector's filter."""
        return self._proxy

    def checkedNodes(self) -> list:
        """Checked nodes of a checkable node combo box."""
        return list(self._checkedNodes)

    def setMRMLTableNode(self, node: Any) -> None:
        """Show a table node."""
        self._table = node

    def mrmlTableNode(self) -> Any:
        """The shown table node."""
        return self._table

    # ctkPathLineEdit
    @property
    def currentPath(self) -> str:
        """The path in the line edit."""
        return self._currentPath

    @currentPath.setter
    def currentPath(self, path: str) -> None:
        if path != self._currentPath:
            self._currentPath = path
            self.currentPathChanged.emit(path)

    # QComboBox
    @property
    def currentIndex(self) -> int:
        """The selected item."""
        return self._index

    @currentIndex.setter
    def currentIndex(self, index: int) -> None:
        self.setCurrentIndex(index)

    def setCurrentIndex(self, index: int) -> None:
        """Select an item; currentIndexChanged only if it changed."""
        if index != self._index:
            self._index = index
            self.currentIndexChanged.emit(index)

    @property
    def currentText(self) -> str:
        """The selected item's text."""
        return self._items[self._index][0] if 0 <= self._index < len(self._items) else ""

    @currentText.setter
    def currentText(self, text: str) -> None:
        self.setCurrentIndex(self.findText(text))

    def addItem(self, text: str, data: Any = None) -> None:
        """Append an item."""
        self._items.append((text, data))
        if self._index < 0:
            self.setCurrentIndex(0)

    def clear(self) -> None:
        """Remove every item (combo box) or every line (text edit)."""
        self._items, self._log = [], []
        self.setCurrentIndex(-1)

    def findText(self, text: str) -> int:
        """Index of the item with this text, or -1."""
        return next((i for i, (t, _) in enumerate(self._items) if t == text), -1)

    def itemData(self, index: int) -> Any:
        """Data of an item."""
        return self._items[index][1] if 0 <= index < len(self._items) else None

    def count(self) -> int:
        """Number of items."""
        return len(self._items)

    # sliders, spin boxes, check boxes, buttons, text edits
    def setValue(self, value: float) -> None:
        """Set a slider or spin box; valueChanged only if it changed."""
        if value != self.value:
            self.value = value
            self.valueChanged.emit(value)

    def setChecked(self, checked: bool) -> None:
        """Check or uncheck; toggled and stateChanged only if it changed."""
        if checked != self.checked:
            self.checked = checked
            self.toggled.emit(checked)
            self.stateChanged.emit(2 if checked else 0)

    def click(self) -> None:
        """Press a button (only an enabled one reacts, as in Qt)."""
        if self.enabled:
            self.clicked.emit(False)

    def appendPlainText(self, line: str) -> None:
        """Add a line to a text edit."""
        self._log.append(line)

    def toPlainText(self) -> str:
        """The text edit's lines."""
        return "\n".join(self._log)

    def property(self, name: str) -> Any:  # defined last: the name shadows the builtin in the class body
        """A dynamic property of the .ui (SlicerParameterName)."""
        return self._properties.get(name)


def load_ui(harness: Harness, path: pathlib.Path = UI_FILE) -> Widget:
    """The .ui's top widget; its ``children`` are every widget by object name (class, properties, combo items)."""
    widgets = {}
    for element in ET.parse(path).getroot().iter("widget"):
        properties = {p.get("name"): (p.findtext("string") or p.findtext("cstring") or p.findtext("bool"))
                      for p in element.findall("property")}
        items = [item.findtext("property/string") for item in element.findall("item")]
        widgets[element.get("name")] = Widget(harness, element.get("class"), element.get("name"), properties, items)
    top = next(iter(widgets.values()))
    top.children = types.SimpleNamespace(**widgets)
    return top


# --- parameterNodeWrapper -------------------------------------------------------------------------

def _base_type(annotation: Any) -> Any:
    """The type inside Annotated[...]."""
    return typing.get_args(annotation)[0] if typing.get_origin(annotation) is typing.Annotated else annotation


def _is_node(kind: Any) -> bool:
    """Whether a field holds an MRML node (stored as a node reference)."""
    return isinstance(kind, type) and issubclass(kind, slicer.vtkMRMLNode)


def parameterNodeWrapper(cls: type) -> type:
    """Typed access to a vtkMRMLScriptedModuleNode's parameters, and connectGui as Slicer's wrapper does it."""
    hints = typing.get_type_hints(cls, include_extras=True)
    fields = {name: _base_type(hint) for name, hint in hints.items()}
    choices = {name: list(meta[1]) for name, hint in hints.items() for meta in getattr(hint, "__metadata__", ())
               if isinstance(meta, tuple) and meta[0] == "Choice"}
    defaults = {name: getattr(cls, name, None) for name in fields}

    class Wrapped:
        __doc__ = cls.__doc__

        def __init__(self, node: Any) -> None:
            self.parameterNode = node
            self._guis: dict[int, list] = {}
            self._observers: dict[int, int] = {}
            self._updating = False
            for name, default in defaults.items():
                if not node.HasParameter(name) and not _is_node(fields[name]) and default is not None:
                    self._write(name, default)

        def _write(self, name: str, value: Any) -> None:
            if _is_node(fields[name]):
                self.parameterNode.SetNodeReferenceID(name, value.GetID() if value is not None else None)
            else:
                self.parameterNode.SetParameter(name, str(value))

        def _read(self, name: str) -> Any:
            kind = fields[name]
            if _is_node(kind):
                return self.parameterNode.GetNodeReference(name)
            text = self.parameterNode.GetParameter(name)
            return {bool: lambda t: t == "True", int: int, float: float}.get(kind, kind)(text)

        def connectGui(self, ui: types.SimpleNamespace) -> int:
            connectors = []
            for widget in vars(ui).values():
                name = widget.property("SlicerParameterName")
                if name:
                    if widget.className == "QComboBox" and not widget.count():  # the connector lists the choices
                        for choice in choices.get(name, []):
                            widget.addItem(choice)
                    self._writeWidget(widget, name)
                    slot = self._guiToParameter(widget, name)
                    getattr(widget, CHANGE_SIGNAL[widget.className]).connect(slot)
                    connectors.append((widget, name, slot))
            tag = len(self._guis) + 1 + max(self._guis, default=0)
            self._guis[tag] = connectors
            self._observers[tag] = self.parameterNode.AddObserver(vtk.vtkCommand.ModifiedEvent,
                                                                 lambda caller, event: self._updateGui())
            return tag

        def disconnectGui(self, tag: int) -> None:
            for widget, _name, slot in self._guis.pop(tag, []):
                getattr(widget, CHANGE_SIGNAL[widget.className]).disconnect(slot)
            if tag in self._observers:
                self.parameterNode.RemoveObserver(self._observers.pop(tag))

        def _guiToParameter(self, widget: Widget, name: str) -> Callable:
            def changed(*args: Any) -> None:
                if not self._updating:
                    setattr(self, name, self._readWidget(widget, name))
            return changed

        def _readWidget(self, widget: Widget, name: str) -> Any:
            kind = fields[name]
            cls_ = widget.className
            if cls_ == "qMRMLNodeComboBox":
                return widget.currentNode()
            if cls_ == "ctkPathLineEdit":
                return kind(widget.currentPath)
            if cls_ == "QComboBox":
                return widget.currentText
            if cls_ == "QCheckBox":
                return widget.checked
            return kind(widget.value)

        def _writeWidget(self, widget: Widget, name: str) -> None:
            value = getattr(self, name)
            cls_ = widget.className
            if cls_ == "qMRMLNodeComboBox":
                widget.setCurrentNode(value)
            elif cls_ == "ctkPathLineEdit":
                widget.currentPath = str(value)
            elif cls_ == "QComboBox":
                widget.currentText = value
            elif cls_ == "QCheckBox":
                widget.setChecked(bool(value))
            else:
                widget.setValue(value)

        def _updateGui(self) -> None:
            if self._updating:
                return
            self._updating = True
            try:
                for connectors in self._guis.values():
                    for widget, name, _slot in connectors:
                        self._writeWidget(widget, name)
            finally:
                self._updating = False

        def AddObserver(self, event: Any, callback: Callable, priority: float = 0.0) -> int:
            return self.parameterNode.AddObserver(event, callback, priority)

        def RemoveObserver(self, tag: int) -> None:
            self.parameterNode.RemoveObserver(tag)

    for name in fields:
        setattr(Wrapped, name, property(lambda self, n=name: self._read(n),
                                        lambda self, value, n=name: self._write(n, value)))
    Wrapped.__name__ = cls.__name__
    return Wrapped


# --- the application ------------------------------------------------------------------------------

class App:
    """slicer.app: the override cursor stack, events, testing mode."""

    def __init__(self) -> None:
        """No override cursor."""
        self.cursors: list[Any] = []
        self.testing = False

    def setOverrideCursor(self, cursor: Any) -> None:
        """Push a cursor."""
        self.cursors.append(cursor)

    def restoreOverrideCursor(self) -> None:
        """Pop a cursor."""
        self.cursors.pop()

    def processEvents(self) -> None:
        """Nothing queued."""

    def testingEnabled(self) -> bool:
        """Slicer's --testing flag."""
        return self.testing

    def topLevelWidgets(self) -> list:
        """No main window (slicer.util.mainWindow() gives None)."""
        return []

    def applicationLogic(self) -> Any:
        """No slice views to fit."""
        return None


class Harness:
    """Installs the stand-ins, loads CLAM.py under them and records what the user would see."""

    def __init__(self, patch: Any) -> None:
        """``patch`` is pytest's monkeypatch (or anything with setitem and setattr)."""
        self.patch = patch
        self.app = App()
        self.slotErrors: list[str] = []
        self.errors: list[str] = []
        self.errorCursors: list[list] = []
        self.dialogs: list[tuple[str, list]] = []
        self.answers: list[bool] = []
        self.pip: list[Any] = []
        self.panels: list[Any] = []

    def install(self) -> types.ModuleType:
        """Put qt, the Slicer application parts and a fresh scene in place; import CLAM.py; return it."""
        def module(name: str, **attrs: Any) -> types.ModuleType:
            stub = types.ModuleType(name)
            stub.__dict__.update(attrs)
            self.patch.setitem(sys.modules, name, stub)
            return stub

        class QTimer:
            def __init__(self) -> None:
                self.timeout, self.active = Signal(harness), False

            def setInterval(self, ms: int) -> None:
                pass

            def connect(self, signature: str, slot: Callable) -> None:
                self.timeout.connect(slot)

            def start(self) -> None:
                self.active = True

            def stop(self) -> None:
                self.active = False

            def isActive(self) -> bool:
                return self.active

        harness = self
        application = types.SimpleNamespace(setOverrideCursor=self.app.setOverrideCursor,  # slicer.app is the
                                            restoreOverrideCursor=self.app.restoreOverrideCursor)  # QApplication
        module("qt", QTimer=QTimer, Qt=types.SimpleNamespace(WaitCursor="wait"), QApplication=application)
        module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
        module("slicer.parameterNodeWrapper", parameterNodeWrapper=parameterNodeWrapper,
               Choice=lambda choices: ("Choice", tuple(choices)), WithinRange=lambda lo, hi: ("WithinRange", lo, hi))
        module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=ScriptedLoadableModule,
               ScriptedLoadableModuleLogic=ScriptedLoadableModuleLogic,
               ScriptedLoadableModuleWidget=ScriptedLoadableModuleWidget, ScriptedLoadableModuleTest=object)
        scene = slicer.vtkMRMLScene()
        self.patch.setattr(slicer, "mrmlScene", scene, raising=False)
        self.patch.setattr(slicer, "app", self.app, raising=False)
        self.patch.setattr(slicer.util, "loadUI", lambda path: load_ui(self, pathlib.Path(path)))
        self.patch.setattr(slicer.util, "childWidgetVariables", lambda top: top.children)
        self.patch.setattr(slicer.util, "errorDisplay", self._errorDisplay)
        self.patch.setattr(slicer.util, "confirmOkCancelDisplay", self._confirm)
        self.patch.setattr(slicer.util, "pip_install", self._pipInstall)
        for name in ("Red", "Green", "Yellow"):
            composite = slicer.vtkMRMLSliceCompositeNode()
            composite.SetLayoutName(name)
            scene.AddNode(composite)
        import importlib.util

        # CLAM.py's panel modules bind qt at import: import them afresh against these stubs, whatever ran before
        sys.modules.pop("CLAMCohortPanel", None)
        spec = importlib.util.spec_from_file_location("CLAM", MODULE_DIR / "CLAM.py")
        clam = importlib.util.module_from_spec(spec)
        self.patch.setitem(sys.modules, "CLAM", clam)
        spec.loader.exec_module(clam)
        return clam

    def _errorDisplay(self, text: str, **kwargs: Any) -> None:
        self.errors.append(text)
        self.errorCursors.append(list(self.app.cursors))

    def _confirm(self, text: str, windowTitle: str = "", **kwargs: Any) -> bool:
        self.dialogs.append((text, list(self.app.cursors)))
        return self.answers.pop(0) if self.answers else True

    def _pipInstall(self, requirements: Any) -> None:
        self.pip.append(requirements)

    def widget(self, clam: types.ModuleType) -> Any:
        """The module's panel, set up and entered, as Slicer does when the user opens the module."""
        parent = types.SimpleNamespace(isEntered=True)
        panel = clam.CLAMWidget(parent)
        panel.setup()
        panel.enter()
        self.panels.append(panel)
        return panel

    def close(self) -> None:
        """Destroy the panels as Slicer does when it quits (cleanup removes their scene observers)."""
        for panel in self.panels:
            panel.cleanup()


class ScriptedLoadableModule:
    """The module class: parent metadata only."""

    def __init__(self, parent: Any) -> None:
        """Keep the parent whose title, help and acknowledgement the module sets."""
        self.parent = parent


class ScriptedLoadableModuleLogic:
    """Logic base: the module's singleton parameter node in slicer.mrmlScene."""

    def __init__(self, parent: Any = None) -> None:
        """Named after the module."""
        self.moduleName = "CLAM"

    def getParameterNode(self) -> Any:
        """The scene's vtkMRMLScriptedModuleNode tagged with the module name, created when absent."""
        scene = slicer.mrmlScene
        node = scene.GetSingletonNode(self.moduleName, "vtkMRMLScriptedModuleNode")
        if node is None:
            node = slicer.vtkMRMLScriptedModuleNode()
            node.SetSingletonTag(self.moduleName)
            node.SetName(self.moduleName)
            node = scene.AddNode(node)
        return node


class ScriptedLoadableModuleWidget:
    """Widget base: layout, resource path."""

    def __init__(self, parent: Any = None) -> None:
        """Keep the parent (isEntered) and a layout."""
        self.parent = parent
        self.moduleName = "CLAM"
        self.layout = types.SimpleNamespace(addWidget=lambda widget: None)

    def setup(self) -> None:
        """Nothing beyond the module's own set-up."""

    def resourcePath(self, filename: str) -> str:
        """A file under the module's Resources folder."""
        return os.path.join(MODULE_DIR, "Resources", filename)


# --- a run as in a stock Slicer -------------------------------------------------------------------

class DirectPatch:
    """setitem / setattr without undo, for a harness in a process of its own."""

    def setitem(self, mapping: dict, key: Any, value: Any) -> None:
        """mapping[key] = value."""
        mapping[key] = value

    def setattr(self, target: Any, name: str, value: Any, raising: bool = True) -> None:
        """setattr(target, name, value)."""
        setattr(target, name, value)


def small_ct(name: str, lesion: bool = False, seed: int = 0) -> Any:
    """A small chest-like CT volume node in slicer.mrmlScene (two lungs, an optional dense lesion, noise)."""
    import numpy as np

    array = np.full((24, 40, 40), -1000.0)
    array[2:22, 6:34, 3:37] = 40
    array[4:20, 9:31, 6:18] = -850
    array[4:20, 9:31, 22:34] = -850
    if lesion:
        array[10:15, 15:22, 24:31] = 30
    array += np.random.default_rng(seed).normal(0, 5, array.shape)
    # voxels of a whole chest (lungs of about 1.2 L): clam train refuses lungs outside 0.5-12 L
    return slicer.util.addVolumeFromArray(array.astype(np.int16), np.diag([4.0, 4.0, 9.0, 1.0]), name=name)


def stock_slicer_run(workdir: str) -> None:
    """Apply from the panel, then `clam train` started by the panel's logic, to the end; exit non-zero on failure."""
    import time

    harness = Harness(DirectPatch())
    clam = harness.install()
    ct = small_ct("ct", lesion=True)
    panel = harness.widget(clam)
    panel.ui.inputVolumeSelector.setCurrentNode(ct)
    panel.ui.applyButton.click()
    if harness.slotErrors or harness.errors or panel.ui.assignedClusterLabel.text == "-":
        raise SystemExit(f"Apply failed: {(harness.slotErrors or harness.errors or ['no result'])[-1]}")
    nodes = [small_ct(f"scan {n}", lesion=bool(n % 2), seed=n) for n in range(6)]
    inputs = clam.CLAMMRML.export_volumes(nodes, pathlib.Path(workdir, "export"))
    process = panel.logic.startTraining(inputs, 2, pathlib.Path(workdir, "bundle"),
                                        extra=["--device", "cpu", "--grid", "16", "--epochs", "2",
                                               "--finetune-epochs", "1"])
    lines, code, deadline = [], None, time.monotonic() + 300
    while code is None and time.monotonic() < deadline:
        new, code = process.poll()
        lines += new
        time.sleep(0.1)
    if code != 0:
        raise SystemExit("training failed:\n" + "\n".join(lines[-20:]))
    print("Apply and training ran to the end")


if __name__ == "__main__":
    stock_slicer_run(sys.argv[1])
