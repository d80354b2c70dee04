"""CLAM.ui against CLAM.py: widgets the code names exist, parameter bindings match the parameter node."""

from __future__ import annotations

import ast
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CLAM.ui"
CLAM_PY = MODULE_DIR / "CLAM.py"

# Widget classes Slicer's parameterNodeWrapper connectors accept for each field type (exact class match).
CONNECTABLE = {
    "Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "pathlib.Path": {"ctkPathLineEdit", "ctkDirectoryButton"},
    "float": {"ctkSliderWidget", "QDoubleSpinBox"},
    "int": {"QSpinBox", "QSlider"},
    "bool": {"QCheckBox", "QPushButton"},
    "str": {"QLineEdit", "QTextEdit"},
    "Choice": {"QComboBox"},
    "node": {"qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"},
}


def _tree() -> ast.Module:
    """CLAM.py parsed (it imports qt and Slicer, so it cannot be imported here)."""
    return ast.parse(CLAM_PY.read_text(encoding="utf-8"))


def parameter_fields() -> dict[str, ast.AnnAssign]:
    """Fields of the @parameterNodeWrapper class CLAMParameterNode, by name."""
    for node in _tree().body:
        if isinstance(node, ast.ClassDef) and node.name == "CLAMParameterNode":
            decorators = {ast.unparse(d) for d in node.decorator_list}
            assert "parameterNodeWrapper" in decorators
            return {s.target.id: s for s in node.body if isinstance(s, ast.AnnAssign)}
    raise AssertionError("CLAMParameterNode not found in CLAM.py")


def field_kind(statement: ast.AnnAssign) -> str:
    """'Choice', 'node', or the base type name of a field annotation."""
    text = ast.unparse(statement.annotation)
    if "Choice(" in text:
        return "Choice"
    if text.startswith("vtkMRML"):
        return "node"
    if text.startswith("Annotated["):
        return ast.unparse(statement.annotation.slice.elts[0])
    return text


def choices(statement: ast.AnnAssign) -> list:
    """The literal list inside Choice([...]) of a field annotation."""
    for node in ast.walk(statement.annotation):
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "Choice":
            return ast.literal_eval(node.args[0])
    raise AssertionError(f"{statement.target.id} has no Choice")


def ui_names_used_by_code() -> set[str]:
    """Every `self.ui.<name>` that CLAM.py touches."""
    names = set()
    for node in ast.walk(_tree()):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def ui_xml_widgets() -> dict[str, ET.Element]:
    """Every <widget> of CLAM.ui by object name."""
    return {w.get("name"): w for w in ET.parse(UI_FILE).getroot().iter("widget")}


def xml_parameter_bindings() -> dict[str, tuple[str, str]]:
    """Widget name -> (class, SlicerParameterName) for bound widgets, read from the XML."""
    bound = {}
    for name, widget in ui_xml_widgets().items():
        for prop in widget.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[name] = (widget.get("class"), prop.findtext("string"))
    return bound


@pytest.fixture(scope="module")
def loaded_ui():
    """CLAM.ui loaded by PySide6's QUiLoader, offscreen (CTK / MRML classes fall back to their bases)."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore", reason="PySide6-Essentials is needed to load the .ui")
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    file = QtCore.QFile(str(UI_FILE))
    assert file.open(QtCore.QFile.OpenModeFlag.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(file)
    file.close()
    assert widget is not None, loader.errorString()
    yield widget
    widget.deleteLater()
    app.processEvents()


def test_ui_loads_and_has_every_widget_the_code_uses(loaded_ui):
    """No AttributeError in Slicer: each self.ui.<name> is an object in the loaded .ui."""
    from PySide6.QtCore import QObject

    used = ui_names_used_by_code()
    assert {"applyButton", "cancelButton", "inputVolumeSelector", "modelCardLabel"} <= used
    missing = sorted(n for n in used if loaded_ui.findChild(QObject, n) is None)
    assert not missing, f"CLAM.py uses widgets missing from CLAM.ui: {missing}"


def test_every_slicer_parameter_name_is_a_parameter_node_field(loaded_ui):
    """Dynamic properties read back from the loaded widgets name real fields."""
    from PySide6.QtWidgets import QWidget

    fields = parameter_fields()
    bound = {w.objectName(): w.property("SlicerParameterName") for w in loaded_ui.findChildren(QWidget)
             if w.property("SlicerParameterName")}
    assert bound == {name: p for name, (_, p) in xml_parameter_bindings().items()}
    unknown = sorted(p for p in bound.values() if p not in fields)
    assert not unknown, f"SlicerParameterName without a CLAMParameterNode field: {unknown}"
    assert len(set(bound.values())) == len(bound), "two widgets bound to one parameter"
    # all settings are bound except the shown cluster, whose combo is filled per result by the widget
    assert set(fields) - set(bound.values()) == {"shownCluster"}


def test_bound_widget_classes_fit_the_field_types():
    """Slicer's GUI connectors match on the exact widget class, so each binding must be connectable."""
    fields = parameter_fields()
    for name, (cls, parameter) in xml_parameter_bindings().items():
        kind = field_kind(fields[parameter])
        assert cls in CONNECTABLE[kind], f"{name} ({cls}) cannot bind a {kind} parameter '{parameter}'"
        if cls in ("ctkSliderWidget", "QSlider"):
            assert "WithinRange" in ast.unparse(fields[parameter].annotation), f"{parameter} needs a range"


def test_choices_match_what_the_code_and_engine_accept():
    """Combo choices and defaults agree with CLAM.py's method map and CLAMMRML's colour maps."""
    import sys

    sys.path.insert(0, str(MODULE_DIR))
    fields = parameter_fields()
    for statement in fields.values():
        if field_kind(statement) == "Choice":
            assert ast.literal_eval(statement.value) in choices(statement), statement.target.id
    assert choices(fields["device"]) == ["auto", "CPU", "GPU"]
    assert choices(fields["clusters"]) == ["all", "assigned"]
    methods = next(ast.literal_eval(n.value) for n in _tree().body
                   if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "METHODS")
    assert list(methods) == choices(fields["method"]) and set(methods.values()) == {"default", "clam"}
    try:
        import CLAMMRML
    except ImportError:  # slicer-core absent: compare with the literal names
        names = {"inferno", "viridis", "magma", "plasma"}
    else:
        names = set(CLAMMRML.COLORMAPS)
    assert set(choices(fields["colormap"])) == names


def test_module_metadata_and_console_example():
    """Title, category, contributors, help with a 5-line console example, acknowledgement citing the paper."""
    source = CLAM_PY.read_text(encoding="utf-8")
    example = next(ast.literal_eval(n.value) for n in _tree().body
                   if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "CONSOLE_EXAMPLE")
    assert len(example.strip().splitlines()) == 5 and "CLAMLogic().process(" in example
    compile(example, "console-example", "exec")
    for needle in ('self.parent.title = _("CLAM")',
                   'self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]',
                   '"CLAM team"', "example=CONSOLE_EXAMPLE", "J. Med. Imaging 9(2):026001", "10.1117/1.JMI.9.2.026001"):
        assert needle in source, needle
    classes = {n.name for n in _tree().body if isinstance(n, ast.ClassDef)}
    assert {"CLAM", "CLAMParameterNode", "CLAMWidget", "CLAMLogic", "CLAMTest"} <= classes


def test_no_install_at_import():
    """pip_install / installTorch are called only inside functions (first Apply), never at module level."""
    tree = _tree()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            continue
        text = ast.unparse(node)
        assert "pip_install" not in text and "installTorch" not in text
    source = CLAM_PY.read_text(encoding="utf-8")
    assert 'torchVersionRequirement=TORCH_REQUIREMENT' in source and 'askConfirmation=askConfirmation' in source
