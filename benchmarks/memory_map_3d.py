"""Peak memory of mapping one 512 x 512 x 600 int16 chest CT end to end with `clam map` on the CPU.

Makes a phantom chest CT (simulate.make_phantom, scaled up to 512 x 512 x 600 voxels of 0.68 x 0.68 x 0.53 mm),
trains a tiny bundle on small phantoms unless --bundle is given, then runs `clam map` on the big CT under
/usr/bin/time -v and reports its peak resident set size (goal: under 3 GB). Writes JSON to --out.

    python benchmarks/memory_map_3d.py [--bundle models/clam-demo] [--out benchmarks/results/memory_map_3d.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "CLAM"))
SIZE = (512, 512, 600)
GOAL_GB = 3.0


def make_big_ct(path: Path) -> None:
    """A phantom chest CT resampled to SIZE voxels over the phantom's field of view, int16 HU."""
    import SimpleITK as sitk
    from CLAMLib.imageio import write_image
    from CLAMLib.simulate import make_phantom

    small, _ = make_phantom(seed=0)
    extent = [n * s for n, s in zip(small.GetSize(), small.GetSpacing())]
    spacing = [e / n for e, n in zip(extent, SIZE)]
    origin = small.TransformContinuousIndexToPhysicalPoint([-0.5 + 0.5 * sp / s
                                                           for sp, s in zip(spacing, small.GetSpacing())])
    big = sitk.Resample(small, list(SIZE), sitk.Transform(3, sitk.sitkIdentity), sitk.sitkLinear, origin, spacing,
                        small.GetDirection(), -1000, sitk.sitkInt16)
    write_image(big, path)


def make_bundle(folder: Path) -> None:
    """A tiny bundle (grid 32, k 2) trained on a few small phantoms; the map's memory hardly depends on it."""
    from CLAMLib.estimator import CLAMModel
    from CLAMLib.simulate import make_cohort
    from CLAMLib.train import TrainConfig

    cohort = make_cohort("size", n_per_cluster=3, seed=0)
    model = CLAMModel(grid=32, train=TrainConfig(k=2, pretrain_epochs=2, finetune_epochs=1, batch_size=3,
                                                 device="cpu"), verbose=False)
    model.fit([s.image for s in cohort.subjects])
    model.save(folder)


def main() -> int:
    """Run the benchmark and print the peak RSS."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=None, help="model bundle (default: train a tiny one)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "memory_map_3d.json")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args()
    if not Path("/usr/bin/time").exists():
        print("memory_map_3d: /usr/bin/time is missing (apt-get install time)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.work) as scratch:
        work = Path(scratch)
        ct = work / "big_ct.nrrd"
        t0 = time.perf_counter()
        make_big_ct(ct)
        bundle = args.bundle
        if bundle is None:
            bundle = work / "bundle"
            make_bundle(bundle)
        setup_s = time.perf_counter() - t0
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "CLAM"), os.environ.get("PYTHONPATH", "")]))
        command = ["/usr/bin/time", "-v", sys.executable, "-m", "CLAMLib.cli", "map", str(bundle), str(ct),
                   "--out", str(work / "maps"), "--device", "cpu", "--quiet"]
        t0 = time.perf_counter()
        done = subprocess.run(command, check=False, env=env, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
        if done.returncode != 0 or peak is None:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        peak_gb = int(peak.group(1)) * 1024 / 1e9
        maps = sorted(p.name for p in (work / "maps").rglob("map_cluster*"))
        result = {"benchmark": "memory_map_3d", "size": list(SIZE), "dtype": "int16", "peak_rss_gb": round(peak_gb, 3),
                  "goal_gb": GOAL_GB, "under_goal": peak_gb < GOAL_GB, "map_wall_s": round(wall, 1),
                  "setup_s": round(setup_s, 1), "maps": maps, "bundle": str(args.bundle or "tiny (grid 32, k 2)"),
                  "cpu": platform.processor() or platform.machine(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"peak RSS of clam map on a {'x'.join(map(str, SIZE))} int16 CT: {peak_gb:.2f} GB "
          f"(goal < {GOAL_GB} GB), {wall:.0f} s; written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
