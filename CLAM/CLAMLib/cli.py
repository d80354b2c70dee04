"""The `clam` command: demo (the simulation study), train (fit a model bundle) and map (explain scans)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from .errors import CLAMError

DESCRIPTION = """\
CLAM clusters chest CT scans with a deep convolutional autoencoder (DCEC) and shows which image
regions drive each cluster assignment (cluster activation maps; Ryan et al., J. Med. Imaging 2022).

  clam demo                      run the simulation study on generated phantoms (no data needed)
  clam train SCANS --out MODEL   fit a model bundle to a cohort of CT scans
  clam map MODEL SCANS --out DIR cluster assignments and maps for scans, on each scan's own grid

Run `clam COMMAND --help` for the options of each command.
"""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"],
                   help="where to compute: auto picks a CUDA or Apple GPU when there is one (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of `clam`."""
    parser = argparse.ArgumentParser(prog="clam", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version="clam 0.1.0")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser(
        "demo", help="run the simulation study (no data needed)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Generate chest CT phantoms whose clusters differ only by their lesions (size, location or "
                    "intensity), train CLAM at k = true-1, true, true+1, and report clustering accuracy and how "
                    "well each map method finds the lesions. Writes a results table (Markdown and JSON), maps as "
                    "NRRD on each subject's grid, and PNG figures into --out.")
    demo.add_argument("--out", type=Path, default=Path("demo-output"), help="output folder (default: demo-output)")
    demo.add_argument("--quick", action="store_true", help="one scenario at the true k only (about 2 minutes)")
    demo.add_argument("--scenarios", nargs="+", default=["size", "location", "intensity"],
                      choices=["size", "location", "intensity"], help="scenarios to run (default: all three)")
    demo.add_argument("--subjects", type=int, default=20, help="subjects per cluster (default: 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for phantoms and training (default: 0)")
    demo.add_argument("--anatomy-variation", type=float, default=1.0,
                      help="how much lung size, shape and position vary between subjects: 0 none, "
                           "1 realistic adult variation (default: 1)")
    demo.add_argument("--grid", type=int, default=32, help="model grid side in voxels, a multiple of 8 "
                                                            "(default: 32 for speed; the paper used 88)")
    demo.add_argument("--epochs", type=int, default=None, help="autoencoder pretraining epochs (default: 60)")
    demo.add_argument("--small-mm", type=float, default=None, help="size scenario: small lesion diameter in mm")
    demo.add_argument("--large-mm", type=float, default=None, help="size scenario: large lesion diameter in mm")
    demo.add_argument("--lesion-mm", type=float, default=None,
                      help="location and intensity scenarios: lesion diameter in mm")
    demo.add_argument("--no-sweep", action="store_true",
                      help="skip the accuracy-versus-anatomy-variation sweep (with and without registration)")
    _add_common(demo)

    train = sub.add_parser(
        "train", help="fit a model bundle to a cohort of CT scans",
        description="Fit CLAM to CT scans in Hounsfield units: lung masking, cropping and resampling to the model "
                    "grid, autoencoder pretraining, k-means and DCEC fine-tuning. Writes a bundle folder "
                    "(model.safetensors + model.json) that `clam map` and the Slicer module read.")
    train.add_argument("scans", nargs="+", help="image files (NIfTI, NRRD, MHA), DICOM series folders, folders "
                                                "searched recursively, or a CSV manifest with columns id,path")
    train.add_argument("--out", type=Path, required=True, help="bundle folder to write")
    train.add_argument("--k", type=int, default=None, help="number of clusters; omit to choose it over --k-range")
    train.add_argument("--k-range", type=int, nargs=2, default=(2, 8), metavar=("MIN", "MAX"),
                       help="k values to try when --k is omitted, chosen by silhouette (default: 2 8)")
    train.add_argument("--grid", type=int, default=88, help="model grid side, a multiple of 8 (default: 88)")
    train.add_argument("--register", choices=["none", "affine", "bspline"], default="none",
                       help="register scans to a template built from the cohort (default: none)")
    train.add_argument("--epochs", type=int, default=60, help="autoencoder pretraining epochs (default: 60)")
    train.add_argument("--finetune-epochs", type=int, default=30, help="DCEC fine-tuning epochs (default: 30)")
    train.add_argument("--batch-size", type=int, default=8, help="batch size (default: 8)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--progress-json", action="store_true",
                       help="print progress as one JSON object per line on stdout (for the Slicer module)")
    _add_common(train)

    mp = sub.add_parser(
        "map", help="cluster assignments and maps for scans",
        description="For each scan: the soft assignment to every cluster, the assigned cluster and the map of "
                    "each cluster on the scan's own grid (NRRD), plus assignments.csv.")
    mp.add_argument("model", type=Path, help="bundle folder written by `clam train` (e.g. models/clam-demo)")
    mp.add_argument("scans", nargs="+", help="image files, DICOM series folders, folders or a CSV manifest")
    mp.add_argument("--out", type=Path, required=True, help="output folder")
    mp.add_argument("--method", default="default",
                    choices=["default", "clam", "scorecam", "gradient", "occlusion"],
                    help="map method: default (the product's map) or clam (the paper's, faithful) and others")
    mp.add_argument("--clusters", default="all", choices=["all", "assigned"], help="which clusters to map")
    _add_common(mp)
    return parser


def _json_progress(fraction: float, stage: str, message: str) -> None:
    print(json.dumps({"progress": round(fraction, 4), "stage": stage, "message": message}), flush=True)


def cmd_train(args: argparse.Namespace) -> int:
    """Fit and save a bundle."""
    from .cohort import find_scans
    from .estimator import CLAMModel
    from .imageio import read_image
    from .preprocess import PreprocessConfig
    from .train import TrainConfig

    scans = find_scans(args.scans)
    images = [read_image(s.path) for s in scans]
    ndim = images[0].GetDimension()
    model = CLAMModel(
        preprocess=PreprocessConfig(grid=args.grid, ndim=ndim, register=args.register),
        train=TrainConfig(k=args.k, k_range=tuple(args.k_range), pretrain_epochs=args.epochs,
                          finetune_epochs=args.finetune_epochs, batch_size=args.batch_size, seed=args.seed,
                          device=args.device),
        grid=args.grid, ndim=ndim, verbose=not (args.quiet or args.progress_json))
    model.fit(images, progress=_json_progress if args.progress_json else None,
              trained_on=f"{len(scans)} scans: {', '.join(s.id for s in scans[:5])}{' ...' if len(scans) > 5 else ''}")
    path = model.save(args.out)
    print(f"bundle written to {path} (k={model.k}, cluster sizes {model.summary_.cluster_sizes})", file=sys.stderr)
    return 0


def cmd_map(args: argparse.Namespace) -> int:
    """Assign and map scans with a bundle."""
    import csv

    from .cohort import find_scans
    from .estimator import load_bundle
    from .imageio import atomic_path, read_image, write_image

    model = load_bundle(args.model, device=args.device)
    scans = find_scans(args.scans)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for scan in scans:
        image = read_image(scan.path)
        res = model.explain_image(image, clusters=args.clusters, method=args.method)
        for c, m in res.maps.items():
            write_image(m, args.out / scan.id / f"map_cluster{c}.nrrd")
        rows.append([scan.id, res.assignment, *[f"{p:.6f}" for p in res.probabilities]])
        print(f"{scan.id}: cluster {res.assignment}", file=sys.stderr)
    with atomic_path(args.out / "assignments.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["id", "cluster", *[f"q{c}" for c in range(model.k)]])
            w.writerows(rows)
    print(f"wrote {args.out / 'assignments.csv'}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the simulation study."""
    from .demo import run_demo

    run_demo(args)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `clam`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    warnings.simplefilter("default")
    try:
        return {"demo": cmd_demo, "train": cmd_train, "map": cmd_map}[args.command](args)
    except CLAMError as exc:
        print(f"clam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clam {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
