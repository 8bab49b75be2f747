"""Plots of rate–distortion curves, bit allocations, the additivity check and per-layer smoothing choices (matplotlib, Agg)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from jaxquant.errors import ConfigError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise ConfigError("plots need matplotlib: pip install matplotlib (or 'jaxquant[notebooks]')") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str | os.PathLike) -> Path:
    """Lay out, write as PNG and close a figure."""
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(curves, path: str | os.PathLike, distortion: str = "mse") -> Path:
    """Distortion vs bit width of every site (log scale), weights and activations side by
    side, averaged over timestep groups; a line per site, coloured by depth in the network."""
    plt = _pyplot()
    kinds = [k for k in ("weight", "act") if curves.of_kind(k)]
    fig, axes = plt.subplots(1, len(kinds), figsize=(6.5 * len(kinds), 4.5), squeeze=False)
    for ax, kind in zip(axes[0], kinds):
        cs = curves.of_kind(kind)
        cmap = plt.get_cmap("viridis")
        for i, c in enumerate(cs):
            d = curves.distortion(c.site.key, distortion).mean(axis=0)
            ax.plot(c.bits, np.maximum(d, 1e-12), color=cmap(i / max(len(cs) - 1, 1)), lw=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.set_xlabel("bits")
        ax.set_ylabel(f"output distortion ({distortion})")
        ax.set_title(f"{'weights' if kind == 'weight' else 'activations'}: {len(cs)} sites "
                     f"(colour: depth), mean over {curves.groups} group(s)")
        ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_allocation(plan, curves, path: str | os.PathLike) -> Path:
    """Bits chosen per layer (as the seed's Figure 9): weight bits as bars, and the
    activation bits per timestep group as a heat map (rows: groups)."""
    plt = _pyplot()
    wc = curves.of_kind("weight")
    ac = [c for c in curves.of_kind("act") if c.site.name in plan.act_bits]
    rows = 2 if ac else 1
    fig, axes = plt.subplots(rows, 1, figsize=(max(8, 0.12 * max(len(wc), len(ac))), 3.2 * rows + 0.6), squeeze=False)
    ax = axes[0, 0]
    wb = [plan.weight_bits[c.site.name] for c in wc]
    if plan.per_group_weights:
        wb = [np.mean(b) for b in wb]
    ax.bar(np.arange(len(wc)), wb, color="tab:blue")
    ax.set_ylabel("weight bits")
    ax.set_xlim(-0.5, len(wc) - 0.5)
    ax.set_title(f"weights: {plan.weight_size / max(sum(c.site.numel for c in wc), 1):.3f} stored bits per weight "
                 f"(budget {plan.weight_budget / max(sum(c.site.numel for c in wc), 1):.3f})")
    ax.set_xlabel("layer (network order)")
    if ac:
        ax = axes[1, 0]
        grid = np.asarray([plan.act_bits[c.site.name] for c in ac], np.float64).T  # [G, sites]
        im = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
        ax.set_ylabel("timestep group")
        ax.set_xlabel("activation site (network order)")
        ax.set_title("activation bits per timestep group")
        fig.colorbar(im, ax=ax, label="bits")
    return _save(plt, fig, path)


def plot_additivity(add, path: str | os.PathLike) -> Path:
    """Measured joint distortion vs the sum of single-site distortions (the seed's Figure 1)."""
    plt = _pyplot()
    m, p = np.asarray(add.measured).ravel(), np.asarray(add.predicted).ravel()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(p, m, s=14, alpha=0.7)
    pos = np.concatenate([m[m > 0], p[p > 0]])
    if len(pos):
        lo, hi = pos.min() / 1.5, pos.max() * 1.5
        ax.plot([lo, hi], [lo, hi], "k--", lw=1, label="measured = predicted")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
    ax.set_xlabel("sum of single-site distortions (predicted)")
    ax.set_ylabel("distortion of the joint quantization (measured)")
    ax.set_title(f"additivity: R² = {add.r2:.3f}, R² (log) = {add.r2_log:.3f}")
    ax.legend(loc="upper left")
    ax.grid(alpha=0.3)
    return _save(plt, fig, path)


def plot_smoothing(choices: dict, path: str | os.PathLike, title: str = "") -> Path:
    """Per-layer smoothing choices (:func:`jaxquant.quant.smooth.search_alphas`): the
    chosen strength of every layer in network order (grey: left unsmoothed), and each
    layer's error against the strength, relative to its unsmoothed error (log scale)."""
    plt = _pyplot()
    names = list(choices)
    if not names:
        raise ConfigError("no smoothing choices to plot")
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(13, 4.5), gridspec_kw={"width_ratios": [2, 1]})
    x = np.arange(len(names))
    chosen = [c.alpha for c in choices.values()]
    ax0.bar(x, [a if a is not None else 0.0 for a in chosen], color=["C0" if a is not None else "0.7" for a in chosen])
    ax0.scatter(x[[a is None for a in chosen]], np.zeros(sum(a is None for a in chosen)), marker="x", color="0.4",
                label="not smoothed", zorder=3)
    ax0.set_xticks(x)
    ax0.set_xticklabels(names, rotation=90, fontsize=5)
    ax0.set_ylabel("chosen alpha")
    ax0.set_ylim(-0.05, 1.05)
    if any(a is None for a in chosen):
        ax0.legend(loc="upper right", fontsize=8)
    cmap = plt.get_cmap("viridis")
    for i, c in enumerate(choices.values()):
        alphas = sorted(a for a in c.errors if a is not None)
        rel = [c.errors[a] / c.errors[None] if c.errors[None] > 0 else np.nan for a in alphas]
        ax1.plot(alphas, rel, color=cmap(i / max(len(names) - 1, 1)), lw=0.8, alpha=0.8)
    ax1.axhline(1.0, color="k", lw=0.8, ls="--")
    ax1.set_yscale("log")
    ax1.set_xlabel("alpha")
    ax1.set_ylabel("error / unsmoothed error")
    ax1.set_title("a line per layer (colour: network order)", fontsize=9)
    if title:
        fig.suptitle(title)
    return _save(plt, fig, path)
