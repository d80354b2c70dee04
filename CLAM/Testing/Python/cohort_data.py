"""Tiny cohorts for the cohort tests: phantom scans on disk, bad scans of every kind, a small trained bundle."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import SimpleITK as sitk

MODULE_DIR = Path(__file__).resolve().parents[2]
TRAIN_ARGS = ["--k", "2", "--restarts", "2", "--grid", "16", "--epochs", "3", "--finetune-epochs", "3",
              "--batch-size", "3", "--device", "cpu", "--quiet", "--no-qc"]


def write_phantoms(folder: Path, n_per_cluster: int = 4, seed: int = 0) -> list[Path]:
    """Small phantom chest CTs (48 x 48 x 30 voxels over a 350 mm field, 10 mm slices) as NRRD files."""
    from CLAMLib.imageio import write_image
    from CLAMLib.simulate import make_cohort

    cohort = make_cohort("size", n_per_cluster=n_per_cluster, seed=seed, size=(48, 48, 30),
                         spacing=(350 / 48, 350 / 48, 10.0))
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for s in cohort.subjects:
        write_image(s.image, folder / f"{s.id}.nrrd")
        paths.append(folder / f"{s.id}.nrrd")
    return paths


def write_bad_scans(folder: Path, source: Path) -> dict[str, str]:
    """One scan of every bad kind; returns id -> a word its reason must contain."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken.nrrd").write_bytes(b"NRRD0004\ntype: short\ndimension: 3\nsizes: 40 40 40\nencoding: raw\n\n"
                                         + b"\0" * 100)
    sitk.WriteImage(sitk.GetImageFromArray(np.full((40, 40), -1000, np.int16)), str(folder / "slice2d.nrrd"))
    water = np.full((24, 48, 48), -1000, np.int16)
    water[:, 4:44, 4:44] = 40
    image = sitk.GetImageFromArray(water)
    image.SetSpacing((7.0, 7.0, 10.0))
    sitk.WriteImage(image, str(folder / "nolungs.nrrd"))
    src = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(src)
    series = folder / "gappy_dicom"
    series.mkdir(exist_ok=True)
    for z in range(arr.shape[0]):
        if z == arr.shape[0] // 2:
            continue  # the missing slice
        _write_slice(series / f"s{z:03d}.dcm", src, arr, z, {"0020|000d": "1.2.3", "0020|000e": "1.2.3.4",
                                                              "0018|0050": str(src.GetSpacing()[2])})
    return {"broken": "cannot read", "slice2d": "2D", "nolungs": "no lungs", "gappy_dicom": "missing"}


def write_series(folder: Path, slices: list[tuple[str, str, int]], source: Path) -> None:
    """One DICOM file per (patient id, series uid, slice index) of `source`, all in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    src = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(src)
    for n, (patient, uid, z) in enumerate(slices):
        _write_slice(folder / f"f{n:03d}.dcm", src, arr, z, {"0010|0020": patient, "0020|000d": f"{uid}.1",
                                                             "0020|000e": uid})


def _write_slice(path: Path, src: sitk.Image, arr: np.ndarray, z: int, tags: dict[str, str]) -> None:
    """Slice z of `src` (array `arr`) as a CT DICOM file with its position, orientation and the given tags."""
    sl = sitk.GetImageFromArray(arr[z : z + 1].astype(np.int16))
    sl.SetSpacing(src.GetSpacing())
    pos = src.TransformIndexToPhysicalPoint((0, 0, z))
    common = {"0008|0060": "CT", "0020|0013": str(z + 1), "0020|0032": "\\".join(f"{p:.3f}" for p in pos),
              "0020|0037": "1\\0\\0\\0\\1\\0", "0028|1052": "0", "0028|1053": "1"}
    for tag, value in {**common, **tags}.items():
        sl.SetMetaData(tag, value)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetFileName(str(path))
    writer.Execute(sl)


def write_broken_scans(folder: Path, source: Path) -> dict[str, str]:
    """Scans that read but are no usable chest CT; returns id -> words their reason must hold."""
    folder.mkdir(parents=True, exist_ok=True)
    image = sitk.ReadImage(str(source))
    sitk.WriteImage(image, str(folder / "whole.nii.gz"), True)
    data = (folder / "whole.nii.gz").read_bytes()
    (folder / "whole.nii.gz").unlink()
    (folder / "truncated.nii.gz").write_bytes(data[: len(data) // 2])
    for name, value in (("nan", np.nan), ("inf", np.inf), ("neginf", -np.inf)):
        arr = sitk.GetArrayFromImage(image).astype(np.float32)
        arr[10, 20, 20] = value
        bad = sitk.GetImageFromArray(arr)
        bad.CopyInformation(image)
        sitk.WriteImage(bad, str(folder / f"{name}.nii.gz"), True)
        sitk.WriteImage(bad, str(folder / f"{name}_plain.nii"))
    for name, spacing in (("huge_voxels", (100.0, 100.0, 100.0)), ("tiny_voxels", (0.001, 0.001, 0.001))):
        odd = sitk.Image(image)
        odd.SetSpacing(spacing)
        sitk.WriteImage(odd, str(folder / f"{name}.nrrd"), True)
    small = sitk.Image(image)
    small.SetSpacing([s / 5 for s in image.GetSpacing()])
    sitk.WriteImage(small, str(folder / "small_lungs.nrrd"), True)
    write_series(folder / "mixed_dicom", [(f"P{i % 54}", f"1.2.826.0.1.{i}", 12) for i in range(20)]
                 + [("P0", "1.2.826.0.1.0", 13)], source)
    return {"truncated": "compressed data ends early or is damaged", "nan": "NaN or infinite voxels",
            "inf": "NaN or infinite voxels", "neginf": "NaN or infinite voxels", "nan_plain": "NaN or infinite",
            "inf_plain": "NaN or infinite", "neginf_plain": "NaN or infinite",
            "huge_voxels": "voxel spacing 100 x 100 x 100 mm is outside 0.2-10 mm",
            "tiny_voxels": "voxel spacing 0.001 x 0.001 x 0.001 mm is outside 0.2-10 mm",
            "small_lungs": "L, outside the 0.5-12 L of a chest CT's lungs",
            "mixed_dicom": "holds 20 DICOM series (2, 1, 1, 1, 1, ... files), not one scan"}


def write_fuzz_scans(folder: Path, source: Path) -> dict[str, str]:
    """At least 40 distinct bad inputs (every kind above and more), named bad_*; returns id -> words of the reason."""
    import gzip

    expected = {f"bad_{k}": v for k, v in write_broken_scans(folder / "tmp_broken", source).items()}
    for path in sorted((folder / "tmp_broken").iterdir()):
        path.rename(folder / f"bad_{path.name}")
    (folder / "tmp_broken").rmdir()
    old = write_bad_scans(folder / "tmp_old", source)
    for path in sorted((folder / "tmp_old").iterdir()):
        path.rename(folder / f"bad_{path.name}")
    (folder / "tmp_old").rmdir()
    expected.update({f"bad_{k}": v for k, v in old.items()})
    image = sitk.ReadImage(str(source))
    arr = sitk.GetArrayFromImage(image)

    def save(name: str, values: np.ndarray, spacing: tuple[float, ...] | None = None, vector: bool = False,
             compress: bool = True) -> None:
        out = sitk.GetImageFromArray(values, isVector=vector)
        if spacing is None and out.GetDimension() == image.GetDimension() and not vector:
            out.CopyInformation(image)
        elif spacing is not None:
            out.SetSpacing(spacing)
        sitk.WriteImage(out, str(folder / name), compress)

    unreadable = "cannot read image"
    raw = {"bad_empty_nii.nii.gz": b"", "bad_empty_nrrd.nrrd": b"", "bad_empty_mha.mha": b"",
           "bad_random.mha": bytes(range(256)) * 20,
           "bad_text.nii": b"hello\n" * 100, "bad_gzip_of_noise.nii.gz": gzip.compress(bytes(range(256)) * 20),
           "bad_not_gzip.nii.gz": bytes(range(256)) * 20}
    for name, data in raw.items():
        (folder / name).write_bytes(data)
        expected[name.split(".")[0]] = unreadable
    for suffix, compress in ((".nrrd", True), (".mha", True), ("_raw.nrrd", False)):
        whole = folder / f"whole{suffix}"
        sitk.WriteImage(image, str(whole), compress)
        data = whole.read_bytes()
        whole.unlink()
        name = f"bad_truncated{suffix.replace('.', '_')}"
        (folder / f"{name}.{suffix.split('.')[-1]}").write_bytes(data[: len(data) * 2 // 3])
        expected[name] = unreadable
    (folder / "bad_header.mhd").write_text("ObjectType = Image\nNDims = 3\nDimSize = 40 40 40\n"
                                           "ElementType = MET_SHORT\nElementDataFile = missing.raw\n")
    (folder / "bad_header2.nhdr").write_text("NRRD0004\ntype: short\ndimension: 3\nsizes: 40 40 40\n"
                                            "encoding: raw\nendian: little\ndata file: missing.raw\n\n")
    expected.update({"bad_header": unreadable, "bad_header2": unreadable})
    nan = arr.astype(np.float32)
    nan[5, 20, 20] = np.nan
    save("bad_nan_nrrd.nrrd", nan)
    save("bad_nan_mha.mha", nan)
    save("bad_nan64.nii.gz", nan.astype(np.float64))
    inf = arr.astype(np.float32)
    inf[5, 20, 20] = np.inf
    save("bad_inf_nrrd.nrrd", inf)
    expected.update({"bad_nan_nrrd": "NaN", "bad_nan_mha": "NaN", "bad_nan64": "NaN or infinite",
                     "bad_inf_nrrd": "infinite"})
    save("bad_rgb.nrrd", np.zeros((30, 48, 48, 3), np.uint8), spacing=(7.0, 7.0, 10.0), vector=True)
    expected["bad_rgb"] = "constant"
    save("bad_five_components.nrrd", np.zeros((30, 48, 48, 5), np.float32), spacing=(7.0, 7.0, 10.0), vector=True)
    expected["bad_five_components"] = "5 components"
    four = sitk.JoinSeries([image, image])
    sitk.WriteImage(four, str(folder / "bad_four_d.nrrd"), True)
    expected["bad_four_d"] = "image is 4D"
    save("bad_constant.nrrd", np.full(arr.shape, -1000, np.int16))
    expected["bad_constant"] = "constant"
    save("bad_tiny_image.nrrd", arr[:8, :8, :8].copy(), spacing=(7.0, 7.0, 10.0))
    expected["bad_tiny_image"] = "too small"
    save("bad_one_slice.nrrd", arr[10:11].copy(), spacing=(7.0, 7.0, 10.0))
    expected["bad_one_slice"] = "2D"
    save("bad_thick_slices.nrrd", arr, spacing=(7.0, 7.0, 11.0))
    expected["bad_thick_slices"] = "outside 0.2-10 mm"
    save("bad_fine_voxels.nrrd", arr, spacing=(0.1, 0.1, 0.1))
    expected["bad_fine_voxels"] = "outside 0.2-10 mm"
    save("bad_unsigned.nrrd", (arr.astype(np.int32) + 1024).astype(np.uint16))
    expected["bad_unsigned"] = "no lungs"
    save("bad_all_air.nrrd", np.where(np.arange(arr.size).reshape(arr.shape) % 2, -1000, -990).astype(np.int16))
    expected["bad_all_air"] = "no lungs"
    junk = folder / "bad_junk_dicom"
    junk.mkdir()
    (junk / "a.dcm").write_bytes(b"not a dicom file" * 10)
    expected["bad_junk_dicom"] = "no DICOM series"
    cut = folder / "bad_cut_dicom"
    shutil.copytree(folder / "bad_gappy_dicom", cut)
    last = sorted(cut.iterdir())[-1]
    last.write_bytes(last.read_bytes()[:400])
    expected["bad_cut_dicom"] = "DICOM"
    return expected


def clam_env(**extra: str) -> dict[str, str]:
    """Environment for a `clam` subprocess: CLAMLib importable, one thread per process."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(MODULE_DIR), *filter(None, [env.get("PYTHONPATH")])])
    env.update({"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", **extra})
    return env


def run_clam(args: list[str], torchrun: int = 0, timeout: int = 300, **env: str) -> subprocess.CompletedProcess:
    """Run `python -m CLAMLib.cli ARGS`, optionally under torchrun with that many processes."""
    if torchrun:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        prefix = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(torchrun),
                  "--master-addr", "127.0.0.1", "--master-port", str(port), "-m", "CLAMLib.cli"]
    else:
        prefix = [sys.executable, "-m", "CLAMLib.cli"]
    return subprocess.run(prefix + args, check=False, cwd=MODULE_DIR, env=clam_env(**env), capture_output=True, text=True,
                          timeout=timeout)
