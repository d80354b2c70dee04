"""The cohort browser (CLAMCohort, CLAMLib.cohort_table) against Slicer's real MRML from the `slicer-core` wheel:
loading, switching and unloading scans, filters, sorting, next / previous, views centred on the map's maximum."""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import slicer
    import slicer.util

    if not hasattr(slicer, "vtkMRMLScene"):
        raise ImportError("this `slicer` package has no vtkMRMLScene (is it the unrelated PyPI `slicer`?)")
except ImportError as error:  # pragma: no cover - depends on the environment
    pytest.skip(f"needs Slicer's MRML from the `slicer-core` wheel (pip install slicer-core): {error}",
                allow_module_level=True)

import SimpleITK as sitk
import vtk
from vtk.util import numpy_support

sys.path.insert(0, str(Path(__file__).resolve().parent))
import CLAMCohort
import CLAMMRML
import render_screenshot as rs
from CLAMLib.cohort_table import CohortTable, step
from CLAMLib.errors import InputError
from test_slicer_mrml import (
    _import_clam_module_with_stubs,
    _wait,
    tiny_bundle,  # noqa: F401 (the fixture, shared with the MRML tests)
)

N_SCANS = 6
CLUSTERS = [0, 1, 0, 1, 1, 0]
Q0 = [0.9, 0.2, 0.55, 0.45, 0.1, 0.7]  # scans 2 and 3 are uncertain (highest q below 0.6)
CHEST_SPACING = (3.0, 3.0, 8.0)  # mm: the phantom's lungs measure about 2.8 L


def ct_image(seed: int, spacing: tuple[float, float, float] | None = None) -> sitk.Image:
    """The phantom CT (oblique, anisotropic geometry) as a SimpleITK image in LPS, with a little noise."""
    array = rs.phantom_ct() + np.random.default_rng(seed).integers(-5, 5, rs.SHAPE_KJI).astype(np.int16)
    matrix = rs.oblique_ijk_to_ras() if spacing is None else rs.oblique_ijk_to_ras(spacing=spacing)
    spacing = np.linalg.norm(matrix[:3, :3], axis=0)
    lps = np.diag([-1.0, -1.0, 1.0])
    image = sitk.GetImageFromArray(array.astype(np.int16))
    image.SetSpacing([float(s) for s in spacing])
    image.SetDirection([float(v) for v in (lps @ (matrix[:3, :3] / spacing)).ravel()])
    image.SetOrigin([float(v) for v in lps @ matrix[:3, 3]])
    return image


def peak_ijk(scan: int, cluster: int) -> tuple[int, int, int]:
    """Where the map of a scan and cluster is highest (I, J, K), different for each."""
    return (20 + 6 * scan + 3 * cluster, 20 + 4 * cluster, 8 + 3 * scan)


@pytest.fixture(scope="module")
def cohort_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A `clam map` output folder of six phantom scans (k = 2), one failed scan, averages and a clinical CSV."""
    root = tmp_path_factory.mktemp("cohort")
    out = root / "maps"
    ids = [f"scan{i}" for i in range(N_SCANS)]
    for n, scan_id in enumerate(ids):
        image = ct_image(n)
        source = root / "scans" / f"{scan_id}.nrrd"
        source.parent.mkdir(parents=True, exist_ok=True)
        sitk.WriteImage(image, str(source))
        folder = out / "scans" / scan_id
        folder.mkdir(parents=True)
        i, j, k = np.meshgrid(*[np.arange(s, dtype=np.float32) for s in image.GetSize()], indexing="ij")
        for c in (0, 1):
            pi, pj, pk = peak_ijk(n, c)
            blob = np.exp(-((i - pi) ** 2 + (j - pj) ** 2 + ((k - pk) * 3) ** 2) / 30).transpose(2, 1, 0)
            m = sitk.GetImageFromArray(blob.astype(np.float32))
            m.CopyInformation(image)
            sitk.WriteImage(m, str(folder / f"map_cluster{c}.nrrd"))
        (folder / "qc.png").write_bytes(b"\x89PNG\r\n\x1a\n")
        (folder / "result.json").write_text(json.dumps({"id": scan_id, "status": "ok", "cluster": CLUSTERS[n],
                                                        "source": str(source)}))
    with open(out / "assignments.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "cluster", "q0", "q1", "lung_volume_l", "status", "reason"])
        for n, scan_id in enumerate(ids):
            w.writerow([scan_id, CLUSTERS[n], Q0[n], round(1 - Q0[n], 6), 3.0 + 0.5 * n, "ok", ""])
        w.writerow(["broken", "", "", "", "", "failed", "cannot read image"])
    (out / "clusters").mkdir()
    for c in (0, 1):
        average = np.zeros((16, 16, 16), np.float32)
        average[4 + 6 * c, 8, 8] = 1.0
        sitk.WriteImage(sitk.GetImageFromArray(average), str(out / "clusters" / f"average_cluster{c}.nrrd"))
    sitk.WriteImage(sitk.GetImageFromArray(np.full((16, 16, 16), 0.3, np.float32)),
                    str(out / "clusters" / "cohort_mean.nrrd"))
    (root / "clinical.csv").write_text("Patient;FVC;smoker\n" + "".join(
        f"{scan_id};{90 - 7 * n};{'yes' if n % 2 else 'no'}\n" for n, scan_id in enumerate(ids[:5])))
    return out


@pytest.fixture
def viewer():
    """A fresh headless scene with three slice views whose logics the application logic knows (for fitting)."""
    v = rs.make_viewer()
    logics = vtk.vtkCollection()
    for logic in v.sliceLogics.values():
        logics.AddItem(logic)
    v.appLogic.SetSliceLogics(logics)
    yield v
    v.close()


def slice_centres(scene) -> list[np.ndarray]:
    """The RAS point at the centre of every slice view."""
    centres = []
    for n in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceNode")):
        matrix = scene.GetNthNodeByClass(n, "vtkMRMLSliceNode").GetSliceToRAS()
        centres.append(np.array([matrix.GetElement(r, 3) for r in range(3)]))
    return centres


def rendered_red_view(viewer, ras_point) -> tuple[np.ndarray, np.ndarray]:
    """RGBA of the red view as it is (rows top to bottom), and where a RAS point lies in it (x, y)."""
    logic = viewer.sliceLogics["Red"]
    blend = logic.GetBlend()
    blend.Update()
    output = blend.GetOutput()
    nx, ny, _ = output.GetDimensions()
    rgba = numpy_support.vtk_to_numpy(output.GetPointData().GetScalars()).reshape(ny, nx, -1)
    rasToXy = vtk.vtkMatrix4x4()
    vtk.vtkMatrix4x4.Invert(logic.GetSliceNode().GetXYToRAS(), rasToXy)
    x, y, z, _ = rasToXy.MultiplyPoint([*map(float, ras_point), 1.0])
    assert abs(z) < 0.5  # the point lies in the view's slice
    return rgba[::-1].copy(), np.array([x, ny - 1 - y])


def test_table_filters_sorts_and_joins_clinical_columns(cohort_folder: Path) -> None:
    table = CohortTable.read(cohort_folder, cohort_folder.parent / "clinical.csv", "Patient")
    assert table.k == 2 and [r.id for r in table.rows] == [*[f"scan{i}" for i in range(N_SCANS)], "broken"]
    assert table.columns() == ["id", "cluster", "q0", "q1", "q max", "lung volume (L)", "status", "reason", "FVC",
                               "smoker"]
    assert [r.id for r in table.filtered(cluster=1)] == ["scan1", "scan3", "scan4"]
    assert [r.id for r in table.filtered(status="failed")] == ["broken"]
    assert [r.id for r in table.filtered(uncertain_below=0.6)] == ["scan2", "scan3"]
    assert [r.id for r in table.filtered(cluster=0, uncertain_below=0.6)] == ["scan2"]
    by_fvc = table.sorted(table.rows, "FVC")
    assert [r.id for r in by_fvc] == ["scan4", "scan3", "scan2", "scan1", "scan0", "scan5", "broken"]  # empty last
    assert [r.id for r in table.sorted(table.rows, "q0", descending=True)][:2] == ["scan0", "scan5"]
    assert table.text(table.row("scan1"), "smoker") == "yes" and table.text(table.row("scan5"), "FVC") == ""
    assert table.text(table.row("scan2"), "lung volume (L)") == "4.00" and table.row("broken").source == ""
    assert table.row("scan0").source.endswith("scan0.nrrd") and table.qc_path("scan0").is_file()
    assert table.mapped_clusters("scan0") == [0, 1] and table.mapped_clusters("broken") == []
    assert step(["a", "b", "c"], "c", 1) == "a" and step(["a", "b", "c"], "a", -1) == "c"
    assert step(["a", "b"], "x", 1) == "a" and step([], "a", 1) is None


def test_show_scan_loads_ct_and_map_and_centres_views_on_the_maximum(cohort_folder: Path, viewer) -> None:
    browser = CLAMCohort.CohortBrowser(viewer.scene, viewer.appLogic)
    browser.open(cohort_folder)
    shown = browser.showScan("scan2")
    source = sitk.ReadImage(str(cohort_folder.parent / "scans" / "scan2.nrrd"))
    assert np.array_equal(slicer.util.arrayFromVolume(shown.ctNode), sitk.GetArrayFromImage(source))
    assert shown.cluster == 0  # its own cluster
    np.testing.assert_allclose(CLAMMRML.ijk_to_ras_array(shown.mapNode), CLAMMRML.ijk_to_ras_array(shown.ctNode))
    np.testing.assert_allclose(CLAMMRML.ijk_to_ras_array(shown.ctNode), rs.oblique_ijk_to_ras(), atol=1e-5)
    peak = rs.ijk_to_ras_point(shown.ctNode, peak_ijk(2, 0))
    np.testing.assert_allclose(shown.centre, peak, atol=1e-4)
    for centre in slice_centres(viewer.scene):
        np.testing.assert_allclose(centre, peak, atol=1e-3)
    for composite in CLAMMRML.slice_composite_nodes(viewer.scene):
        assert composite.GetBackgroundVolumeID() == shown.ctNode.GetID()
        assert composite.GetForegroundVolumeID() == shown.mapNode.GetID()
    rgba, xy = rendered_red_view(viewer, peak)
    overlay = rs.overlay_mask(rgba)
    x, y = np.round(xy).astype(int)
    assert overlay[y - 2:y + 3, x - 2:x + 3].all()  # the map's colour is at the maximum in the rendered view
    ct_id = shown.ctNode.GetID()
    other = browser.showCluster(1)
    assert other.ctNode.GetID() == ct_id and other.cluster == 1
    np.testing.assert_allclose(other.centre, rs.ijk_to_ras_point(other.ctNode, peak_ijk(2, 1)), atol=1e-4)
    assert viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    assert browser.qcPicture() == cohort_folder / "scans" / "scan2" / "qc.png"


def test_fifty_switches_keep_the_node_count_and_walk_the_filtered_list(cohort_folder: Path, viewer) -> None:
    browser = CLAMCohort.CohortBrowser(viewer.scene)
    browser.open(cohort_folder)
    assert browser.setFilter(status="ok", sortColumn="lung volume (L)", descending=True) == [
        f"scan{i}" for i in reversed(range(N_SCANS))]
    first = browser.next()
    assert first.id == "scan5"
    counts = viewer.scene.GetNumberOfNodes()
    seen, previous_ct = [first.id], first.ctNode
    for _ in range(50):
        shown = browser.next()
        seen.append(shown.id)
        assert previous_ct.GetScene() is None  # the previous scan's CT left the scene
        assert viewer.scene.GetNumberOfNodes() == counts
        previous_ct = shown.ctNode
    assert seen[:7] == ["scan5", "scan4", "scan3", "scan2", "scan1", "scan0", "scan5"]
    assert browser.previous().id == step(browser.order, seen[-1], -1)
    assert browser.setFilter(cluster=1, uncertainBelow=0.6) == ["scan3"]
    assert browser.next().id == "scan3" and browser.next().id == "scan3"
    average = browser.showAverage(1)
    assert average.row is None and viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2
    np.testing.assert_allclose(average.centre, rs.ijk_to_ras_point(average.mapNode, (8, 8, 10)), atol=1e-4)
    assert slicer.util.arrayFromVolume(average.ctNode).mean() == pytest.approx(0.3)
    browser.unload()
    assert viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_scan_without_a_recorded_source_or_cohort_gives_a_clear_error(cohort_folder: Path, viewer) -> None:
    browser = CLAMCohort.CohortBrowser(viewer.scene)
    with pytest.raises(InputError, match="no cohort is open"):
        browser.showScan("scan0")
    browser.open(cohort_folder)
    with pytest.raises(InputError, match="does not record where"):
        browser.showScan("broken")
    with pytest.raises(InputError, match="no map of cluster 5"):
        browser.showScan("scan0", cluster=5)
    with pytest.raises(KeyError, match="nobody"):
        browser.showScan("nobody")
    assert viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 0


def test_map_command_line() -> None:
    command = CLAMCohort.map_command("models/m", ["a.nrrd", "dicom/"], "out", python="python3")
    assert command == ["python3", "-m", "CLAMLib.cli", "map", "models/m", "a.nrrd", "dicom/", "--out", "out",
                       "--progress-json"]


def test_console_workflow_maps_in_the_background_then_browses(viewer, tiny_bundle, tmp_path,  # noqa: F811
                                                              monkeypatch) -> None:
    """CLAMLogic: `clam map` in the background with progress, openCohort, showScan, nextScan, associate, averages."""
    clam = _import_clam_module_with_stubs(monkeypatch)
    for n in range(3):
        (tmp_path / "scans").mkdir(exist_ok=True)
        # voxels of a whole chest (lungs of about 2.8 L): clam map refuses lungs outside 0.5-12 L
        sitk.WriteImage(ct_image(n, CHEST_SPACING), str(tmp_path / "scans" / f"scan{n}.nrrd"))
    logic = clam.CLAMLogic()
    process = logic.startMapping(tiny_bundle, [str(tmp_path / "scans")], tmp_path / "maps", device="CPU")
    lines, code = _wait(process, lambda lines, code: code is not None, timeout=300)
    assert code == 0, "\n".join(lines[-30:])
    assert process.progress == pytest.approx(1.0) and any(line.startswith("[mapping] scan2") for line in lines)
    table = logic.openCohort(tmp_path / "maps")
    assert [row.id for row in table.rows] == ["scan0", "scan1", "scan2"]
    shown = logic.showScan("scan0")
    assert np.array_equal(slicer.util.arrayFromVolume(shown.ctNode),
                          sitk.GetArrayFromImage(ct_image(0, CHEST_SPACING)))
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "maps" / "scans" / "scan0" /
                                                       f"map_cluster{shown.cluster}.nrrd")))
    k, j, i = np.unravel_index(int(np.argmax(values)), values.shape)
    np.testing.assert_allclose(shown.centre, rs.ijk_to_ras_point(shown.ctNode, (i, j, k)), atol=1e-4)
    assert shown.cluster == table.row("scan0").cluster
    assert logic.nextScan().id == "scan1" and logic.nextScan(-1).id == "scan0"
    result = logic.associateCohort()
    assert (tmp_path / "maps" / "association.md").is_file() and result.n_scans == 3
    average = logic.showClusterAverage(shown.cluster)
    assert average.ctNode.GetName() == "CLAM cohort mean"  # `clam map` wrote the model's mean image
    assert viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2


def test_walkthrough_trains_maps_associates_and_browses(tmp_path) -> None:
    """`make cohort`'s script end to end, small: every output of the four steps and the browser's picture."""
    import cohort_walkthrough

    out = tmp_path / "walk"
    assert cohort_walkthrough.main(["--out", str(out), "--subjects", "4", "--grid", "16", "--epochs", "3"]) == 0
    assert (out / "model" / "model.json").is_file() and (out / "maps" / "assignments.csv").is_file()
    data = json.loads((out / "maps" / "association.json").read_text())
    assert {"FVC", "nodule score", "age"} <= {c["name"] for c in data["columns"]}
    assert data["ids"]["in_table_not_mapped"] == [] and data["ids"]["mapped_not_in_table"] == []
    assert (out / "browser.png").stat().st_size > 20000


def test_overlays_read_as_the_engine_reads_them(tmp_path) -> None:
    """uint8 maps written by `clam map` (NRRD with the scale key, NIfTI with scl_slope) come back as 0..1."""
    from CLAMLib.overlay import SCALE_KEY, quantise, read_map, write_map

    assert CLAMCohort.MAP_SCALE_KEY == SCALE_KEY
    values = np.random.default_rng(0).random((6, 7, 8)).astype(np.float32)
    image = sitk.GetImageFromArray(quantise(values))
    image.SetSpacing((0.7, 0.8, 2.5))
    for name in ("map.nrrd", "map.nii.gz"):
        write_map(image, tmp_path / name)
        ours, engine = CLAMCohort.read_overlay(tmp_path / name), read_map(tmp_path / name)
        assert ours.GetPixelID() == sitk.sitkFloat32
        np.testing.assert_allclose(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(engine), atol=1e-6)
        np.testing.assert_allclose(sitk.GetArrayFromImage(ours), values, atol=0.5 / 255 + 1e-6)
