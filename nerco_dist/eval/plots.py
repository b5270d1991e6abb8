"""Figures of the NerCo paper: F1 against sentence length (Figure 3) and t-SNE of token representations.

matplotlib and scikit-learn are optional (``nerco-dist[plots]``) and imported only when a plot is drawn.
Figures are built on the Agg canvas directly, not through pyplot, so plotting never touches a global
backend or leaks open figures in a long training process.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from nerco_dist.data.tags import OUTSIDE, split_tag
from nerco_dist.atomic import atomic_path
from nerco_dist.eval.metrics import LengthRow

_INSTALL_HINT = "pip install nerco-dist[plots]"
_MARKERS = {"B": "^", "I": "o", "M": "s", "E": "v", "S": "*"}


def _new_figure(figsize: tuple[float, float]):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise ImportError(f"plotting needs matplotlib: {_INSTALL_HINT}") from exc
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path_png: str | os.PathLike) -> None:
    with atomic_path(path_png) as tmp:
        fig.savefig(tmp, format="png", dpi=150, bbox_inches="tight")


def plot_f1_by_length(rows_by_system: dict[str, Sequence[LengthRow]], path_png: str | os.PathLike,
                      title: str = "F1 by sentence length") -> None:
    """One F1 line per system over the length buckets, sentence counts as grey bars on a second axis and
    under each bucket's label. Buckets without a sentence are left out (an F1 of 0 there would be a false
    drop).

    All systems must share buckets and sentence counts: comparing F1 over different test sets would mislead.
    """
    if not rows_by_system:
        raise ValueError("no systems to plot")
    systems = list(rows_by_system)
    first = rows_by_system[systems[0]]
    layout = [(r.bucket, r.sentences) for r in first]
    for name in systems[1:]:
        if [(r.bucket, r.sentences) for r in rows_by_system[name]] != layout:
            raise ValueError(f"system {name!r} has other buckets or sentence counts than {systems[0]!r}")

    shown = [k for k, r in enumerate(first) if r.sentences > 0]
    if not shown:
        raise ValueError("no sentence in any length bucket")
    fig = _new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    counts_ax = ax.twinx()
    x = np.arange(len(shown))
    counts_ax.bar(x, [first[k].sentences for k in shown], width=0.6, color="0.85", label="sentences")
    counts_ax.set_ylabel("sentences")
    ax.set_zorder(counts_ax.get_zorder() + 1)  # lines above the bars
    ax.patch.set_visible(False)
    for name in systems:
        ax.plot(x, [100 * rows_by_system[name][k].f1 for k in shown], marker="o", label=name)
    ax.set_xticks(x, [f"{first[k].bucket}\nn={first[k].sentences}" for k in shown])
    ax.set_title(title)
    ax.set_xlabel("sentence length (characters)")
    ax.set_ylabel("F1 (%)")
    ax.grid(axis="y", alpha=0.3)
    lines, names = ax.get_legend_handles_labels()
    bars, bar_names = counts_ax.get_legend_handles_labels()
    ax.legend(lines + bars, names + bar_names, loc="lower left")
    _save_png(fig, path_png)


def plot_tsne(
    features: np.ndarray,
    labels: Sequence[str],
    path_png: str | os.PathLike,
    title: str,
    seed: int = 0,
) -> None:
    """2-D t-SNE of token representations; one hue per entity type, one marker per tag position (B/I).

    Shows whether contrastive training pulls tokens of one type together (NerCo paper, t-SNE figure).
    """
    features = np.asarray(features)
    if features.ndim != 2 or features.shape[0] != len(labels):
        raise ValueError(f"features of shape {features.shape} do not match {len(labels)} labels")
    if features.shape[0] < 4:
        raise ValueError(f"t-SNE needs at least 4 points, got {features.shape[0]}")
    parsed = [split_tag(t) for t in labels]
    try:
        from sklearn.manifold import TSNE
    except ImportError as exc:
        raise ImportError(f"t-SNE plots need scikit-learn: {_INSTALL_HINT}") from exc
    fig = _new_figure((7.0, 6.0))  # fails early, before the costly embedding, if matplotlib is missing

    perplexity = min(30.0, (features.shape[0] - 1) / 3)  # sklearn requires perplexity < n_samples
    xy = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(
        features.astype(np.float64)
    )
    ax = fig.add_subplot()
    _scatter_by_tag(ax, xy, parsed)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize="small")
    _save_png(fig, path_png)


def _scatter_by_tag(ax, xy: np.ndarray, parsed: Sequence[tuple[str, str | None]]) -> None:
    """One scatter group per tag: the entity type's hue and the position's marker; O as small grey dots."""
    from matplotlib import colormaps

    types = sorted({etype for _, etype in parsed if etype is not None})
    palette = colormaps["tab10" if len(types) <= 10 else "tab20"]
    hue = {etype: palette(k % palette.N) for k, etype in enumerate(types)}
    groups = sorted({(etype or "", prefix) for prefix, etype in parsed})
    for etype, prefix in groups:
        idx = [i for i, (p, t) in enumerate(parsed) if p == prefix and (t or "") == etype]
        if prefix == OUTSIDE:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=6, c="0.7", marker=".", label=OUTSIDE)
        else:
            ax.scatter(xy[idx, 0], xy[idx, 1], s=18, color=hue[etype], marker=_MARKERS[prefix],
                       label=f"{prefix}-{etype}")


def plot_seed_scores(scores: dict[str, Sequence[float]], path_png: str | os.PathLike, title: str,
                     ylabel: str = "test F1 (%)") -> None:
    """Each system's per-seed scores as dots beside its mean ± std: a difference of means reads as signal
    only where it is large against the seeds' own spread."""
    if not scores or any(len(v) == 0 for v in scores.values()):
        raise ValueError("every system needs at least one score")
    fig = _new_figure((1.2 + 1.1 * len(scores), 4.5))
    ax = fig.add_subplot()
    for x, (name, values) in enumerate(scores.items()):
        values = np.asarray(values, dtype=np.float64)
        std = values.std(ddof=1) if len(values) > 1 else 0.0
        ax.errorbar([x], [values.mean()], yerr=[std], fmt="_", markersize=24, capsize=6, color="black", zorder=2)
        ax.scatter(np.full(len(values), x) + np.linspace(-0.12, 0.12, len(values)), values, s=28, zorder=3)
        ax.annotate(f"{values.mean():.2f}", (x, values.mean()), xytext=(14, 0), textcoords="offset points",
                    va="center", fontsize="small")
    ax.set_xticks(range(len(scores)), list(scores), rotation=20, ha="right")
    ax.set_xlim(-0.6, len(scores) - 0.4)
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path_png)


def plot_lines(series: dict[str, Sequence[float]], path_png: str | os.PathLike, title: str, xlabel: str,
               ylabel: str) -> None:
    """One line per named series over 1, 2, ... (epochs, rounds): how a measurement moves as training goes on."""
    if not series or any(len(v) == 0 for v in series.values()):
        raise ValueError("every series needs at least one value")
    fig = _new_figure((7.0, 4.5))
    ax = fig.add_subplot()
    for name, values in series.items():
        ax.plot(range(1, len(values) + 1), values, marker="o", label=name)
    from matplotlib.ticker import MaxNLocator  # importable once _new_figure found matplotlib

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no tick at 1.5
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    _save_png(fig, path_png)
