"""Curves with uncertainty: per group the mean over seeds with a ± std or seeded bootstrap band,
one colour per group in every figure, saved as PNG and PDF."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from scipy import stats  # noqa: E402

from src.report.runs import Run  # noqa: E402

BOOTSTRAP_SEED = 0  # bootstrap bands are seeded: the same runs give the same report
BOOTSTRAP_RESAMPLES = 2000


@dataclass
class Band:
    """A group's curve: x (round or mean cumulative MB), the mean over seeds, and the band."""

    x: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def group_colours(names) -> dict[str, tuple]:
    """One colour per group, from the sorted names, so it is the same in every figure."""
    palette = plt.get_cmap("tab10").colors
    return {name: palette[i % len(palette)] for i, name in enumerate(sorted(names))}


X_UNIT = {"comm/total_bytes": 1e6, "time/sim_total_s": 1.0}  # MB; simulated seconds


def points_by_round(runs: list[Run], key: str, x_key: str) -> dict[float, list[tuple]]:
    """(x, metric) of every seed at each evaluated round; x in MB for comm/total_bytes, in
    simulated seconds for time/sim_total_s."""
    by_round: dict[float, list[tuple]] = {}
    for run in runs:
        for row in run.rows:
            y = row.get(key, math.nan)
            if math.isnan(y):
                continue
            x = row["round"] if x_key == "round" else row.get(x_key, math.nan) / X_UNIT[x_key]
            by_round.setdefault(row["round"], []).append((x, y))
    return by_round


def bootstrap_interval(values: np.ndarray) -> tuple[float, float]:
    """Seeded 95 % bootstrap interval of the mean: BCa, or the percentile interval where BCa is
    undefined (NaN ends on degenerate resamples); the mean itself where the values cannot vary."""
    if len(values) < 2 or np.ptp(values) == 0:
        return float(np.mean(values)), float(np.mean(values))
    for method in ("BCa", "percentile"):
        low, high = stats.bootstrap(
            (values,),
            np.mean,
            n_resamples=BOOTSTRAP_RESAMPLES,
            confidence_level=0.95,
            method=method,
            rng=np.random.default_rng(BOOTSTRAP_SEED),
        ).confidence_interval
        if not (math.isnan(low) or math.isnan(high)):
            break
    return float(low), float(high)


def curve_band(runs: list[Run], key: str, x_key: str = "round", ci: bool = False) -> Band:
    """Mean over seeds per evaluated round, with ± std (sample std) or the bootstrap CI."""
    by_round = points_by_round(runs, key, x_key)
    x, mean, low, high = [], [], [], []
    for r in sorted(by_round):
        xs = np.array([p[0] for p in by_round[r]])
        ys = np.array([p[1] for p in by_round[r]])
        x.append(float(np.mean(xs)))
        mean.append(float(np.mean(ys)))
        if ci:
            lo, hi = bootstrap_interval(ys)
        else:
            spread = float(np.std(ys, ddof=1)) if len(ys) > 1 else 0.0
            lo, hi = mean[-1] - spread, mean[-1] + spread
        low.append(lo)
        high.append(hi)
    return Band(*(np.array(a) for a in (x, mean, low, high)))


def save_figure(figure, png: Path) -> None:
    """The figure as PNG and, beside it, as PDF (for papers)."""
    if figure.get_layout_engine() is None:
        figure.tight_layout()
    figure.savefig(png, dpi=100)
    figure.savefig(png.with_suffix(".pdf"))
    plt.close(figure)


def plot_curves(
    groups: dict[str, list[Run]],
    x_key: str,
    xlabel: str,
    path: Path,
    colours: dict[str, tuple] | None = None,
    ci: bool = False,
) -> dict[tuple[str, str], Band]:
    """Mean accuracy per group (over its seeds) with a shaded band against rounds or MB, one
    panel per accuracy; returns the plotted bands by (accuracy, group)."""
    colours = colours or group_colours(groups)
    bands = {}
    figure, axes = plt.subplots(1, 2, figsize=(11, 4.5), squeeze=False, layout="constrained")
    for ax, key in zip(axes[0], ("val/global_acc", "val/personal_acc"), strict=True):
        for name, runs in groups.items():
            band = bands[key, name] = curve_band(runs, key, x_key, ci)
            colour = colours[name]
            ax.plot(band.x, band.mean, marker="o", markersize=3, label=name, color=colour)
            ax.fill_between(band.x, band.low, band.high, color=colour, alpha=0.2, linewidth=0)
        if x_key == "round":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        elif x_key == "comm/total_bytes":
            ax.set_xscale("log")  # algorithms differ by orders of magnitude in bytes sent
        ax.set_xlabel(xlabel)
        ax.set_ylabel(key + (" (95 % bootstrap CI)" if ci else " (± std)"))
        ax.grid(alpha=0.3)
    # below the panels, not over the curves: long group names would cover them
    handles, names = axes[0][0].get_legend_handles_labels()
    figure.legend(handles, names, loc="outside lower center", ncol=min(len(names), 3), fontsize=7)
    save_figure(figure, path)
    return bands


def plot_clients(
    groups: dict[str, list[Run]], path: Path, colours: dict[str, tuple] | None = None
) -> None:
    """Distribution of the final per-client personal accuracy, pooled over each group's seeds."""
    colours = colours or group_colours(groups)
    names = [name for name, runs in groups.items() if any(r.per_client_acc for r in runs)]
    figure, ax = plt.subplots(figsize=(max(5, 1.6 * len(names)), 4))
    data = [[acc for run in groups[name] for acc in run.per_client_acc] for name in names]
    if data:
        # a black median line: visible on every fill colour
        boxes = ax.boxplot(
            data, patch_artist=True, medianprops={"color": "black", "linewidth": 1.5}
        )
        for box, name in zip(boxes["boxes"], names, strict=True):
            box.set_facecolor(colours[name])
            box.set_alpha(0.6)
        ax.set_xticks(range(1, len(names) + 1), names, rotation=20, ha="right", fontsize=7)
    ax.set_ylabel("final personal accuracy per client")
    ax.grid(alpha=0.3, axis="y")
    save_figure(figure, path)


def plot_client_spread(
    groups: dict[str, list[Run]], path: Path, colours: dict[str, tuple] | None = None
) -> bool:
    """Per-client personal accuracy over the rounds (clients.csv): per group the median client
    and a band from the 10th to the 90th percentile of the clients, pooled over the seeds.
    False (nothing drawn) when no run has clients.csv."""
    colours = colours or group_colours(groups)
    figure, ax = plt.subplots(figsize=(7, 4.5), layout="constrained")
    drawn = False
    for name, runs in groups.items():
        pooled: dict[int, list[float]] = {}
        for run in runs:
            for round_done, accs in run.client_acc_by_round().items():
                pooled.setdefault(round_done, []).extend(accs)
        if not pooled:
            continue
        rounds = sorted(pooled)
        low, mid, high = (
            np.array([np.percentile(pooled[r], q) for r in rounds]) for q in (10, 50, 90)
        )
        ax.plot(rounds, mid, marker="o", markersize=3, label=name, color=colours[name])
        ax.fill_between(rounds, low, high, color=colours[name], alpha=0.2, linewidth=0)
        drawn = True
    if drawn:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("round")
        ax.set_ylabel("personal accuracy per client\n(median, 10th-90th percentile)")
        ax.grid(alpha=0.3)
        handles, names = ax.get_legend_handles_labels()
        figure.legend(
            handles, names, loc="outside lower center", ncol=min(len(names), 3), fontsize=7
        )
        save_figure(figure, path)
    else:
        plt.close(figure)
    return drawn


def write_plots(groups: dict[str, list[Run]], out: Path, ci: bool = False) -> list[str]:
    """Every figure as PNG and PDF, group colours shared; returns the PNG names."""
    colours = group_colours(groups)
    plots = {
        "accuracy_vs_round.png": lambda p: plot_curves(groups, "round", "round", p, colours, ci),
        "accuracy_vs_mb.png": lambda p: plot_curves(
            groups, "comm/total_bytes", "cumulative MB sent", p, colours, ci
        ),
        "per_client_accuracy.png": lambda p: plot_clients(groups, p, colours),
    }
    for name, draw in plots.items():
        draw(out / name)
    names = list(plots)
    if any("time/sim_total_s" in row for runs in groups.values() for r in runs for row in r.rows):
        plot_curves(groups, "time/sim_total_s", "simulated seconds (system=...)",
                    out / "accuracy_vs_sim_time.png", colours, ci)  # fmt: skip
        names.append("accuracy_vs_sim_time.png")
    if plot_client_spread(groups, out / "client_accuracy_vs_round.png", colours):
        names.append("client_accuracy_vs_round.png")
    return names
