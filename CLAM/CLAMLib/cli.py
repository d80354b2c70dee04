"""The `clam` command: demo (the simulation study), train (fit a model bundle) and map (explain scans)."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import CLAMError, InputError

if TYPE_CHECKING:
    from .cache import PreprocessCache
    from .cohort import Scan
    from .distributed import DistContext
    from .preprocess import Gridded, Prepared, PreprocessConfig, Preprocessor

RESTARTS = 1
"""Autoencoder restarts of `clam demo` and `clam train`, as TrainConfig.restarts."""
LUNG_CLOSING = 20.0
"""Radius (mm) of the lung mask's closing in `clam demo` and `clam train`, as PreprocessConfig.closing_mm."""
SMOOTH_HELP = ("sigma, in model-grid voxels, of a fixed Gaussian in front of the encoder, so that findings a few "
               "voxels apart between scans of a cluster still count as alike; maps stay on the unsmoothed input "
               "(default: grid / 16, e.g. 4 at grid 64; 0 is off, as in the paper)")
HEAD_HELP = ("what the clustering head reads: dense (the paper's dense embedding, which tells findings apart by where "
             "they lie), zones (the last block's activations averaged over the upper and the lower half of the scan, "
             "so a finding counts by its zone wherever it lies in it) or dense+zones (both, equally weighted) "
             "(default: dense+zones for 3D scans, dense for 2D images)")
HEAD_CHOICES = ["dense+zones", "zones", "dense"]
"""--head values, as model.HEADS (spelt out here so that the parser does not import torch)."""

DESCRIPTION = """\
CLAM clusters chest CT scans with a deep convolutional autoencoder (DCEC) and shows which image
regions drive each cluster assignment (cluster activation maps; Ryan et al., J. Med. Imaging 2022).

  clam demo                      run the simulation study on generated phantoms (no data needed)
  clam train SCANS --out MODEL   fit a model bundle to a cohort of CT scans
  clam map MODEL SCANS --out DIR cluster assignments and maps for scans, on each scan's own grid
  clam associate MAPS --clinical CSV --id-column ID
                                 what the clusters are associated with: clinical, acquisition, anatomy
  clam report DIR                a cohort report (DIR/report/index.html) of `clam map` output, for any browser

Run `clam COMMAND --help` for the options of each command.
"""


def _whole(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number of at least `minimum`."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number; give one of at least {minimum}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, not {value}")
        return value

    return parse


def _not_negative(text: str) -> float:
    """An argparse type: a number of at least 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; give one of at least 0") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of at least 0, not {text}")
    return value


def _grid(text: str) -> int:
    """An argparse type: a model grid side, a multiple of 8 from 16 to 256."""
    value = _whole(16)(text)
    if value % 8 or value > 256:
        raise argparse.ArgumentTypeError(f"must be a multiple of 8 from 16 to 256, not {value}; try "
                                         f"{min(256, max(16, round(value / 8) * 8))}")
    return value


class _KRange(argparse.Action):
    """--k-range MIN MAX: two whole numbers of at least 2, MIN not above MAX."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Sequence[int],
                 option_string: Optional[str] = None) -> None:
        low, high = values
        if low > high:
            parser.error(f"argument --k-range: MIN {low} is above MAX {high}; give them in order, "
                         f"e.g. --k-range {high} {low}")
        setattr(namespace, self.dest, (low, high))


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "gpu", "mps"],
                   help="where to compute: auto picks a CUDA or Apple GPU when there is one (default: auto)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def _add_exclude(p: argparse.ArgumentParser) -> None:
    p.add_argument("--exclude", action="append", default=[], metavar="GLOB",
                   help="leave out scans (files or DICOM folders) whose name or path relative to a folder given "
                        "matches GLOB (fnmatch style, * also matches /; e.g. '*_label.nrrd' or 'old/*'; repeatable)")


def _add_lung_closing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--lung-closing", type=_not_negative, default=LUNG_CLOSING, metavar="MM",
                   help=f"radius in mm of the closing of each lung in the lung mask (default: {LUNG_CLOSING:g}, "
                        "which takes in solid lesions touching the pleura or the diaphragm; 6 leaves most of them out)")


def _add_cache(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cache", type=Path, default=None, metavar="DIR",
                   help="preprocessing cache: each scan on the model grid under a hash of its content and the "
                        "settings, so an unchanged scan is read and preprocessed once across train, map and --resume "
                        "(default: OUT/cache; give train and map the same DIR to share it)")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write the preprocessing cache")


def _cache(args: argparse.Namespace):
    """The preprocessing cache chosen by --cache / --no-cache."""
    from .cache import PreprocessCache
    from .paths import output_path

    return PreprocessCache(None if args.no_cache else (args.cache or output_path(args.out, "cache")))


def _add_representation(p: argparse.ArgumentParser) -> None:
    """--representation and --vessel-mm."""
    from .findings import VESSEL_MM

    p.add_argument("--representation", choices=["findings", "ct"], default="findings",
                   help="what the model sees: 'findings' (default), three channels of how far each lung voxel departs "
                        "from the scan's own normal parenchyma (low attenuation, ground glass, solid), with vessels "
                        "removed, so that clusters follow findings rather than people; 'ct', the clipped CT itself "
                        "(the paper's input)")
    p.add_argument("--vessel-mm", type=_not_negative, default=VESSEL_MM, metavar="MM",
                   help=f"findings: radius in mm of the ball whose grey opening removes vessels (default: "
                        f"{VESSEL_MM:g}; findings narrower than about twice this are removed too)")


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
    demo.add_argument("--subjects", type=_whole(2), default=20, help="subjects per cluster (default: 20)")
    demo.add_argument("--seed", type=int, default=0, help="random seed for phantoms and training (default: 0)")
    demo.add_argument("--anatomy-variation", type=_not_negative, default=1.0,
                      help="how much lung size, shape and position vary between subjects: 0 none, "
                           "1 realistic adult variation (default: 1)")
    demo.add_argument("--grid", type=_grid, default=32, help="model grid side in voxels, a multiple of 8 "
                                                            "(default: 32 for speed; the paper used 88)")
    demo.add_argument("--epochs", type=_whole(1), default=None, help="autoencoder pretraining epochs (default: 60)")
    demo.add_argument("--smooth", type=_not_negative, default=None, help=SMOOTH_HELP)
    demo.add_argument("--head", choices=HEAD_CHOICES, default=None, help=HEAD_HELP)
    demo.add_argument("--restarts", type=_whole(1), default=RESTARTS,
                      help=f"autoencoders pretrained from successive seeds; the one whose k-means clusters separate "
                           f"best (silhouette) is fine-tuned (default: {RESTARTS})")
    demo.add_argument("--small-mm", type=float, default=None, help="size scenario: small lesion diameter in mm")
    demo.add_argument("--large-mm", type=float, default=None, help="size scenario: large lesion diameter in mm")
    demo.add_argument("--lesion-mm", type=float, default=None,
                      help="location and intensity scenarios: lesion diameter in mm")
    demo.add_argument("--base", type=Path, default=None, metavar="CT",
                      help="use a real chest CT (HU) as base anatomy: each subject is a randomly deformed copy "
                           "with intensity jitter and inserted lesions (the semi-synthetic benchmark)")
    demo.add_argument("--base-lesion", type=Path, default=None, metavar="MASK",
                      help="mask of the base CT's own lesion (non-zero inside, on the base's grid): its voxels "
                           "become the base's aerated-lung median, so that no subject shares the base's tumour")
    _add_lung_closing(demo)
    _add_representation(demo)
    demo.add_argument("--register", choices=["none", "affine", "bspline"], default="none",
                      help="register every subject's lungs to the cohort's lung template before clustering "
                           "(default: none)")
    demo.add_argument("--save-model", type=Path, default=None, metavar="DIR",
                      help="also save the first scenario's model at the true k as a bundle folder "
                           "(models/clam-demo is made this way)")
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
    _add_exclude(train)
    train.add_argument("--k", type=_whole(1), default=None, help="number of clusters; omit to choose it over --k-range")
    train.add_argument("--k-range", type=_whole(2), nargs=2, default=(2, 8), metavar=("MIN", "MAX"), action=_KRange,
                       help="k values to try when --k is omitted, chosen by silhouette (default: 2 8)")
    train.add_argument("--grid", type=_grid, default=88, help="model grid side, a multiple of 8 (default: 88)")
    train.add_argument("--register", choices=["none", "affine", "bspline"], default="none",
                       help="register scans to a template built from the cohort (default: none)")
    _add_lung_closing(train)
    _add_representation(train)
    train.add_argument("--epochs", type=_whole(1), default=60, help="autoencoder pretraining epochs (default: 60)")
    train.add_argument("--smooth", type=_not_negative, default=None, help=SMOOTH_HELP)
    train.add_argument("--head", choices=HEAD_CHOICES, default=None, help=HEAD_HELP)
    train.add_argument("--restarts", type=_whole(1), default=RESTARTS,
                       help=f"autoencoders pretrained from successive seeds; the one whose k-means clusters separate "
                            f"best (silhouette) is fine-tuned (default: {RESTARTS}; each adds one pretraining)")
    train.add_argument("--finetune-epochs", type=_whole(1), default=30, help="DCEC fine-tuning epochs (default: 30)")
    train.add_argument("--batch-size", type=_whole(1), default=8, help="batch size (default: 8)")
    train.add_argument("--seed", type=int, default=0, help="random seed (default: 0)")
    train.add_argument("--progress-json", action="store_true",
                       help="print progress as one JSON object per line on stdout (for the Slicer module)")
    restart = train.add_mutually_exclusive_group()
    restart.add_argument("--resume", action="store_true",
                         help="continue an interrupted run from its checkpoint (same scans and options) to the same "
                              "result as an uninterrupted run")
    restart.add_argument("--restart", action="store_true",
                         help="discard the checkpoint of an interrupted run and start again (without --resume or "
                              "--restart, an existing checkpoint stops the run)")
    train.add_argument("--checkpoint", type=Path, default=None,
                       help="checkpoint folder, written after every epoch and removed at the end "
                            "(default: OUT/checkpoint)")
    train.add_argument("--report", type=Path, default=None,
                       help="training report folder: loss curves, k selection, cluster sizes, QC pictures "
                            "(default: OUT/report)")
    train.add_argument("--no-qc", action="store_true", help="do not write a lung-mask QC picture per scan")
    _add_cache(train)
    _add_common(train)

    mp = sub.add_parser(
        "map", help="cluster assignments and maps for scans",
        description="For each scan: the soft assignment to every cluster, the assigned cluster, the map of each "
                    "cluster on the scan's own grid and a lung-mask QC picture (under OUT/scans/ID/), plus "
                    "OUT/assignments.csv (id, cluster, q per cluster, lung volume, status, reason), per-cluster "
                    "average maps (OUT/clusters/) and a log. Scans finished earlier with the same model are "
                    "skipped, so an interrupted run continues where it stopped. A scan that cannot be used is "
                    "reported with its reason and the others go on; the exit status is then 3. Under torchrun the "
                    "scans are shared among the processes.")
    mp.add_argument("model", type=Path, help="bundle folder written by `clam train` (e.g. models/clam-demo)")
    mp.add_argument("scans", nargs="+", help="image files, DICOM series folders, folders or a CSV manifest")
    mp.add_argument("--out", type=Path, required=True, help="output folder")
    _add_exclude(mp)
    mp.add_argument("--method", default="default",
                    choices=["default", "clam", "scorecam", "gradient", "occlusion"],
                    help="map method: default (the product's map) or clam (the paper's, faithful) and others")
    mp.add_argument("--clusters", default="all", choices=["all", "assigned"], help="which clusters to map")
    mp.add_argument("--format", default="nrrd", choices=["nrrd", "nifti"],
                    help="file format of the maps: nrrd (.nrrd) or nifti (.nii.gz) (default: nrrd)")
    mp.add_argument("--no-qc", action="store_true", help="do not write a lung-mask QC picture per scan")
    mp.add_argument("--redo", action="store_true", help="map every scan again, also those finished earlier")
    _add_cache(mp)
    mp.add_argument("--progress-json", action="store_true",
                    help="print progress as one JSON object per line on stdout (for the Slicer module)")
    mp.add_argument("--report", action="store_true", help="also write the cohort report OUT/report/index.html "
                                                          "(as `clam report OUT`)")
    _add_common(mp)

    assoc = sub.add_parser(
        "associate", help="test clinical, acquisition and anatomy columns against the clusters",
        description="Test every column of a clinical table, and what every scan carries (lung volume, voxel "
                    "spacing, slice thickness, slices, mean lung HU, body size; for DICOM also manufacturer, "
                    "scanner model, reconstruction kernel, kVp, contrast agent and study date), against the clusters "
                    "of a `clam map` folder: Kruskal-Wallis (and ANOVA) with epsilon^2 for continuous columns, "
                    "chi-square or Fisher's exact test with Cramer's V for categorical ones, p-values adjusted over "
                    "the columns tested (Benjamini-Hochberg). Warns when acquisition or anatomy goes with the "
                    "clusters more strongly than any clinical column. Writes association.md, .csv and .json and a "
                    "plot per column (association/*.png, and association/overview.png).")
    assoc.add_argument("maps", type=Path, help="output folder of `clam map` (holds assignments.csv)")
    assoc.add_argument("--clinical", type=Path, default=None, metavar="CSV",
                       help="clinical table, one row per scan (comma, semicolon or tab separated); without it only "
                            "the acquisition and anatomy columns are tested")
    assoc.add_argument("--id-column", default="id", metavar="NAME",
                       help="column of the clinical table holding the scan ids of `clam map` (default: id)")
    assoc.add_argument("--categorical", action="append", default=[], metavar="NAME",
                       help="treat this column as categorical (repeatable; by default a column of numbers with more "
                            "than two values is continuous, anything else categorical)")
    assoc.add_argument("--continuous", action="append", default=[], metavar="NAME",
                       help="treat this column as continuous (repeatable)")
    assoc.add_argument("--out", type=Path, default=None, help="output folder (default: the MAPS folder)")
    assoc.add_argument("--no-plots", action="store_true", help="write the tables only")

    rp = sub.add_parser(
        "report", help="a cohort report of `clam map` output that opens in any browser",
        description="Write MAPS/report/index.html from a `clam map` output folder: the model card, a table of "
                    "clusters, each cluster's mean map and a gallery of its scans (the map over the CT, q values, "
                    "the QC picture), the failed scans, and `clam associate`'s results and the training report "
                    "when they exist. The folder holds plain HTML and PNG files only: copy it anywhere and open "
                    "index.html. Pictures are made once and reused on rerun.")
    rp.add_argument("maps", type=Path, help="output folder of `clam map` (holding assignments.csv)")
    rp.add_argument("--model", type=Path, default=None,
                    help="bundle folder for the model card and training report (default: the one the maps name)")
    rp.add_argument("--uncertain", type=float, default=0.6, metavar="Q",
                    help="a scan whose highest q is below Q is marked uncertain (default: 0.6)")
    rp.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _progress_printer(json_lines: bool):
    """A training progress callback that adds the elapsed time and an estimate of the time left."""
    import time

    from tqdm.auto import tqdm

    start, first = time.perf_counter(), [None]

    def report(fraction: float, stage: str, message: str) -> None:
        elapsed = time.perf_counter() - start
        if first[0] is None:
            first[0] = fraction
        done = fraction - first[0]
        eta = elapsed * (1 - fraction) / done if done > 1e-3 else None
        if json_lines:
            print(json.dumps({"progress": round(fraction, 4), "stage": stage, "message": message,
                              "elapsed_s": round(elapsed, 1), "eta_s": None if eta is None else round(eta, 1)}),
                  flush=True)
        else:
            left = "" if eta is None else f", about {_duration(eta)} left"
            tqdm.write(f"[{100 * fraction:5.1f}%] {stage}: {message} ({_duration(elapsed)} elapsed{left})",
                       file=sys.stderr)

    return report


def _duration(seconds: float) -> str:
    """Seconds as a short text (45 s, 3 min 5 s, 2 h 4 min)."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60} s"
    return f"{s // 3600} h {s % 3600 // 60} min"


def _writable_folder(path: Path, option: str) -> None:
    """Make the output folder given by `option` (if missing) and check that files can be written into it."""
    import tempfile

    if path.exists() and not path.is_dir():
        raise InputError(f"{option} {path} is a file, not a folder; give a folder (it is made when missing)")
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise InputError(f"cannot write into {option} {path} ({exc.strerror or exc}); choose a folder you can "
                         f"write to") from None


def _check_checkpoint(folder: Path, resume: bool, restart: bool) -> str:
    """Refuse an unasked-for checkpoint or a missing one to resume; discard it on --restart; describe a resume."""
    from .train import Checkpoint

    checkpoint = Checkpoint(folder)
    if checkpoint.exists() and not (resume or restart):
        raise InputError(f"{folder} holds the checkpoint of an earlier, unfinished run; add --resume to continue it, "
                         f"or --restart to discard it and start again")
    if resume and not checkpoint.exists():
        raise InputError(f"--resume: there is no checkpoint in {folder} to continue; run without --resume to start "
                         f"(or give the interrupted run's --checkpoint)")
    if restart:
        checkpoint.remove()
    return checkpoint.describe() if resume else ""


def cmd_train(args: argparse.Namespace) -> int:
    """Fit and save a bundle (under torchrun: each rank preprocesses its share of the scans, all train, rank 0 writes)."""
    from .cohort import find_scans
    from .diagnostics import assess
    from .distributed import device_for, from_env, shutdown
    from .estimator import CLAMModel
    from .imageio import remove_partial
    from .model import Architecture, default_head, default_smooth
    from .preprocess import PreprocessConfig
    from .qc import training_report
    from .train import TrainConfig, resolve_device

    ctx = from_env(args.device)
    try:
        device = device_for(ctx, args.device)
        resolve_device(device)
        report_dir = args.report or args.out / "report"
        checkpoint = args.checkpoint or args.out / "checkpoint"
        for option, folder in (("--out", args.out), ("--report", args.report), ("--checkpoint", args.checkpoint)):
            if folder is not None:
                _writable_folder(folder, option)
        resumed = _check_checkpoint(checkpoint, args.resume, args.restart)
        if ctx.main:
            for folder in {args.out, report_dir, checkpoint}:
                if folder.is_dir():
                    remove_partial(folder)
        ctx.barrier()
        scans = find_scans(args.scans, exclude=args.exclude, outputs=[args.out, report_dir, checkpoint])
        quiet = args.quiet or args.progress_json or not ctx.main
        ndim = _cohort_ndim(scans)
        config = PreprocessConfig(grid=args.grid, ndim=ndim, register=args.register, closing_mm=args.lung_closing,
                                  representation=args.representation, vessel_mm=args.vessel_mm)
        qc_dir = None if args.no_qc else report_dir / "qc"
        preprocessor, used, prepared, rows = _prepare_cohort(scans, config, qc_dir, ctx, quiet, _cache(args))
        if not prepared:
            raise InputError("no usable scans: every scan failed its checks (see the messages above).")
        model = CLAMModel(
            preprocess=config,
            train=TrainConfig(k=args.k, k_range=tuple(args.k_range), restarts=args.restarts,
                              pretrain_epochs=args.epochs, finetune_epochs=args.finetune_epochs,
                              batch_size=args.batch_size, seed=args.seed, device=device),
            architecture=Architecture(ndim=ndim, grid=args.grid, in_channels=config.channels,
                                      smooth=default_smooth(args.grid) if args.smooth is None else args.smooth,
                                      head=args.head or default_head(ndim)),
            verbose=not quiet)
        model.preprocessor_ = preprocessor
        progress = _progress_printer(args.progress_json) if ctx.main and not args.quiet else None
        if resumed and ctx.main:
            print(f"clam train: resuming from the checkpoint in {checkpoint}: {resumed}", file=sys.stderr)
        names = ", ".join(s.id for s in used[:5]) + (" ..." if len(used) > 5 else "")
        model.fit(prepared, progress=progress, trained_on=f"{len(used)} scans: {names}",
                  trainer_options={"checkpoint": checkpoint, "resume": args.resume, "dist": ctx})
        if ctx.main:
            path = model.save(args.out)
            diagnosis = assess([r for r in rows if r["status"] == "ok"], model.summary_.labels, model.k)
            training_report(model.summary_, report_dir, rows, diagnosis)
            for warning in diagnosis["warnings"]:
                print(f"clam: warning: {warning} (see {report_dir / 'report.md'})", file=sys.stderr)
            from .train import Checkpoint

            Checkpoint(checkpoint).remove()
            failed = [r["id"] for r in rows if r["status"] != "ok"]
            print(f"bundle written to {path} (k={model.k}, cluster sizes {model.summary_.cluster_sizes}, "
                  f"autoencoder R^2 {model.summary_.reconstruction_r2:.2f}); "
                  f"report in {report_dir}" + (f"; skipped {len(failed)} bad scans: {failed}" if failed else ""),
                  file=sys.stderr)
        return 0
    finally:
        shutdown(ctx)


def _prepare_cohort(scans: Sequence[Scan], config: PreprocessConfig, qc_dir: Optional[Path], ctx: DistContext,
                    quiet: bool, cache: Optional[PreprocessCache] = None
                    ) -> tuple[Preprocessor, list[Scan], list[Prepared], list[dict]]:
    """Fit the preprocessing, prepare the usable scans and make a report row per scan (bad scans are left out).

    Each rank reads and preprocesses only its shard of the scans and writes their QC pictures; every rank ends with
    the same fitted preprocessor and all prepared scans in the cohort's order, as one process would.
    """
    import numpy as np
    from tqdm.auto import tqdm

    from .batch import gridded_scan, warnings_of
    from .paths import output_path
    from .preprocess import Preprocessor

    preprocessor = Preprocessor(config)

    def skip(scan: Scan, exc: CLAMError) -> str:
        """Say that a scan is left out and why; the first line of the reason."""
        print(f"clam train: skipping {scan.id}: {exc}", file=sys.stderr)
        return str(exc).splitlines()[0]

    def gridded(scan: Scan) -> tuple[dict, Optional[Gridded]]:
        """A scan's report row and, when it is usable, the scan on its model grid."""
        try:
            qc = output_path(qc_dir, f"{scan.id}.png") if qc_dir is not None else None
            record: dict = {}  # acquisition and anatomy, for what the clusters follow
            with warnings_of(scan):
                grid, volume = gridded_scan(scan, preprocessor, qc, cache, record)
        except CLAMError as exc:
            return {"id": scan.id, "status": "failed", "reason": skip(scan, exc)}, None
        return {"id": scan.id, "status": "ok", "lung_volume_l": round(volume, 3), "reason": "", **record}, grid

    def finished(scan: Scan, grid: Gridded) -> tuple[Optional[Prepared], str]:
        """A gridded scan registered and normalised, or None and the reason it failed."""
        try:
            return preprocessor.finish(grid), ""
        except CLAMError as exc:
            return None, skip(scan, exc)

    mine = ctx.shard(scans)
    records = ctx.unshard([gridded(scan) for scan in tqdm(mine, desc="checking scans", disable=quiet)], len(scans))

    def summed(values: np.ndarray) -> np.ndarray:
        """The sum of every rank's array (gathered as objects, so any backend and device will do)."""
        return np.sum(ctx.unshard([values], ctx.world), axis=0)

    grids = [grid for _, grid in records if grid is not None]
    preprocessor.fit_grids(grids, ctx.shard, summed)  # each rank registers its share to the lung template
    usable = [(scan, row, grid) for scan, (row, grid) in zip(scans, records) if grid is not None]
    bar = tqdm(ctx.shard(usable), desc="preprocessing", disable=quiet)
    outcomes = ctx.unshard([finished(scan, grid) for scan, _, grid in bar], len(usable))
    used, prepared = [], []
    for (scan, row, _), (done, reason) in zip(usable, outcomes):
        if done is None:
            row.update(status="failed", reason=reason)
        else:
            used.append(scan)
            prepared.append(done)
    if ctx.active:
        names = ", ".join(s.id for s in mine[:5]) + (" ..." if len(mine) > 5 else "")
        # one write per line, so that the ranks' lines do not interleave on a shared stderr
        template = f"; registered {len(ctx.shard(grids))} to the lung template" if config.register != "none" else ""
        sys.stderr.write(f"clam train: rank {ctx.rank} of {ctx.world} read and preprocessed {len(mine)} of "
                         f"{len(scans)} scans{template}: {names}\n")
    return preprocessor, used, prepared, [row for row, _ in records]


def _cohort_ndim(scans: list) -> int:
    """Dimension of the cohort's model: 2 when the first readable scan is one slice, else 3."""
    from .imageio import read_image

    for scan in scans:
        try:
            image = read_image(scan.path)
        except CLAMError:
            continue
        size = image.GetSize()
        return 2 if image.GetDimension() == 2 or (len(size) == 3 and size[2] == 1) else 3
    return 3


def cmd_map(args: argparse.Namespace) -> int:
    """Assign and map a cohort with a bundle (under torchrun the scans are shared among ranks)."""
    from .batch import CohortMapper
    from .cohort import find_scans
    from .distributed import device_for, from_env, shutdown
    from .estimator import load_bundle
    from .train import resolve_device

    ctx = from_env(args.device)
    try:
        device = device_for(ctx, args.device)
        resolve_device(device)
        model = load_bundle(args.model, device=device)
        _writable_folder(args.out, "--out")
        scans = find_scans(args.scans, exclude=args.exclude, outputs=[args.out])
        mapper = CohortMapper(model, args.out, fmt=args.format, method=args.method, clusters=args.clusters,
                              qc=not args.no_qc, device=device, dist=ctx,
                              verbose=not (args.quiet or args.progress_json), cache=_cache(args),
                              bundle=args.model)
        progress = _progress_printer(True) if args.progress_json and ctx.main else None
        results = mapper.run(scans, redo=args.redo, progress=progress)
        if progress is not None:
            progress(1.0, "done", f"mapped into {args.out}")
        if args.report and ctx.main:
            from .report import build_report

            print(f"cohort report: {build_report(args.out, args.model)}", file=sys.stderr)
        failed = [r for r in results if r.status != "ok"]
        if ctx.main:
            for r in failed:
                print(f"clam map: {r.id} failed: {r.reason}", file=sys.stderr)
            earlier = f", {mapper.skipped} done earlier were skipped" if mapper.skipped else ""
            print(f"clam map: mapped {mapper.mapped} of {len(results)} scans now{earlier}; {len(results) - len(failed)} "
                  f"ok, {len(failed)} failed; outputs in {args.out} (assignments.csv, scans/, clusters/, "
                  f"{mapper.log_path.name})", file=sys.stderr)
        return 3 if failed else 0
    finally:
        shutdown(ctx)


def cmd_associate(args: argparse.Namespace) -> int:
    """Test clinical, acquisition and anatomy columns against a mapped cohort's clusters."""
    from .associate import associate, write_association

    result = associate(args.maps, args.clinical, args.id_column, args.categorical, args.continuous)
    out = args.out or args.maps
    write_association(result, out, plots=not args.no_plots)
    for o in result.tested[:5]:
        print(f"{o.name}: {o.test}, adjusted p {o.p_adjusted:.3g}, {o.effect_name} {o.effect:.2f}", file=sys.stderr)
    if result.not_mapped or result.not_in_table:
        print(f"clam associate: {len(result.not_mapped)} ids of the clinical table were not mapped and "
              f"{len(result.not_in_table)} mapped scans are not in it (listed in association.md)", file=sys.stderr)
    if result.warning:
        print(f"clam associate: warning: {result.warning}", file=sys.stderr)
    print(f"tested {len(result.tested)} columns against {result.k} clusters over {result.n_scans} scans; "
          f"wrote association.md, association.csv, association.json into {out}", file=sys.stderr)
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    """Write the cohort report of a maps folder."""
    from .report import build_report

    print(f"cohort report: {build_report(args.maps, args.model, args.uncertain, not args.quiet)}", file=sys.stderr)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Run the simulation study."""
    from .demo import run_demo

    if args.base_lesion is not None and args.base is None:
        raise InputError("--base-lesion is the mask of the --base CT's own lesion: give --base CT as well")
    run_demo(args)
    return 0


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int, file=None,
                  line: Optional[str] = None) -> None:
    """Print a warning as one line, `clam: warning: ...`, without the source location."""
    text = " ".join(str(message).split())
    print(f"clam: warning: {text}", file=file or sys.stderr)


def _how_to_continue(args: argparse.Namespace, argv: Optional[Sequence[str]]) -> str:
    """What to run after an interruption: the same command (with --resume for a training with a checkpoint)."""
    from .train import Checkpoint

    words = [w for w in (sys.argv[1:] if argv is None else argv) if w not in ("--resume", "--restart")]
    if args.command == "map":
        return f"run the same command to continue (finished scans are skipped): {shlex.join(['clam', *words])}"
    if args.command == "train":
        checkpoint = args.checkpoint or args.out / "checkpoint"
        if Checkpoint(checkpoint).exists():
            return (f"the checkpoint in {checkpoint} keeps the last finished epoch; to continue run: "
                    f"{shlex.join(['clam', *words, '--resume'])}")
        return f"no epoch was finished, so there is nothing to resume; start again: {shlex.join(['clam', *words])}"
    return "run the same command again"


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of `clam`."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _show_warning
            return {"demo": cmd_demo, "train": cmd_train, "map": cmd_map, "associate": cmd_associate,
                    "report": cmd_report}[args.command](args)
    except CLAMError as exc:
        print(f"clam {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"clam {args.command}: interrupted; {_how_to_continue(args, argv)}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
