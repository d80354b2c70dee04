"""`clam demo`: the simulation study (phantom cohorts, clustering at k = true and true +- 1, map localisation)."""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from .estimator import CLAMModel
from .explain import DEFAULT_METHOD, METHODS, ExplainContext, explain, normalise_map
from .imageio import atomic_path, read_image, write_image
from .metrics import clustering_scores, localisation_scores
from .model import Architecture, ClusterNet, default_head, default_smooth
from .preprocess import Prepared, PreprocessConfig, Preprocessor
from .simulate import Cohort, ScenarioParams, make_cohort
from .train import TrainConfig, Trainer, as_batch

TRUE_K = 2
MAP_METHODS = [DEFAULT_METHOD] + [m for m in METHODS if m != DEFAULT_METHOD]
SWEEP_LEVELS = (0.0, 1.0, 2.0, 3.0)


@dataclass
class Prepped:
    """A cohort on the model grid: inputs, lung masks and lesion masks."""

    cohort: Cohort
    pre: Preprocessor
    prepared: list[Prepared]
    arrays: np.ndarray
    lesions: np.ndarray
    lungs: np.ndarray


def _scenario_params(scenario: str, args: argparse.Namespace) -> ScenarioParams:
    """The scenario's default lesions, with the diameters given on the command line."""
    params = ScenarioParams.default(scenario)
    wanted = [args.small_mm, args.large_mm] if scenario == "size" else [args.lesion_mm] * len(params.clusters)
    clusters = tuple(spec if d is None else replace(spec, diameter_mm=(0.95 * d, 1.05 * d))
                     for spec, d in zip(params.clusters, wanted))
    return replace(params, clusters=clusters)


def _cohort(scenario: str, args: argparse.Namespace, variation: float, seed: int) -> Cohort:
    base = read_image(args.base) if getattr(args, "base", None) else None
    lesion = read_image(args.base_lesion) if base is not None and getattr(args, "base_lesion", None) else None
    return make_cohort(scenario, n_per_cluster=args.subjects, seed=seed, anatomy_variation=variation,
                       params=_scenario_params(scenario, args), base=base, base_lesion=lesion)


def _preprocess_config(args: argparse.Namespace, register: str) -> PreprocessConfig:
    """The demo's preprocessing settings."""
    return PreprocessConfig(grid=args.grid, ndim=3, register=register, closing_mm=args.lung_closing,
                            representation=args.representation, vessel_mm=args.vessel_mm)


def _smooth(args: argparse.Namespace) -> float:
    """Input smoothing asked for, or the default for the grid."""
    return default_smooth(args.grid) if args.smooth is None else args.smooth


def _arch(args: argparse.Namespace) -> Architecture:
    """The demo's network architecture, with as many input channels as the representation gives."""
    channels = _preprocess_config(args, "none").channels
    return Architecture(ndim=3, grid=args.grid, in_channels=channels, smooth=_smooth(args),
                        head=args.head or default_head(3))


def _shown(arrays: np.ndarray) -> np.ndarray:
    """What figures show of model inputs (N, *grid): the input, or its channels summed."""
    return arrays.sum(1) if arrays.ndim == 5 else arrays


def _prep(cohort: Cohort, args: argparse.Namespace, register: str) -> Prepped:
    images = [s.image for s in cohort.subjects]
    pre = Preprocessor(_preprocess_config(args, register))
    prepared = pre.fit_transform(images)
    lesions = np.stack([pre.grid_mask(s.lesion, p) for s, p in zip(cohort.subjects, prepared)])
    return Prepped(cohort, pre, prepared, np.stack([p.array for p in prepared]), lesions,
                   np.stack([p.lung for p in prepared]))


def _config(args: argparse.Namespace, k: int) -> TrainConfig:
    return TrainConfig(k=k, restarts=args.restarts, pretrain_epochs=args.epochs or 60, finetune_epochs=30,
                       batch_size=8, seed=args.seed, device=args.device)


def _maps(net: ClusterNet, data: Prepped, labels: np.ndarray, method: str, seed: int) -> tuple[np.ndarray, float]:
    """Map of each subject's assigned cluster on the grid (N, *grid) and seconds per subject."""
    x = as_batch(data.arrays, net.arch)
    baseline = as_batch(data.arrays.mean(0)[None], net.arch)
    present_only = data.pre.config.representation == "findings"
    out, start = [], time.perf_counter()
    for i in range(len(x)):
        ctx = ExplainContext(baseline=baseline, seed=seed + i, present_only=present_only)
        _, m = explain(net, x[i : i + 1], method, ctx)
        out.append(m[0, labels[i]])
    return np.stack(out), (time.perf_counter() - start) / len(x)


def _scenario(scenario: str, args: argparse.Namespace, ks: list[int], out: Path, bar: tqdm) -> dict[str, Any]:
    """Clustering and localisation rows for one scenario, plus its files."""
    bar.set_description(f"{scenario}: phantoms")
    data = _prep(_cohort(scenario, args, args.anatomy_variation, args.seed), args, args.register)
    arch = _arch(args)
    verbose = not args.quiet
    bar.set_description(f"{scenario}: pretraining")
    pretrained = Trainer(arch, _config(args, TRUE_K), verbose=verbose).pretrained(data.arrays)
    y = data.cohort.labels
    tol = args.grid // arch.feature_grid
    rows, loc_rows, examples = [], [], {}
    for k in ks:
        bar.set_description(f"{scenario}: k={k}")
        net, summary = Trainer(arch, _config(args, k), verbose=verbose).fit(data.arrays, pretrained)
        labels = np.array(summary.labels)
        scores = clustering_scores(y, labels)
        rows.append({"scenario": scenario, "k": k, "true_k": TRUE_K, **scores,
                     "cluster_sizes": summary.cluster_sizes, "finetune_kept": summary.finetune_kept,
                     "silhouette": summary.silhouette_final, "restart_seed": next(r["seed"] for r in summary.restarts if r["best"])})
        for method in MAP_METHODS:
            maps, secs = _maps(net, data, labels, method, args.seed)
            loc = localisation_scores(list(maps), list(data.lesions), list(data.lungs), tolerance=tol)
            loc_rows.append({"scenario": scenario, "k": k, "method": method, "seconds_per_subject": secs, **loc})
            if k == TRUE_K:
                examples[method] = maps
        bar.update()
        if k == TRUE_K:
            true_net, true_labels, true_summary = net, labels, summary
    if args.save_model is not None and scenario == args.scenarios[0]:
        _save_model(args, scenario, data, true_net, true_summary)
    _write_subjects(data, true_labels, examples, out / "maps" / scenario)
    _figures(scenario, data, true_labels, examples, out / "figures")
    return {"clustering": rows, "localisation": loc_rows, "pretrain_loss": true_summary.pretrain_loss,
            "restarts": true_summary.restarts,
            "cohort": data.cohort.params}


def _save_model(args: argparse.Namespace, scenario: str, data: Prepped, net: ClusterNet, summary) -> None:
    """Save the scenario's model at the true k as a bundle (the demo bundle of the Slicer module)."""
    card = {
        "trained_on": f"{len(data.arrays)} simulated chest CT phantoms, scenario '{scenario}' (clam demo, seed "
                      f"{args.seed}, anatomy variation {args.anatomy_variation:g})",
        "intended_use": "trying CLAM out: the Slicer module, `clam map` and the console on any chest CT",
        "not_for": "clinical use or research conclusions: it has never seen a real scan",
        "cohort": data.cohort.params,
    }
    model = CLAMModel.from_parts(net, data.pre, data.arrays.mean(0), summary, _config(args, TRUE_K), card)
    model.save(args.save_model)


def _write_subjects(data: Prepped, labels: np.ndarray, maps: dict[str, np.ndarray], folder: Path) -> None:
    """CT, lesion mask and the default and faithful maps of the assigned cluster, as NRRD on each native grid."""
    for i, (subject, prep) in enumerate(zip(data.cohort.subjects, data.prepared)):
        sub = folder / subject.id
        write_image(subject.image, sub / "ct.nrrd")
        write_image(subject.lesion, sub / "lesion.nrrd")
        for method in dict.fromkeys([DEFAULT_METHOD, "clam"]):
            native = data.pre.to_native(normalise_map(maps[method][i]), prep)
            # 0..1 in steps of 1/255: below what a colour map shows, and 40 times smaller compressed
            steps = sitk.GetImageFromArray(np.round(sitk.GetArrayViewFromImage(native) * 255) / 255)
            steps.CopyInformation(native)
            write_image(sitk.Cast(steps, sitk.sitkFloat32), sub / f"{method}_cluster{int(labels[i])}.nrrd")


def _figures(scenario: str, data: Prepped, labels: np.ndarray, maps: dict[str, np.ndarray], folder: Path) -> None:
    """Example subjects with lesion outline and map overlays, and cluster-average maps, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    y = data.cohort.labels
    picks = [i for c in np.unique(y) for i in np.flatnonzero(y == c)[:2]]
    shown = _shown(data.arrays)
    methods = list(maps)
    fig, axes = plt.subplots(len(picks), len(methods) + 1, figsize=(2.2 * (len(methods) + 1), 2.3 * len(picks)))
    for r, i in enumerate(picks):
        z = int(np.argmax(data.lesions[i].sum(axis=(1, 2)))) if data.lesions[i].any() else shown.shape[1] // 2
        axes[r, 0].imshow(shown[i, z], cmap="gray")
        axes[r, 0].set_title(f"{data.cohort.subjects[i].id}\ntrue {y[i]}, cluster {labels[i]}", fontsize=7)
        for c, method in enumerate(methods, start=1):
            ax = axes[r, c]
            ax.imshow(shown[i, z], cmap="gray")
            m = normalise_map(maps[method][i]) * data.lungs[i]
            ax.imshow(np.ma.masked_less(m[z], 0.05), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
            if r == 0:
                ax.set_title(method + (" (default)" if method == DEFAULT_METHOD else ""), fontsize=8)
        for ax in axes[r]:
            if data.lesions[i, z].any():
                ax.contour(data.lesions[i, z], levels=[0.5], colors="cyan", linewidths=0.8)
            ax.axis("off")
    fig.suptitle(f"{scenario}: axial slice through the lesion (cyan), map of the assigned cluster", fontsize=9)
    fig.tight_layout()
    with atomic_path(folder / f"{scenario}_examples.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

    default = maps[DEFAULT_METHOD]
    ks = np.unique(labels)
    fig, axes = plt.subplots(1, len(ks), figsize=(3 * len(ks), 3.2), squeeze=False)
    mean_input = shown.mean(0)
    for ax, c in zip(axes[0], ks):
        avg = np.mean([normalise_map(default[i]) * data.lungs[i] for i in np.flatnonzero(labels == c)], axis=0)
        z = int(np.argmax(avg.sum(axis=(1, 2))))
        ax.imshow(mean_input[z], cmap="gray")
        ax.imshow(np.ma.masked_less(avg[z] / max(avg.max(), 1e-8), 0.05), cmap="inferno", alpha=0.6, vmin=0, vmax=1)
        lesion_share = data.lesions[labels == c].mean(0)[z]
        if lesion_share.max() > 0:
            ax.contour(lesion_share, levels=[0.1], colors="cyan", linewidths=0.8)
        ax.set_title(f"cluster {c} (n={int((labels == c).sum())}), slice {z}", fontsize=8)
        ax.axis("off")
    fig.suptitle(f"{scenario}: cluster-average {DEFAULT_METHOD} map; cyan: where 10% of the cluster's lesions lie",
                 fontsize=8)
    fig.tight_layout()
    with atomic_path(folder / f"{scenario}_cluster_average.png") as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _sweep(args: argparse.Namespace, bar: tqdm) -> list[dict[str, Any]]:
    """Accuracy at the true k against anatomy variation, with and without affine template registration."""
    rows = []
    arch = _arch(args)
    for level in SWEEP_LEVELS:
        cohort = _cohort("location", args, level, args.seed + 1000)
        for register in ("none", "affine"):
            bar.set_description(f"sweep: variation {level:g}, registration {register}")
            data = _prep(cohort, args, register)
            _, summary = Trainer(arch, _config(args, TRUE_K), verbose=False).fit(data.arrays)
            rows.append({"scenario": "location", "anatomy_variation": level, "register": register,
                         **clustering_scores(data.cohort.labels, np.array(summary.labels))})
            bar.update()
    return rows


def scored(row: dict[str, Any]) -> str:
    """Subjects scored out of all, for a localisation row ("?" for rows from before the count was kept)."""
    if "n_scored" not in row:
        return "?"
    return f"{row['n_scored']}/{row['n_scored'] + row['n_skipped']}"


def _markdown(results: dict[str, Any]) -> str:
    s = results["settings"]
    lines = [
        "# CLAM simulation study",
        "",
        f"Grid {s['grid']}^3, {s['subjects_per_cluster']} subjects per cluster, true k = {TRUE_K}, seed {s['seed']}, "
        f"anatomy variation {s['anatomy_variation']:g}, input smoothing sigma {s['smooth']:g} voxels, {s.get('head', 'dense')} clustering head, {s['restarts']} autoencoder "
        f"restarts, registration {s['register']}; {s['seconds']:.0f} s on {s['machine']}.",
        "Subjects: " + (f"deformed copies of the real CT {s['base']} with inserted lesions"
                        + (f" (its own lesion, {s['base_lesion']}, replaced by lung)." if s.get("base_lesion") else ".")
                        if s["base"] else "simulated chest phantoms."),
        "",
        "## Clustering",
        "",
        "| scenario | k | accuracy | ARI | NMI | cluster sizes |",
        "|---|---|---|---|---|---|",
    ]
    for r in results["clustering"]:
        lines.append(f"| {r['scenario']} | {r['k']} | {r['accuracy']:.3f} | {r['ari']:.3f} | {r['nmi']:.3f} | "
                     f"{r['cluster_sizes']} |")
    lines += ["", f"Restarts at k = {TRUE_K}: silhouette of each autoencoder's k-means partition (the highest is kept, *) "
              "and the share of the subjects' variation about their mean that the autoencoder reconstructs (R^2).",
              "", "| scenario | " + " | ".join(f"seed {r['seed']}" for r in next(iter(results["restarts"].values())))
              + " |", "|---|" + "---|" * s["restarts"]]
    for scenario, rows in results["restarts"].items():
        lines.append(f"| {scenario} | " + " | ".join(f"{r['silhouette']:.3f}" + ("*" if r["best"] else "")
                                                     + f" (R^2 {r['reconstruction_r2']:.2f})" for r in rows) + " |")
    lines += ["", "## Localisation of the assigned cluster's map (inside the lungs)", "",
              f"Pointing game tolerance: one voxel of the activation grid ({s['tolerance']} model voxels). "
              "Mass ratio: share of map mass in the lesion over the lesion's share of the lung (1 = chance). "
              "Scored: subjects whose lesion covers at least half a model voxel (smaller lesions vanish from the "
              "model grid and are not scored).", "",
              "| scenario | k | method | pointing game | ROC-AUC | mass in lesion | mass ratio | scored | s / subject |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in results["localisation"]:
        name = r["method"] + (" (default)" if r["method"] == DEFAULT_METHOD else "")
        lines.append(f"| {r['scenario']} | {r['k']} | {name} | {r['pointing_game']:.2f} | {r['auc']:.3f} | "
                     f"{r['mass_share']:.3f} | {r['mass_ratio']:.1f} | {scored(r)} | {r['seconds_per_subject']:.3f} |")
    if results["sweep"]:
        lines += ["", "## Accuracy against anatomy variation (location scenario, k = 2)", "",
                  "| anatomy variation | registration | accuracy | ARI | NMI |", "|---|---|---|---|---|"]
        for r in results["sweep"]:
            lines.append(f"| {r['anatomy_variation']:g} | {r['register']} | {r['accuracy']:.3f} | {r['ari']:.3f} | "
                         f"{r['nmi']:.3f} |")
    return "\n".join(lines) + "\n"


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """Run the study and write the table, maps and figures into args.out."""
    start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    scenarios = args.scenarios[:1] if args.quick else args.scenarios
    ks = [TRUE_K] if args.quick else [TRUE_K - 1, TRUE_K, TRUE_K + 1]
    sweep = not (args.quick or args.no_sweep)
    total = len(scenarios) * len(ks) + (len(SWEEP_LEVELS) * 2 if sweep else 0)
    results: dict[str, Any] = {"clustering": [], "localisation": [], "sweep": [], "pretrain_loss": {}, "restarts": {},
                               "cohorts": {}}
    with tqdm(total=total, desc="clam demo", disable=args.quiet, dynamic_ncols=True) as bar:
        for scenario in scenarios:
            r = _scenario(scenario, args, ks, out, bar)
            results["clustering"] += r["clustering"]
            results["localisation"] += r["localisation"]
            results["pretrain_loss"][scenario] = r["pretrain_loss"]
            results["restarts"][scenario] = r["restarts"]
            results["cohorts"][scenario] = r["cohort"]
        if sweep:
            results["sweep"] = _sweep(args, bar)
    results["settings"] = {
        "grid": args.grid, "subjects_per_cluster": args.subjects, "seed": args.seed,
        "anatomy_variation": args.anatomy_variation, "base": str(args.base) if args.base else None,
        "base_lesion": str(args.base_lesion) if args.base and args.base_lesion else None,
        "scenarios": scenarios, "k_values": ks, "true_k": TRUE_K, "restarts": args.restarts,
        "smooth": _smooth(args), "head": _arch(args).head, "register": args.register, "lung_closing_mm": args.lung_closing,
        "representation": args.representation, "vessel_mm": args.vessel_mm,
        "default_method": DEFAULT_METHOD, "tolerance": args.grid // Architecture(grid=args.grid).feature_grid,
        "seconds": time.perf_counter() - start, "machine": f"{platform.machine()} {platform.system()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}", "python": sys.version.split()[0],
    }
    with atomic_path(out / "results.json") as tmp:
        Path(tmp).write_text(json.dumps(results, indent=2, default=float) + "\n")
    with atomic_path(out / "results.md") as tmp:
        Path(tmp).write_text(_markdown(results))
    print(_markdown(results))
    print(f"\nResults: {out / 'results.md'} and {out / 'results.json'}\nMaps (NRRD, native grids): {out / 'maps'}\n"
          f"Figures: {out / 'figures'}\nDone in {results['settings']['seconds']:.0f} s.")
    return results
