"""Pictures and reports for a user to check what went in and what came out: lung-mask QC, training report."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from .imageio import atomic_path
from .metrics import correctly_assigned

WINDOW = (-1000.0, 400.0)  # HU shown in QC pictures (lung to soft tissue)


def _figure(width: float, height: float):
    """A matplotlib figure drawn by the Agg canvas, without pyplot's global state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Any, path: str | Path) -> Path:
    """Write a figure as PNG atomically."""
    target = Path(path)
    with atomic_path(target) as tmp:
        fig.savefig(str(tmp), format="png")
    return target


def lung_volume_litres(mask: sitk.Image) -> float:
    """Volume of the non-zero voxels of a mask, in litres."""
    count = int(np.count_nonzero(sitk.GetArrayViewFromImage(mask)))
    return count * float(np.prod(mask.GetSpacing())) / 1e6


def qc_picture(image: sitk.Image, mask: sitk.Image, path: str | Path, title: str = "") -> Path:
    """PNG of three orthogonal slices through the mask's centre with the lung-mask outline (index orientation)."""
    ct = sitk.GetArrayViewFromImage(image)
    lung = sitk.GetArrayViewFromImage(mask)
    if ct.ndim != 3:
        raise ValueError("qc_picture needs a 3D image")
    found = np.nonzero(lung.any(axis=(1, 2)))[0]
    if found.size:
        cz = int(np.round(np.average(np.arange(lung.shape[0]), weights=lung.sum(axis=(1, 2)))))
        cy = int(np.round(np.average(np.arange(lung.shape[1]), weights=lung.sum(axis=(0, 2)))))
        cx = int(np.round(np.average(np.arange(lung.shape[2]), weights=lung.sum(axis=(0, 1)))))
    else:
        cz, cy, cx = (n // 2 for n in lung.shape)
    sx, sy, sz = image.GetSpacing()
    nz, ny, nx = ct.shape
    views = [
        ("axial", ct[cz], lung[cz], (0, nx * sx, ny * sy, 0)),
        ("coronal", ct[:, cy, :], lung[:, cy, :], (0, nx * sx, 0, nz * sz)),
        ("sagittal", ct[:, :, cx], lung[:, :, cx], (0, ny * sy, 0, nz * sz)),
    ]
    fig = _figure(12, 4.4)
    for i, (name, values, outline, extent) in enumerate(views):
        ax = fig.add_subplot(1, 3, i + 1)
        origin = "upper" if name == "axial" else "lower"
        ax.imshow(np.asarray(values, dtype=np.float32), cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1],
                  extent=extent, origin=origin, interpolation="nearest")
        if np.any(outline) and not np.all(outline):
            h, w = outline.shape
            xs = np.linspace(extent[0], extent[1], w)
            ys = np.linspace(extent[2], extent[3], h) if origin == "lower" else np.linspace(extent[3], extent[2], h)
            ax.contour(xs, ys, np.asarray(outline, dtype=np.float32), levels=[0.5], colors="red", linewidths=0.8)
        ax.set_title(name, fontsize=9)
        ax.set_axis_off()
    volume = lung_volume_litres(mask)
    fig.suptitle(f"{title}  lung mask {volume:.2f} L  (size {'x'.join(map(str, image.GetSize()))}, "
                 f"spacing {' x '.join(f'{s:.2f}' for s in image.GetSpacing())} mm)", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def training_report(summary: Any, folder: str | Path, scans: Sequence[dict] = (),
                    diagnosis: dict | None = None) -> Path:
    """Loss curves (PNG), the k-selection table, cluster sizes and what the clusters follow (CSV, JSON, Markdown)."""
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    s = summary.to_dict() if hasattr(summary, "to_dict") else dict(summary)
    fig = _figure(11, 4)
    ax = fig.add_subplot(1, 2, 1)
    pre, fine = s.get("pretrain_loss") or [], s.get("finetune_loss") or []
    if pre:
        ax.plot(range(1, len(pre) + 1), pre, label="pretrain (MSE)")
    if fine:
        ax.plot(range(len(pre) + 1, len(pre) + len(fine) + 1), fine, label="fine-tune (0.1 KL + MSE)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if pre or fine:
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    ax.set_title("training loss", fontsize=10)
    ax = fig.add_subplot(1, 2, 2)
    sizes = s.get("cluster_sizes") or []
    ax.bar(range(len(sizes)), sizes, color="tab:blue")
    ax.set_xticks(range(len(sizes)))
    ax.set_xlabel("cluster")
    ax.set_ylabel("scans")
    ax.set_title(f"cluster sizes (k = {s.get('k')}, fine-tune {'kept' if s.get('finetune_kept') else 'rolled back'})",
                 fontsize=10)
    fig.tight_layout()
    _save(fig, out / "loss_curves.png")
    table = s.get("k_table") or []
    columns = ["k", "silhouette", "calinski_harabasz", "davies_bouldin", "inertia", "chosen"]
    with atomic_path(out / "k_selection.csv") as tmp, open(tmp, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for row in table:
            w.writerow([row.get(c) for c in columns])
    lines = ["# CLAM training report", "", f"- scans: {s.get('n_subjects')}, k: {s.get('k')}, device: {s.get('device')}",
             f"- cluster sizes: {sizes}", (f"- silhouette after k-means {_fmt(s.get('silhouette_kmeans'))}, final "
             f"{_fmt(s.get('silhouette_final'))}; fine-tuning {'kept' if s.get('finetune_kept') else 'rolled back'}"),
             *_head_lines(s),
             (f"- autoencoder: reconstructs {_fmt(s.get('reconstruction_r2'))} of how the scans differ from their "
              "mean (R^2; near 0 means it learnt little beyond the mean scan)"),
             f"- training time: {_fmt(s.get('seconds'))} s", "", "## k selection (highest silhouette)", "",
             "| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c)) for c in columns) + " |" for row in table]
    if diagnosis is not None:
        lines += _diagnosis_lines(diagnosis)
    if scans:
        lines += ["", "## scans", "", "| id | status | lung volume (L) | reason |", "|---|---|---|---|"]
        lines += [f"| {r['id']} | {r['status']} | {_fmt(r.get('lung_volume_l'))} | {r.get('reason', '')} |"
                  for r in scans]
    lines += ["", "![loss curves](loss_curves.png)", ""]
    with atomic_path(out / "report.md") as tmp:
        Path(tmp).write_text("\n".join(lines))
    with atomic_path(out / "report.json") as tmp:
        Path(tmp).write_text(json.dumps({"training": s, "scans": list(scans), "diagnosis": diagnosis}, indent=1) + "\n")
    return out


def _head_lines(s: dict) -> list[str]:
    """What the clustering head read, and how many scans it moved from the fine-tuned dense head's clusters."""
    if s.get("head", "dense") == "dense":
        return ["- clustering head: dense embedding (the paper's)"]
    dense, final = s.get("dense_labels") or [], s.get("labels") or []
    moved = ""
    if dense and len(dense) == len(final):
        moved = (f"; {int(np.sum(~correctly_assigned(np.asarray(dense), np.asarray(final))))} scans are in another "
                 "cluster than the dense head's")
    return [f"- clustering head: {s['head']} (silhouette {_fmt(s.get('silhouette_head'))}){moved}"]


def _diagnosis_lines(diagnosis: dict) -> list[str]:
    """Markdown of diagnostics.assess: warnings first, then every descriptor's association with the clusters."""
    lines = ["", "## what the clusters follow", ""]
    lines += [f"- **warning:** {w}" for w in diagnosis["warnings"]] or [
        "- no cluster of outliers, and no descriptor below separates the clusters"]
    for c, ids in diagnosis["outlier_clusters"].items():
        lines.append(f"- cluster {c}: " + ", ".join(f"[{i}](qc/{i}.png)" for i in ids))
    lines += ["", "Descriptors every scan carries that no finding should drive. Numbers: epsilon^2 is the share of "
              "their ranks' variance between clusters (0 none, 1 all), p a permutation p-value, per cluster the "
              "median. Categories: Cramer's V (0 none, 1 each cluster its own level), p of chi-square or Fisher's exact test, per cluster "
              "the commonest level.", "",
              "| descriptor | effect | p | per cluster | scans |", "|---|---|---|---|---|"]
    for a in diagnosis["associations"]:
        per = ", ".join(f"{c}: {v}" for c, v in a["per_cluster"].items())
        lines.append(f"| {a['name']} | {a['effect_name']} {a['effect']:.2f} | {a['p']:.3g} | {per} | {a['n']} |")
    together = diagnosis.get("predictability")
    if together:
        lines += ["", f"All {len(together['descriptors'])} numeric descriptors together predict the cluster with balanced "
                  f"accuracy {together['balanced_accuracy']:.2f} (chance {1 / together['k']:.2f}, permutation p "
                  f"{together['p']:.3g}; 3 nearest neighbours, {together['folds']}-fold cross-validation)."]
    return lines


def _fmt(value: Any) -> str:
    """Short text of a number (or anything)."""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.4g}"
    return "" if value is None else str(value)
