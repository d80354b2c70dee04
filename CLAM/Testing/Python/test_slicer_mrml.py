"""The MRML layer (CLAMMRML) against Slicer's real MRML library from the `slicer-core` wheel."""

from __future__ import annotations

import hashlib
import os
import sys
import textwrap
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
    pytest.skip(f"needs Slicer's MRML from the `slicer-core` wheel (pip install slicer-core): {error}",
                allow_module_level=True)

import SimpleITK as sitk
import vtk

sys.path.insert(0, str(Path(__file__).resolve().parent))
import CLAMMRML
import render_screenshot as rs


@pytest.fixture
def viewer():
    """A fresh headless scene with three slice views, closed after the test."""
    v = rs.make_viewer()
    yield v
    v.close()


@pytest.fixture
def ct(viewer):
    """The phantom CT with an oblique, anisotropic IJK-to-RAS matrix."""
    return rs.add_ct(viewer.scene)


def fingerprint(node) -> dict:
    """Everything about the input node that CLAM must leave alone."""
    display = node.GetDisplayNode()
    return {
        "voxels": hashlib.sha256(np.ascontiguousarray(slicer.util.arrayFromVolume(node)).tobytes()).hexdigest(),
        "ijkToRas": CLAMMRML.ijk_to_ras_array(node).tobytes(),
        "name": node.GetName(),
        "mtime": node.GetMTime(),
        "imageMTime": node.GetImageData().GetMTime(),
        "display": (display.GetID(), display.GetColorNodeID(), display.GetWindow(), display.GetLevel(),
                    display.GetApplyThreshold(), display.GetMTime()),
        "transform": node.GetTransformNodeID(),
        "attributes": tuple(node.GetAttributeNames() or ()),
    }


def counts(scene) -> dict:
    """Number of nodes per class that CLAM creates."""
    classes = ("vtkMRMLScalarVolumeNode", "vtkMRMLScalarVolumeDisplayNode", "vtkMRMLTableNode",
               "vtkMRMLColorTableNode")
    return {c: scene.GetNumberOfNodesByClass(c) for c in classes}


def run(ct, **kwargs):
    """CLAM outputs for an engine-like result with a blob at the phantom's lesion."""
    lesion = rs.ijk_to_ras_point(ct, rs.LESION_IJK)
    explanation = rs.engine_like_result(CLAMMRML.volume_to_image(ct), lesion, **kwargs)
    return CLAMMRML.apply_result(ct, explanation, opacity=0.6, threshold=0.2), lesion


def test_volume_to_image_matches_slicers_own_nrrd_writer(ct, tmp_path):
    """RAS->LPS and axis order agree with what Slicer's storage node writes and ITK reads back."""
    storage = slicer.vtkMRMLVolumeArchetypeStorageNode()
    ct.GetScene().AddNode(storage)
    path = tmp_path / "ct.nrrd"
    storage.SetFileName(str(path))
    assert storage.WriteData(ct)
    reference = sitk.ReadImage(str(path))
    image = CLAMMRML.volume_to_image(ct)
    assert image.GetSize() == reference.GetSize() == tuple(reversed(rs.SHAPE_KJI))
    np.testing.assert_allclose(image.GetSpacing(), reference.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(image.GetOrigin(), reference.GetOrigin(), atol=1e-5)
    np.testing.assert_allclose(image.GetDirection(), reference.GetDirection(), atol=1e-6)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(image), sitk.GetArrayFromImage(reference))
    assert image.GetPixelID() == sitk.sitkInt16  # no float64 copy of the CT


def test_volume_to_image_is_a_copy(ct):
    """Writing into the image never reaches the node."""
    before = fingerprint(ct)
    image = CLAMMRML.volume_to_image(ct)
    image[0, 0, 0] = 1234
    assert fingerprint(ct) == before


def test_image_to_volume_round_trip_and_update_in_place(ct, viewer):
    """Geometry and voxels survive node -> image -> node; node= updates that node."""
    image = CLAMMRML.volume_to_image(ct)
    copy = CLAMMRML.image_to_volume(image, "copy")
    np.testing.assert_allclose(CLAMMRML.ijk_to_ras_array(copy), CLAMMRML.ijk_to_ras_array(ct), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(ct))
    n = viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    again = CLAMMRML.image_to_volume(sitk.Cast(image, sitk.sitkFloat32) * 0.0, "renamed", node=copy)
    assert again is copy and copy.GetName() == "renamed"
    assert viewer.scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == n
    assert not slicer.util.arrayFromVolume(copy).any()


def test_image_to_volume_rejects_other_geometry(ct):
    """A map on another grid is refused rather than shown misplaced."""
    image = CLAMMRML.volume_to_image(ct)
    shifted = sitk.Image(image)
    shifted.SetOrigin([v + 5.0 for v in image.GetOrigin()])
    with pytest.raises(ValueError, match="geometry"):
        CLAMMRML.image_to_volume(shifted, "bad", reference=ct)
    with pytest.raises(ValueError, match="size"):
        CLAMMRML.image_to_volume(sitk.Image([4, 4, 4], sitk.sitkFloat32), "bad", reference=ct)


def test_overlays_have_exactly_the_inputs_geometry(ct):
    """Each overlay's IJK-to-RAS is the oblique, anisotropic input's, bit for bit."""
    result, _ = run(ct)
    assert sorted(result.mapNodes) == [0, 1, 2]
    for node in result.mapNodes.values():
        assert np.array_equal(CLAMMRML.ijk_to_ras_array(node), CLAMMRML.ijk_to_ras_array(ct))
        assert node.GetImageData().GetDimensions() == ct.GetImageData().GetDimensions()
        values = slicer.util.arrayFromVolume(node)
        assert values.dtype == np.float32 and 0.0 <= values.min() and values.max() <= 1.0


def test_map_is_highest_at_the_lesions_ras_point(ct):
    """The overlay node's brightest voxel lies at the RAS point the engine-like map marked."""
    result, lesion = run(ct)
    node = result.mapNodes[result.assignment]
    array = slicer.util.arrayFromVolume(node)
    k, j, i = np.unravel_index(np.argmax(array), array.shape)
    peak = rs.ijk_to_ras_point(node, (i, j, k))
    spacing = np.linalg.norm(CLAMMRML.ijk_to_ras_array(ct)[:3, :3], axis=0)
    assert np.linalg.norm(peak - lesion) <= np.linalg.norm(spacing) / 2 + 1e-6


def test_input_node_is_never_modified(ct):
    """Voxels, geometry, name, display and attributes of the input are as before, twice over."""
    before = fingerprint(ct)
    run(ct)
    run(ct, clusters=[1])
    assert fingerprint(ct) == before


def test_rerun_updates_in_place(ct, viewer):
    """A second run reuses the same nodes; clusters dropped from the run lose their stale map."""
    first, _ = run(ct)
    ids = {c: n.GetID() for c, n in first.mapNodes.items()}
    tableId = first.tableNode.GetID()
    n = counts(viewer.scene)
    second, _ = run(ct, assignment=2)
    assert {c: nd.GetID() for c, nd in second.mapNodes.items()} == ids
    assert second.tableNode.GetID() == tableId
    assert counts(viewer.scene) == n
    assert second.tableNode.GetTable().GetValueByName(2, "assigned") == "yes"
    third, _ = run(ct, clusters=[2], assignment=2)
    assert list(third.mapNodes) == [2] and third.mapNodes[2].GetID() == ids[2]
    assert viewer.scene.GetNodeByID(ids[0]) is None and viewer.scene.GetNodeByID(ids[1]) is None
    assert len(CLAMMRML.find_outputs(ct, CLAMMRML.ROLE_MAP)) == 1
    assert len(CLAMMRML.find_outputs(ct, CLAMMRML.ROLE_TABLE)) == 1


def test_two_inputs_keep_separate_outputs(ct, viewer):
    """Outputs belong to their input: mapping a second CT does not overwrite the first's."""
    first, _ = run(ct)
    other = rs.add_ct(viewer.scene, name="second CT")
    second, _ = run(other)
    assert not {n.GetID() for n in first.mapNodes.values()} & {n.GetID() for n in second.mapNodes.values()}
    assert len(CLAMMRML.find_outputs(ct, CLAMMRML.ROLE_MAP)) == 3


def test_display_colour_map_window_threshold_and_all_views(ct, viewer):
    """Perceptual colours, window/level 0..1, lower threshold, foreground over the CT in every view."""
    result, _ = run(ct)
    shown = result.mapNodes[result.assignment]
    display = shown.GetDisplayNode()
    colours = display.GetColorNode()
    assert colours.GetAttribute(CLAMMRML.COLORMAP_ATTRIBUTE) == "inferno"
    assert colours.GetNumberOfColors() == 256
    rgba = [0.0] * 4
    colours.GetColor(255, rgba)
    np.testing.assert_allclose(rgba[:3], CLAMMRML._hex_to_rgb("#fcffa4"), atol=1e-6)
    assert not display.GetAutoWindowLevel()
    assert display.GetWindowLevelMin() == pytest.approx(0.0) and display.GetWindowLevelMax() == pytest.approx(1.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.2)
    composites = CLAMMRML.slice_composite_nodes(viewer.scene)
    assert len(composites) == 3
    for composite in composites:
        assert composite.GetBackgroundVolumeID() == ct.GetID()
        assert composite.GetForegroundVolumeID() == shown.GetID()
        assert composite.GetForegroundOpacity() == pytest.approx(0.6)


def test_live_display_controls(ct, viewer):
    """set_display changes threshold, colour map and opacity without new nodes; one table per colour map."""
    result, _ = run(ct)
    n = counts(viewer.scene)
    CLAMMRML.set_display(result.mapNodes.values(), opacity=0.3, threshold=0.5, colormap="viridis")
    CLAMMRML.set_display(result.mapNodes.values(), opacity=0.3, threshold=0.5, colormap="viridis")
    for node in result.mapNodes.values():
        display = node.GetDisplayNode()
        assert display.GetLowerThreshold() == pytest.approx(0.5)
        assert display.GetColorNode().GetAttribute(CLAMMRML.COLORMAP_ATTRIBUTE) == "viridis"
    assert all(c.GetForegroundOpacity() == pytest.approx(0.3) for c in CLAMMRML.slice_composite_nodes())
    assert counts(viewer.scene)["vtkMRMLColorTableNode"] == n["vtkMRMLColorTableNode"] + 1
    with pytest.raises(ValueError, match="colour map"):
        CLAMMRML.colormap_node("jet")


def test_assignments_table(ct):
    """One row per cluster with its soft assignment; the assigned one is marked."""
    result, _ = run(ct)
    table = result.tableNode
    assert table.GetNumberOfRows() == 3
    q = [table.GetTable().GetValueByName(r, "q").ToDouble() for r in range(3)]
    np.testing.assert_allclose(q, result.probabilities)
    assert [table.GetTable().GetValueByName(r, "assigned").ToString() for r in range(3)] == ["", "yes", ""]
    assert table.GetAttribute("CLAM.Assignment") == "1"


def test_outputs_sit_beside_the_input_in_the_subject_hierarchy(ct, viewer):
    """Maps and table land under the input's parent item (here a patient folder)."""
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(viewer.scene)
    assert sh is not None, "slicer-core's scene has a subject hierarchy node"
    folder = sh.CreateFolderItem(sh.GetSceneItemID(), "Patient 1")
    sh.CreateItem(folder, ct)
    result, _ = run(ct)
    for node in [*result.mapNodes.values(), result.tableNode]:
        item = sh.GetItemByDataNode(node)
        assert item != sh.GetInvalidItemID() and sh.GetItemParent(item) == folder
    run(ct)
    assert len(_children(sh, folder)) == 5  # CT + 3 maps + table, again after a re-run


def _children(sh, item) -> list:
    """Direct children of a subject hierarchy item."""
    ids = vtk.vtkIdList()
    sh.GetItemChildren(item, ids)
    return [ids.GetId(i) for i in range(ids.GetNumberOfIds())]


def test_rendered_slice_shows_overlay_at_the_lesion_only(ct, viewer, tmp_path):
    """The composited red slice (CT background, CLAM foreground) is coloured at the lesion, grey far away."""
    _result, lesion = run(ct)
    rgba, (x, y) = rs.render_red_slice(viewer, lesion, size=256)
    assert 0 <= x < rgba.shape[1] and 0 <= y < rgba.shape[0]
    mask = rs.overlay_mask(rgba)
    rows, cols = np.nonzero(mask)
    distance = np.hypot(cols - x, rows - y)
    pixel_mm = viewer.sliceLogics["Red"].GetSliceNode().GetFieldOfView()[0] / rgba.shape[1]
    near = np.hypot(*np.meshgrid(np.arange(rgba.shape[1]) - x, np.arange(rgba.shape[0]) - y)) <= 3 / pixel_mm
    assert mask[near].mean() > 0.9, "overlay colour at the lesion"
    # the blob (sigma 6 mm) falls below the 0.2 threshold at about 11 mm: nothing coloured beyond 15 mm
    assert distance.max() * pixel_mm < 15.0, "no overlay colour far from the lesion"
    centre = rgba[round(y), round(x), :3].astype(int)
    assert centre[0] > centre[2] + 40, "bright end of inferno (yellow) at the peak"
    # the CT alone (foreground hidden) renders no overlay colour anywhere
    for composite in CLAMMRML.slice_composite_nodes(viewer.scene):
        composite.SetForegroundOpacity(0.0)
    plain, _ = rs.render_red_slice(viewer, lesion, size=256)
    assert not rs.overlay_mask(plain).any()


def test_screenshot_command_writes_png(tmp_path):
    """The documented screenshot command produces a PNG with overlay colour in it."""
    out = tmp_path / "shot.png"
    assert rs.main(["--out", str(out), "--size", "128"]) == 0
    image = sitk.GetArrayFromImage(sitk.ReadImage(str(out)))
    assert image.shape[:2] == (128, 128)
    assert rs.overlay_mask(image).any()


def test_export_volumes_for_training(ct, tmp_path):
    """Scene volumes are written as NRRD that ITK reads back with the node's geometry."""
    paths = CLAMMRML.export_volumes([ct], tmp_path / "export")
    assert len(paths) == 1 and paths[0].endswith(".nrrd")
    back = sitk.ReadImage(paths[0])
    image = CLAMMRML.volume_to_image(ct)
    np.testing.assert_allclose(back.GetOrigin(), image.GetOrigin())
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection())


def test_train_command_line():
    """`clam train` as run from Slicer: the module, inputs, k, output and JSON progress."""
    cmd = CLAMMRML.train_command(["a.nrrd", "b.nrrd"], 3, "/tmp/out", python="py")
    assert cmd == ["py", "-m", "CLAMLib.cli", "train", "a.nrrd", "b.nrrd", "--k", "3", "--out", "/tmp/out",
                   "--progress-json"]


FAKE_TRAIN = textwrap.dedent("""
    import json, subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    print("pid", child.pid, flush=True)
    print("a plain log line", flush=True)
    for i in range(3):
        print(json.dumps({"progress": (i + 1) / 10, "stage": "pretrain", "message": f"epoch {i}"}), flush=True)
    if sys.argv[1] == "finish":
        child.kill()
        sys.exit(0)
    time.sleep(60)
""")


def _wait(process, predicate, timeout=20.0):
    """Poll a BackgroundProcess until predicate(lines, code) holds; returns all lines and the code."""
    lines, code, end = [], None, time.time() + timeout
    while time.time() < end:
        new, code = process.poll()
        lines += new
        if predicate(lines, code):
            return lines, code
        time.sleep(0.05)
    raise AssertionError(f"timed out; got {lines}, code {code}")


def test_background_process_progress_and_exit(tmp_path):
    """JSON progress lines update progress/stage; other lines pass through; the exit code arrives."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    process = CLAMMRML.BackgroundProcess([sys.executable, str(script), "finish"])
    lines, code = _wait(process, lambda lines, code: code is not None)
    assert code == 0
    assert "a plain log line" in lines and "[pretrain] epoch 2" in lines
    assert process.progress == pytest.approx(0.3) and process.stage == "pretrain"


@pytest.mark.skipif(os.name == "nt", reason="POSIX process groups")
def test_background_process_cancel_kills_the_tree(tmp_path):
    """Cancel ends the process and the children it started."""
    script = tmp_path / "fake_train.py"
    script.write_text(FAKE_TRAIN)
    process = CLAMMRML.BackgroundProcess([sys.executable, str(script), "hang"])
    lines, _ = _wait(process, lambda lines, code: any(line.startswith("pid") for line in lines))
    child = int(next(line for line in lines if line.startswith("pid")).split()[1])
    process.cancel(grace=2.0)
    assert process.process.poll() is not None and process.cancelled
    for _ in range(100):
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        time.sleep(0.05)
    else:
        pytest.fail("child process survived cancel")


# --- with the real engine (CLAMLib): a tiny model trained here, explained through MRML --------------

@pytest.fixture(scope="module")
def tiny_bundle(tmp_path_factory):
    """A 2-cluster bundle trained in seconds on phantom CTs (grid 16), saved and loaded like a user's."""
    pytest.importorskip("torch", reason="the engine needs torch")
    estimator = pytest.importorskip("CLAMLib.estimator", reason="the engine (CLAMLib) is not importable")
    from CLAMLib.train import TrainConfig

    rng = np.random.default_rng(0)
    images = []
    for n in range(8):
        array = rs.phantom_ct()
        if n % 2:
            array[10:20, 25:35, 45:55] = 40  # the second group carries a large dense region
        array = (array + rng.normal(0, 5, array.shape)).astype(np.int16)
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((0.8, 0.7, 2.5))
        images.append(image)
    model = estimator.CLAMModel(k=2, grid=16, verbose=False,
                                train=TrainConfig(k=2, pretrain_epochs=3, finetune_epochs=2, batch_size=4))
    model.fit(images, trained_on="8 test phantoms")
    folder = tmp_path_factory.mktemp("bundle") / "tiny"
    model.save(folder)
    return folder


def test_engine_maps_land_on_the_oblique_input(ct, tiny_bundle):
    """load_bundle -> explain_image(volume_to_image(node)) -> apply_result: geometry, values, table, re-run."""
    from CLAMLib import load_bundle

    model = load_bundle(tiny_bundle)
    before = fingerprint(ct)
    steps = []
    explanation = model.explain_image(CLAMMRML.volume_to_image(ct), clusters="all", device="cpu",
                                      progress=lambda f, m: steps.append(f))
    assert steps and steps[-1] == pytest.approx(1.0)
    result = CLAMMRML.apply_result(ct, explanation)
    assert sorted(result.mapNodes) == [0, 1]
    assert result.assignment == int(np.argmax(result.probabilities))
    for node in result.mapNodes.values():
        assert np.array_equal(CLAMMRML.ijk_to_ras_array(node), CLAMMRML.ijk_to_ras_array(ct))
        values = slicer.util.arrayFromVolume(node)
        assert values.shape == slicer.util.arrayFromVolume(ct).shape
        assert 0.0 <= values.min() and values.max() <= 1.0
    q = [result.tableNode.GetTable().GetValueByName(r, "q").ToDouble() for r in range(2)]
    np.testing.assert_allclose(q, explanation.probabilities, rtol=1e-6)
    again = CLAMMRML.apply_result(ct, model.explain_image(CLAMMRML.volume_to_image(ct), clusters="assigned",
                                                          method="clam", device="cpu"))
    assert list(again.mapNodes) == [again.assignment]
    assert again.mapNodes[again.assignment].GetID() == result.mapNodes[again.assignment].GetID()
    assert fingerprint(ct) == before


def test_model_card_summary(tiny_bundle, tmp_path):
    """The panel's card line reads k, grid and provenance from model.json without torch."""
    text = CLAMMRML.model_card_summary(tiny_bundle)
    assert text.startswith("k = 2; grid 16; trained on 8 test phantoms; created ")
    assert "model.json missing" in CLAMMRML.model_card_summary(tmp_path)
    (tmp_path / "model.json").write_text("{not json")
    assert "Unreadable" in CLAMMRML.model_card_summary(tmp_path)


def _import_clam_module_with_stubs(monkeypatch):
    """Import CLAM.py outside Slicer: stub qt and the Slicer-application parts that slicer-core lacks."""
    import importlib.util
    import types

    def module(name, **attrs):
        stub = types.ModuleType(name)
        stub.__dict__.update(attrs)
        monkeypatch.setitem(sys.modules, name, stub)
        return stub

    class Base:
        def __init__(self, *args, **kwargs):
            pass

    class QTimer(Base):
        def setInterval(self, ms):
            pass

    module("qt", QTimer=QTimer)
    module("slicer.i18n", tr=lambda text: text, translate=lambda context, text: text)
    module("slicer.ScriptedLoadableModule", ScriptedLoadableModule=Base, ScriptedLoadableModuleLogic=Base,
           ScriptedLoadableModuleWidget=Base, ScriptedLoadableModuleTest=Base)
    module("slicer.parameterNodeWrapper", parameterNodeWrapper=lambda cls: cls,
           Choice=lambda *a: None, WithinRange=lambda *a: None)
    monkeypatch.delitem(sys.modules, "CLAMCohortPanel", raising=False)  # imported afresh against these stubs
    spec = importlib.util.spec_from_file_location("CLAM_headless", Path(rs.MODULE_DIR, "CLAM.py"))
    clam = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(clam)
    return clam


def test_clam_logic_process_headless(ct, tiny_bundle, monkeypatch):
    """CLAMLogic.process, the console entry point, runs end to end on real MRML (Slicer GUI parts stubbed)."""
    clam = _import_clam_module_with_stubs(monkeypatch)
    logic = clam.CLAMLogic()
    assert logic.missingPackages() == []  # Resources/requirements.txt all installed
    before = fingerprint(ct)
    seen = []
    result = logic.process(ct, tiny_bundle, clusters="all", device="CPU", method="faithful CLAM",
                           progress=lambda f, m: seen.append((f, m)))
    assert isinstance(result, CLAMMRML.CLAMResult) and sorted(result.mapNodes) == [0, 1]
    assert seen[0][0] == 0.0 and seen[-1] == (1.0, "done")
    assert np.array_equal(CLAMMRML.ijk_to_ras_array(result.mapNodes[0]), CLAMMRML.ijk_to_ras_array(ct))
    again = logic.process(ct, tiny_bundle, clusters="assigned", device="auto")
    assert again.tableNode.GetID() == result.tableNode.GetID() and len(again.mapNodes) == 1
    assert fingerprint(ct) == before
    # Cancel: the next progress report stops the run and nothing new is written
    count = ct.GetScene().GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode")
    with pytest.raises(clam.CLAMCancelled):
        logic.process(ct, tiny_bundle, progress=lambda f, m: logic.cancel())
    assert ct.GetScene().GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == count
    assert "k = 2" in logic.modelCardSummary(tiny_bundle)
    assert clam.CLAMLogic.describeDevices(importTorch=True).startswith(("CPU only", "GPU:"))
    command = clam.CLAMMRML.train_command(["a.nrrd"], 2, "out")
    assert command[1:4] == ["-m", "CLAMLib.cli", "train"]


def test_training_from_scene_volumes_runs_clam_train(viewer, tmp_path, monkeypatch):
    """Scene volumes -> NRRD -> `clam train --progress-json` in the background -> a loadable bundle."""
    pytest.importorskip("torch", reason="the engine needs torch")
    clam = _import_clam_module_with_stubs(monkeypatch)
    rng = np.random.default_rng(1)
    nodes = []
    for n in range(6):
        array = rs.phantom_ct()
        if n % 2:
            array[10:20, 25:35, 45:55] = 40
        array = (array + rng.normal(0, 5, array.shape)).astype(np.int16)
        # voxels of a whole chest (lungs of about 2.8 L): clam train refuses lungs outside 0.5-12 L
        nodes.append(slicer.util.addVolumeFromArray(array, rs.oblique_ijk_to_ras(spacing=(3.0, 3.0, 8.0)),
                                                    name=f"scan {n}"))
    inputs = CLAMMRML.export_volumes(nodes, tmp_path / "export")
    process = clam.CLAMLogic().startTraining(inputs, 2, tmp_path / "bundle",
                                             extra=["--grid", "16", "--epochs", "2", "--finetune-epochs", "1"])
    lines, code = _wait(process, lambda lines, code: code is not None, timeout=240)
    assert code == 0, "\n".join(lines[-30:])
    assert process.progress == pytest.approx(1.0) and any(line.startswith("[") for line in lines)
    assert (tmp_path / "bundle" / "model.json").is_file()
    assert CLAMMRML.model_card_summary(tmp_path / "bundle").startswith("k = 2; grid 16")


def test_clam_logic_opens_the_cohort_report(tmp_path, monkeypatch):
    """CLAMLogic.openCohortReport writes the report of a maps folder and asks Qt to open index.html."""
    clam = _import_clam_module_with_stubs(monkeypatch)
    opened = []

    class QUrl:
        @staticmethod
        def fromLocalFile(path):
            return ("file", path)

    class QDesktopServices:
        @staticmethod
        def openUrl(url):
            opened.append(url)
            return True

    monkeypatch.setattr(clam.qt, "QDesktopServices", QDesktopServices, raising=False)
    monkeypatch.setattr(clam.qt, "QUrl", QUrl, raising=False)
    maps = tmp_path / "maps"
    maps.mkdir()
    (maps / "assignments.csv").write_text("id,cluster,q0,q1,lung_volume_l,status,reason\n"
                                          "a,,,,,failed,cannot read the file\n")
    index = clam.CLAMLogic.openCohortReport(maps)
    assert index == maps / "report" / "index.html" and "cannot read the file" in index.read_text(encoding="utf-8")
    assert opened == [("file", str(index))]
