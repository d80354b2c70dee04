"""Tiny cohorts for the cohort tests: phantom scans on disk, bad scans of every kind, a small trained bundle."""

from __future__ import annotations

import os
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
        sl = sitk.GetImageFromArray(arr[z : z + 1].astype(np.int16))
        sl.SetSpacing(src.GetSpacing())
        pos = src.TransformIndexToPhysicalPoint((0, 0, z))
        tags = {"0008|0060": "CT", "0020|000d": "1.2.3", "0020|000e": "1.2.3.4", "0020|0013": str(z + 1),
                "0020|0032": "\\".join(f"{p:.3f}" for p in pos), "0020|0037": "1\\0\\0\\0\\1\\0",
                "0018|0050": str(src.GetSpacing()[2]), "0028|1052": "0", "0028|1053": "1"}
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        writer = sitk.ImageFileWriter()
        writer.KeepOriginalImageUIDOn()
        writer.SetFileName(str(series / f"s{z:03d}.dcm"))
        writer.Execute(sl)
    return {"broken": "cannot read", "slice2d": "2D", "nolungs": "no lungs", "gappy_dicom": "missing"}


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
