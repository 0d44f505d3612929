"""Tables and figures shared by the tutorial's analyses (``tutorial.py`` on MNIST and synthetic brains,
``tutorial_cohort.py`` on the real 2D cohort): a sweep is ``{setting: evaluation summary}``, the ``summary`` of
``evaluate.yaml``'s ``metrics.json`` (``identity_mean_dice``, ``registered_mean_dice``,
``registered_folding_fraction``, ``registered_std_log_jacobian``, ``pairs``)."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def save_figure(figure, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    print(f"wrote {path}")


def print_sweep(results: dict, setting: str, std_log_jacobian: bool = True) -> None:
    """One markdown row a setting: mean Dice, folded voxels % (and std log det J), then the no-registration Dice."""
    first = next(iter(results.values()))
    columns = ["mean Dice", "folded voxels %"] + (["std log det J"] if std_log_jacobian else [])
    print(f"| {setting} | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, summary in results.items():
        cells = [f"{summary['registered_mean_dice']:.3f}", f"{100 * summary['registered_folding_fraction']:.3f}"]
        if std_log_jacobian:
            cells.append(f"{summary['registered_std_log_jacobian']:.3f}")
        print(f"| {name} | " + " | ".join(cells) + " |")
    print(f"no registration: mean Dice {first['identity_mean_dice']:.3f} ({first['pairs']} test pairs)")


def draw_sweep(results: dict, xlabel: str, title: str, path: Path, second: str | None = None) -> None:
    """Mean Dice against the numeric settings (log axis, the settings as ticks) with the no-registration line;
    ``second`` ("folding" or "std_log_jacobian") adds that on a right-hand axis."""
    settings = [float(setting) for setting in results]
    first = next(iter(results.values()))
    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.semilogx(settings, [r["registered_mean_dice"] for r in results.values()], "o-", label="registered")
    axis.axhline(first["identity_mean_dice"], color="0.6", linestyle="--", label="no registration")
    axis.minorticks_off()
    axis.set_xticks(settings)
    axis.set_xticklabels([f"{setting:g}" for setting in settings])
    axis.set_xlabel(xlabel)
    axis.set_ylabel(f"mean Dice, {first['pairs']} test pairs")
    if second is not None:
        name, key, scale = {
            "folding": ("folded voxels %", "registered_folding_fraction", 100.0),
            "std_log_jacobian": ("std log|J|", "registered_std_log_jacobian", 1.0),
        }[second]
        other = axis.twinx()
        other.semilogx(settings, [scale * r[key] for r in results.values()], "s-", color="C3")
        other.set_ylabel(name, color="C3")
    axis.legend(loc="lower left")
    axis.set_title(title)
    save_figure(figure, path)


def draw_grouped_bars(groups: dict[str, list[float]], names: list[str], ylabel: str, title: str, path: Path) -> None:
    """Bars of mean Dice, one group of bars per name: ``groups`` maps a legend entry to one value a name."""
    figure, axis = plt.subplots(figsize=(max(6.0, 1.6 * len(names)), 3.6))
    x = np.arange(len(names))
    width = 0.8 / len(groups)
    for index, (legend, values) in enumerate(groups.items()):
        axis.bar(x + (index - (len(groups) - 1) / 2) * width, values, width, label=legend)
    axis.set_xticks(x)
    axis.set_xticklabels(names, fontsize=8)
    axis.set_ylim(0, 1)
    axis.set_ylabel(ylabel)
    axis.legend(loc="lower right", fontsize=8)
    axis.set_title(title)
    save_figure(figure, path)


def observed_and_unobserved(summary: dict, observed: list[int], unobserved: list[int] | None = None) -> dict:
    """Mean Dice of an evaluation ``summary`` over the structures a Dice loss saw (``observed``) and over the others
    (``unobserved``, default: every other structure scored), registered and without registration."""
    registered = {int(k): v for k, v in summary["registered_dice_per_label"].items()}
    identity = {int(k): v for k, v in summary["identity_dice_per_label"].items()}
    seen = [k for k in registered if k in observed]
    unseen = [k for k in registered if (k in unobserved if unobserved is not None else k not in observed)]
    return {
        "observed": float(np.mean([registered[k] for k in seen])),
        "unobserved": float(np.mean([registered[k] for k in unseen])),
        "identity_observed": float(np.mean([identity[k] for k in seen])),
        "identity_unobserved": float(np.mean([identity[k] for k in unseen])),
        "observed_labels": seen,
        "unobserved_labels": unseen,
        "folded_percent": 100 * summary["registered_folding_fraction"],
        "pairs": summary["pairs"],
    }


def report_observed_and_unobserved(results: dict, observed: str, unobserved: str, title: str, path: Path) -> None:
    """Table and bars of ``{model: observed_and_unobserved(...)}``: the structures in the loss against the others."""
    first = next(iter(results.values()))
    print(f"| model | Dice, {observed} | Dice, {unobserved} | folded % |")
    print("|---|---|---|---|")
    print(f"| no registration | {first['identity_observed']:.3f} | {first['identity_unobserved']:.3f} | 0.000 |")
    for name, r in results.items():
        print(f"| {name} | {r['observed']:.3f} | {r['unobserved']:.3f} | {r['folded_percent']:.3f} |")
    groups = {
        observed: [first["identity_observed"]] + [r["observed"] for r in results.values()],
        unobserved: [first["identity_unobserved"]] + [r["unobserved"] for r in results.values()],
    }
    names = ["no registration"] + list(results)
    draw_grouped_bars(groups, names, f"mean Dice, {first['pairs']} test pairs", title, path)
