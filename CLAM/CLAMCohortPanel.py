"""The Cohort section of the CLAM panel (Resources/UI/CLAMCohort.ui): thin, everything goes through CLAMLogic."""

from __future__ import annotations

import json
import pathlib
from typing import Any, Callable

import CLAMMRML
import qt
import slicer

NEXT_KEY, PREVIOUS_KEY = "Alt+Down", "Alt+Up"


class CohortPanel:
    """Map a folder in the background, open a `clam map` folder, walk its scans, show averages, run associate."""

    def __init__(self, uiPath: str, logic: Any, parameters: Callable[[], Any]) -> None:
        """Load the section's .ui; parameters() gives the panel's parameter node (model bundle and device to map)."""
        self.widget = slicer.util.loadUI(uiPath)
        self.widget.setMRMLScene(slicer.mrmlScene)
        self.ui = slicer.util.childWidgetVariables(self.widget)
        self.logic, self.parameters = logic, parameters
        self._mapping: CLAMMRML.BackgroundProcess | None = None
        self._timer = qt.QTimer()
        self._timer.setInterval(500)
        self._timer.connect("timeout()", self.pollMapping)
        self._shortcuts: list = []
        self._sort: tuple[str | None, bool] = (None, False)
        self._filling = False
        self._plots: list[pathlib.Path | None] = []
        self.ui.mapButton.connect("clicked(bool)", self.onMap)
        self.ui.mapCancelButton.connect("clicked(bool)", self.onMapCancel)
        self.ui.mapCancelButton.enabled = False
        self.ui.openCohortButton.connect("clicked(bool)", self.onOpen)
        self.ui.cohortReportButton.connect("clicked(bool)", self.onReport)
        for combo in (self.ui.clusterFilterComboBox, self.ui.statusFilterComboBox):
            combo.connect("currentIndexChanged(int)", self.refreshTable)
        self.ui.uncertainCheckBox.connect("toggled(bool)", self.refreshTable)
        self.ui.uncertainSpinBox.connect("valueChanged(double)", self.refreshTable)
        self.ui.cohortTableWidget.connect("itemSelectionChanged()", self.onRowSelected)
        self.ui.cohortTableWidget.horizontalHeader().connect("sectionClicked(int)", self.onSort)
        self.ui.nextScanButton.connect("clicked(bool)", lambda: self.onStep(1))
        self.ui.previousScanButton.connect("clicked(bool)", lambda: self.onStep(-1))
        self.ui.cohortClusterComboBox.connect("activated(int)", self.onCluster)
        self.ui.qcButton.connect("clicked(bool)", self.onQC)
        self.ui.showAverageButton.connect("clicked(bool)", self.onAverage)
        self.ui.associateButton.connect("clicked(bool)", self.onAssociate)
        self.ui.associationTableWidget.connect("itemSelectionChanged()", self.onAssociationRow)

    def enter(self) -> None:
        """Install the next / previous keyboard shortcuts while the module is shown."""
        window = slicer.util.mainWindow()
        if window is None or self._shortcuts:
            return
        for key, offset in ((NEXT_KEY, 1), (PREVIOUS_KEY, -1)):
            shortcut = qt.QShortcut(qt.QKeySequence(key), window)
            shortcut.connect("activated()", lambda offset=offset: self.onStep(offset))
            self._shortcuts.append(shortcut)

    def exit(self) -> None:
        """Remove the keyboard shortcuts."""
        for shortcut in self._shortcuts:
            shortcut.setEnabled(False)
            shortcut.deleteLater()
        self._shortcuts = []

    def cleanup(self) -> None:
        """Stop a mapping in progress and the shortcuts."""
        self.onMapCancel()
        self.exit()

    # mapping in the background

    def onMap(self) -> None:
        """Start `clam map` of the chosen folder (or the checked scene volumes) into the cohort folder."""
        try:
            with slicer.util.tryWithErrorDisplay("CLAM cannot map yet."):  # may ask to install: no wait cursor
                self.logic.ensureDependencies(askConfirmation=True)
        except Exception:  # shown to the user by tryWithErrorDisplay
            return
        with slicer.util.tryWithErrorDisplay("Could not start mapping.", waitCursor=True):
            scans = self.ui.mapFolderPathLineEdit.currentPath
            out = self.ui.cohortFolderPathLineEdit.currentPath
            if not out:
                raise ValueError("Choose the cohort folder to write the maps into.")
            if scans:
                if not pathlib.Path(scans).is_dir():
                    raise ValueError(f"{scans} is not a folder of scans.")
                inputs = [scans]
            else:
                nodes = list(self.ui.mapVolumesSelector.checkedNodes())
                if not nodes:
                    raise ValueError("Choose a folder of scans, or check the scene volumes to map.")
                # kept beside the maps: the browser loads each scan from where it was mapped
                inputs = CLAMMRML.export_volumes(nodes, pathlib.Path(out) / "scene-volumes")
            p = self.parameters()
            self._mapping = self.logic.startMapping(p.modelPath, inputs, out, device=p.device)
            self.ui.mapProgressBar.value = 0
            self.ui.mapButton.enabled, self.ui.mapCancelButton.enabled = False, True
            self.ui.cohortStatusLabel.text = "Mapping in the background..."
            self._timer.start()

    def pollMapping(self) -> None:
        """Progress of the mapping; open the cohort when it ends."""
        if self._mapping is None:
            return
        lines, code = self._mapping.poll()
        self.ui.mapProgressBar.value = round(100 * self._mapping.progress)
        if lines:
            self.ui.cohortStatusLabel.text = lines[-1]
        if code is not None:
            self._finishMapping(code)

    def onMapCancel(self) -> None:
        """Kill the mapping process tree."""
        if self._mapping is not None:
            self._mapping.cancel()
            self._finishMapping(None)

    def _finishMapping(self, code: int | None) -> None:
        """Report how the mapping ended and open the cohort folder."""
        self._timer.stop()
        self._mapping = None
        self.ui.mapButton.enabled, self.ui.mapCancelButton.enabled = True, False
        if code is None:
            self.ui.cohortStatusLabel.text = "Mapping cancelled; finished scans are kept."
            return
        self.ui.cohortStatusLabel.text = {0: "Mapping done.", 3: "Mapping done; some scans failed (see status)."}.get(
            code, f"Mapping failed (exit code {code}).")
        if code in (0, 3):
            self.onOpen()

    # the table

    def onOpen(self) -> None:
        """Open the cohort folder (with the clinical CSV, if given) and fill the table."""
        with slicer.util.tryWithErrorDisplay("Could not open the cohort.", waitCursor=True):
            clinical = self.ui.clinicalPathLineEdit.currentPath or None
            table = self.logic.openCohort(self.ui.cohortFolderPathLineEdit.currentPath, clinical,
                                          self.ui.idColumnLineEdit.text or "id")
            self._filling = True
            for combo, names in ((self.ui.clusterFilterComboBox, ["all clusters"]),
                                 (self.ui.averageClusterComboBox, []), (self.ui.cohortClusterComboBox, [])):
                combo.clear()
                for name in [*names, *[f"cluster {c}" for c in range(table.k)]]:
                    combo.addItem(name)
            self._filling = False
            self.refreshTable()
            self.ui.cohortStatusLabel.text = f"{len(table.rows)} scans, k = {table.k}."

    def onReport(self) -> None:
        """Write (or refresh) the folder's cohort report and open it in the system browser."""
        with slicer.util.tryWithErrorDisplay("Could not write the cohort report.", waitCursor=True):
            index = self.logic.openCohortReport(self.ui.cohortFolderPathLineEdit.currentPath)
            self.ui.cohortStatusLabel.text = f"Cohort report: {index}"

    def refreshTable(self, *args: Any) -> None:
        """Apply the filters and sorting, and show the list."""
        browser = self.logic.cohort
        if self._filling or browser.table is None:
            return
        cluster = self.ui.clusterFilterComboBox.currentIndex - 1
        status = self.ui.statusFilterComboBox.currentText if self.ui.statusFilterComboBox.currentIndex else None
        uncertain = self.ui.uncertainSpinBox.value if self.ui.uncertainCheckBox.checked else None
        column, descending = self._sort
        browser.setFilter(cluster if cluster >= 0 else None, status, uncertain, column, descending)
        table, widget = browser.table, self.ui.cohortTableWidget
        columns = table.columns()
        self._filling = True
        widget.clear()
        widget.setColumnCount(len(columns))
        widget.setHorizontalHeaderLabels(columns)
        rows = browser.rows()
        widget.setRowCount(len(rows))
        for r, row in enumerate(rows):
            for c, name in enumerate(columns):
                widget.setItem(r, c, qt.QTableWidgetItem(table.text(row, name)))
        self._filling = False

    def onSort(self, section: int) -> None:
        """Sort by the clicked column (again: the other way round)."""
        table = self.logic.cohort.table
        if table is None:
            return
        column = table.columns()[section]
        self._sort = (column, not self._sort[1] if self._sort[0] == column else False)
        self.refreshTable()

    def onRowSelected(self) -> None:
        """Load the selected row's scan."""
        if self._filling:
            return
        row = self.ui.cohortTableWidget.currentRow()
        order = self.logic.cohort.order
        if 0 <= row < len(order):
            self._show(lambda: self.logic.showScan(order[row]))

    def onStep(self, offset: int) -> None:
        """Next or previous scan of the list."""
        self._show(lambda: self.logic.nextScan(offset))

    def onCluster(self, index: int) -> None:
        """Show another cluster's map over the scan shown."""
        self._show(lambda: self.logic.cohort.showCluster(index))

    def _show(self, action: Any) -> None:
        """Run a browser action, then select the shown scan's row and report it."""
        with slicer.util.tryWithErrorDisplay("Could not show the scan.", waitCursor=True):
            shown = action()
            if shown is None or shown.row is None:
                return
            order = self.logic.cohort.order
            self._filling = True
            if shown.id in order:
                self.ui.cohortTableWidget.selectRow(order.index(shown.id))
            self._filling = False
            if shown.cluster is not None:
                self.ui.cohortClusterComboBox.setCurrentIndex(shown.cluster)
            q = ", ".join(f"{v:.2f}" for v in shown.row.q)
            self.ui.cohortStatusLabel.text = (f"{shown.id}: cluster {shown.row.cluster}, q = [{q}]; map of cluster "
                                              f"{shown.cluster} shown, views centred on its maximum.")

    def onQC(self) -> None:
        """Open the lung-mask QC picture of the scan shown."""
        path = self.logic.cohort.qcPicture()
        if path is None:
            self.ui.cohortStatusLabel.text = "No QC picture for this scan (mapped with --no-qc?)."
            return
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(path)))

    def onAverage(self) -> None:
        """Show the chosen cluster's average map over the cohort mean image."""
        with slicer.util.tryWithErrorDisplay("Could not show the average.", waitCursor=True):
            cluster = self.ui.averageClusterComboBox.currentIndex
            self.logic.showClusterAverage(cluster)
            self.ui.cohortStatusLabel.text = f"Average map of cluster {cluster} (model grid) over the cohort mean."

    # associate

    def onAssociate(self) -> None:
        """Run `clam associate` on the cohort and show its table; plots on row selection."""
        with slicer.util.tryWithErrorDisplay("clam associate failed.", waitCursor=True):
            clinical = self.ui.clinicalPathLineEdit.currentPath or None
            result = self.logic.associateCohort(clinical, self.ui.idColumnLineEdit.text or "id")
            data = json.loads((self.logic.cohort.table.folder / "association.json").read_text(encoding="utf-8"))
            widget = self.ui.associationTableWidget
            names = ["column", "source", "test", "adjusted p", "effect", "n", "missing"]
            widget.clear()
            widget.setColumnCount(len(names))
            widget.setHorizontalHeaderLabels(names)
            widget.setRowCount(len(data["columns"]))
            self._plots = []
            for r, column in enumerate(data["columns"]):
                cells = [column["name"], column["source"], column["test"], f"{column['p_adjusted']:.3g}",
                         f"{column['effect_name']} {column['effect']:.2f}", str(column["n"]), str(column["missing"])]
                for c, text in enumerate(cells):
                    widget.setItem(r, c, qt.QTableWidgetItem(text))
                self._plots.append(self.logic.cohort.table.folder / column["plot"] if column["plot"] else None)
            self.ui.cohortStatusLabel.text = (result.warning or f"{len(data['columns'])} columns tested; p-values "
                                              f"adjusted: {data['adjustment']}.")

    def onAssociationRow(self) -> None:
        """Show the plot of the selected association row."""
        row = self.ui.associationTableWidget.currentRow()
        if 0 <= row < len(self._plots) and self._plots[row] is not None:
            pixmap = qt.QPixmap(str(self._plots[row]))
            self.ui.associationPlotLabel.setPixmap(pixmap.scaledToWidth(max(200, self.widget.width - 20)))
