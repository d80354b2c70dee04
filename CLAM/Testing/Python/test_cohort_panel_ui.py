"""CLAMCohort.ui against CLAMCohortPanel.py: every widget the panel code names exists, with the class it expects."""

from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest

MODULE_DIR = Path(__file__).resolve().parents[2]
UI_FILE = MODULE_DIR / "Resources" / "UI" / "CLAMCohort.ui"
PANEL_PY = MODULE_DIR / "CLAMCohortPanel.py"


def ui_names_used_by_panel() -> set[str]:
    """Every `self.ui.<name>` that CLAMCohortPanel.py touches."""
    names = set()
    for node in ast.walk(ast.parse(PANEL_PY.read_text(encoding="utf-8"))):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.add(node.attr)
    return names


def test_cohort_ui_has_every_widget_the_panel_uses() -> None:
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QtCore = pytest.importorskip("PySide6.QtCore", reason="PySide6-Essentials is needed to load the .ui")
    from PySide6.QtUiTools import QUiLoader
    from PySide6.QtWidgets import QApplication, QTableWidget, QWidget

    app = QApplication.instance() or QApplication([])
    file = QtCore.QFile(str(UI_FILE))
    assert file.open(QtCore.QFile.OpenModeFlag.ReadOnly)
    loader = QUiLoader()
    widget = loader.load(file)
    file.close()
    assert widget is not None, loader.errorString()
    used = ui_names_used_by_panel()
    assert {"cohortTableWidget", "nextScanButton", "previousScanButton", "associateButton", "mapButton"} <= used
    missing = sorted(n for n in used if widget.findChild(QtCore.QObject, n) is None)
    assert not missing, f"CLAMCohortPanel.py uses widgets missing from CLAMCohort.ui: {missing}"
    for name in ("cohortTableWidget", "associationTableWidget"):
        assert isinstance(widget.findChild(QWidget, name), QTableWidget)
    assert widget.findChild(QWidget, "uncertainSpinBox").value() == pytest.approx(0.6)
    assert [widget.findChild(QWidget, "statusFilterComboBox").itemText(i) for i in range(3)] == [
        "any status", "ok", "failed"]
    widget.deleteLater()
    app.processEvents()
