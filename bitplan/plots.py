"""Headless plots (matplotlib, Agg backend): Pareto frontier, per-layer bits along depth, sensitivity
heat map. Each function writes one PNG and returns its path; matplotlib is imported only here.

Example:
    >>> plot_frontier(sweep(model, batches), "frontier.png")
    >>> plot_bits(Plan.load("plan.json"), "bits.png"); plot_sensitivity(load("sens.json"), "sens.png")
"""
from __future__ import annotations

import os
import re

import numpy as np

__all__ = ["plot_frontier", "plot_bits", "plot_sensitivity", "block_grid"]

_BLOCK = re.compile(r"^(?P<stack>.*?)\.(?P<idx>\d+)\.(?P<proj>.+)$")
GRID_FROM = 48          # layers: from here on, block-structured models are drawn as block x projection grids


def block_grid(names) -> tuple[list[str], list[str], dict[str, tuple[int, int]], list[str]] | None:
    """(block labels, projection labels, name -> (row, col), names outside blocks) when the names follow
    one ``<stack>.<i>.<projection>`` pattern with >= 4 blocks (transformer stacks), else None.

    Example: ``block_grid(["model.layers.0.self_attn.q_proj", ...])``
    """
    stacks: dict[str, list] = {}
    for n in names:
        m = _BLOCK.match(n)
        if m:
            stacks.setdefault(m["stack"], []).append((int(m["idx"]), m["proj"], n))
    if not stacks:
        return None
    stack, items = max(stacks.items(), key=lambda kv: len(kv[1]))
    blocks = sorted({i for i, _, _ in items})
    if len(blocks) < 4:
        return None
    projs: list[str] = []
    for _, p, _ in items:                  # first-seen order: network order when the names are
        if p not in projs:
            projs.append(p)
    pos = {n: (blocks.index(i), projs.index(p)) for i, p, n in items}
    rest = [n for n in names if n not in pos]
    return [f"{stack}.{i}" for i in blocks], projs, pos, rest

_BIT_COLORS = {2: "#d62728", 3: "#ff7f0e", 4: "#2ca02c", 5: "#17becf", 6: "#1f77b4", 7: "#9467bd",
               8: "#7f7f7f", 16: "#000000"}


def _plt():
    import matplotlib
    matplotlib.use("Agg", force=True)          # headless: never needs a display
    import matplotlib.pyplot as plt
    return plt


def _save(fig, path) -> str:
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    _plt().close(fig)
    return path


def _common_prefix(names) -> str:
    """The dotted prefix every name shares (e.g. 'encoder.'), never a whole name."""
    parts = [n.split(".") for n in names]
    k = 0
    while len(names) > 1 and all(len(p) > k + 1 and p[k] == parts[0][k] for p in parts):
        k += 1
    return ".".join(parts[0][:k]) + "." if k else ""


def _ticks(ax, names, axis="x", max_labels=40):
    step = max(1, int(np.ceil(len(names) / max_labels)))
    idx = list(range(0, len(names), step))
    pre = _common_prefix(names)
    short = [n[len(pre):] for n in names]
    short = [n if len(n) <= 40 else "…" + n[-39:] for n in short]
    if axis == "x":
        ax.set_xticks(idx)
        ax.set_xticklabels([short[i] for i in idx], rotation=90, fontsize=7)
    else:
        ax.set_yticks(idx)
        ax.set_yticklabels([short[i] for i in idx], fontsize=7)


def plot_frontier(front: dict, path, title: str | None = None) -> str:
    """Size (MB) vs loss: left panel predicted loss increase, right panel measured loss.

    ``front`` is what :func:`bitplan.sweep.sweep` returns (or its JSON). bitplan plans are a line,
    uniform-bit baselines are labelled markers; the log y axis shows orders of magnitude.
    """
    plt = _plt()
    pts = sorted(front["points"], key=lambda p: p["size_mb"])
    uni = front.get("uniform", [])
    has_measured = any(p.get("measured") is not None for p in pts)
    fig, axes = plt.subplots(1, 2 if has_measured else 1, figsize=(11 if has_measured else 6, 4.2),
                             squeeze=False)
    panels = [("predicted_loss", "predicted loss increase (Σ sensitivity)")]
    if has_measured:
        panels.append(("measured", f"{front.get('metric') or 'measured'} ({front.get('measured_on') or 'calibration'})"))
    for ax, (key, label) in zip(axes[0], panels):
        xs = [p["size_mb"] for p in pts if p.get(key) is not None]
        ys = [p[key] for p in pts if p.get(key) is not None]
        ax.plot(xs, np.maximum(ys, 1e-12), "o-", color="#1f77b4", label="bitplan (mixed precision)")
        for u in uni:
            if u.get(key) is None:
                continue
            ax.plot(u["size_mb"], max(u[key], 1e-12), "s", color=_BIT_COLORS.get(u["bits"], "k"),
                    label=f"uniform {u['bits']}-bit")
        base = front.get("base_value")
        if key == "measured" and base is not None and base > 0:
            ax.axhline(base, color="k", ls=":", lw=1, label=f"unquantized ({base:.3g})")
        ax.set_yscale("log")
        ax.set_xlabel("model size after packing (MB = 10⁶ bytes)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or f"Pareto frontier ({front.get('estimator', '?')} sensitivity; "
                 f"metric: {front.get('metric') or 'predicted only'})", fontsize=10)
    return _save(fig, path)


def plot_bits(plan, path, title: str | None = None) -> str:
    """Each layer's weight bits: bars in network order, or for block-structured models with many
    layers a block x projection grid (rows = blocks, columns = projections, the option's label in
    each cell); layers outside the blocks (embeddings, heads) are listed under the grid."""
    from .report import depth_order
    names, recorded = depth_order(plan.layers)
    grid = block_grid(names) if len(names) >= GRID_FROM else None
    if grid is not None:
        return _bits_grid(plan, names, grid, path, title)
    plt = _plt()
    bits = [plan.layers[n].bits for n in names]
    fig, ax = plt.subplots(figsize=(max(6, min(24, 0.22 * len(names) + 3)), 4))
    ax.bar(range(len(names)), bits, color=[_BIT_COLORS.get(b, "#333333") for b in bits], width=0.85)
    for b in sorted(set(bits)):
        ax.bar([0], [0], color=_BIT_COLORS.get(b, "#333333"), label=f"{b} bits ({bits.count(b)} layers)")
    _ticks(ax, names, "x")
    ax.set_xlim(-0.6, len(names) - 0.4)
    ax.set_ylabel("weight bits")
    ax.set_yticks(sorted(set(bits) | {0}))
    pre = _common_prefix(names)
    ax.set_xlabel(("layer (network order)" if recorded else "layer (by name, block numbers in numeric order)")
                  + (f", prefix '{pre}' omitted" if pre else ""))
    ax.set_title(title or _bits_title(plan, names), fontsize=10)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax.grid(True, axis="y", alpha=0.3)
    return _save(fig, path)


def _bits_title(plan, names) -> str:
    size = plan.predicted.get("size_bytes")
    return (f"bits per layer — {len(names)} layers"
            + (f", predicted size {size / 1e6:.3f} MB" if size is not None else ""))


def _bits_grid(plan, names, grid, path, title) -> str:
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch
    plt = _plt()
    blocks, projs, pos, rest = grid
    levels = sorted({s.bits for s in plan.layers.values()})
    z = np.full((len(blocks), len(projs)), np.nan)
    for n, (r, c) in pos.items():
        z[r, c] = levels.index(plan.layers[n].bits)
    fig, ax = plt.subplots(figsize=(min(18, 2.5 + 1.15 * len(projs)), min(40, 1.6 + 0.28 * len(blocks))))
    cmap = ListedColormap([_BIT_COLORS.get(b, "#333333") for b in levels])
    ax.imshow(z, aspect="auto", cmap=cmap, vmin=-0.5, vmax=len(levels) - 0.5, interpolation="nearest")
    if len(blocks) * len(projs) <= 600:
        for n, (r, c) in pos.items():
            lab = plan.layers[n].label[1:]                      # "4g128", "8a8", ...
            ax.text(c, r, lab, ha="center", va="center", fontsize=6, color="white" if plan.layers[n].bits <= 3
                    else "black")
    ax.set_xticks(range(len(projs)))
    ax.set_xticklabels(projs, rotation=30, ha="right", fontsize=8)
    step = max(1, int(np.ceil(len(blocks) / 40)))
    ax.set_yticks(range(0, len(blocks), step))
    ax.set_yticklabels([blocks[i].rsplit(".", 1)[-1] for i in range(0, len(blocks), step)], fontsize=7)
    ax.set_ylabel(f"block ({blocks[0].rsplit('.', 1)[0]}.N)")
    handles = [Patch(color=_BIT_COLORS.get(b, "#333333"), label=f"{b} bits") for b in levels]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    if rest:
        ax.set_xlabel("outside the blocks: " + ", ".join(f"{n} {plan.layers[n].label}" for n in rest[:6])
                      + (" ..." if len(rest) > 6 else ""), fontsize=8)
    ax.set_title(title or _bits_title(plan, names), fontsize=10)
    return _save(fig, path)


def plot_sensitivity(table, path, title: str | None = None) -> str:
    """Heat map of log10(predicted loss increase): rows = layers (network order), columns = options;
    for block-structured models with many layers one block x projection panel per bit-width (its
    most precise option: per channel, weight-only, rtn when present). Blank = not allowed."""
    plt = _plt()
    loss = np.asarray(table.loss, dtype=float)                       # (L, B)
    pos = loss[(loss > 0) & table.allowed]
    floor = pos.min() if pos.size else 1e-12
    z = np.where(table.allowed, np.log10(np.maximum(loss, floor)), np.nan)   # (L, B); blank = not allowed
    names = list(table.names)
    grid = block_grid(names) if len(names) >= GRID_FROM else None
    if grid is not None:
        return _sens_grid(table, z, grid, path, title)
    labels = [o.label for o in table.options]
    fig, ax = plt.subplots(figsize=(2.2 + 0.6 * len(labels), max(3, min(30, 0.18 * len(names) + 1.5))))
    im = ax.imshow(z, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, rotation=90, fontsize=7)
    ax.set_xlabel("option (blank: the layer cannot take it)")
    _ticks(ax, names, "y", max_labels=60)
    pre = _common_prefix(names)
    ax.set_ylabel("layer (network order)" + (f", prefix '{pre}' omitted" if pre else ""))
    cb = fig.colorbar(im, ax=ax)
    cb.set_label("log10 predicted loss increase")
    ax.set_title(title or f"sensitivity ({table.method}), {len(names)} layers", fontsize=10)
    return _save(fig, path)


def _sens_grid(table, z, grid, path, title) -> str:
    plt = _plt()
    blocks, projs, pos, rest = grid
    cols = []
    for b in sorted({o.bits for o in table.options}):       # one panel per bit-width
        cand = [j for j, o in enumerate(table.options) if o.bits == b]
        cand.sort(key=lambda j: (table.options[j].act_bits is not None, table.options[j].method != "rtn",
                                 table.options[j].group_size is not None))
        cols.append(cand[0])
    cols = cols[:6]
    vmin, vmax = np.nanmin(z[:, cols]), np.nanmax(z[:, cols])
    fig, axes = plt.subplots(1, len(cols), figsize=(min(26, 1.2 + len(cols) * (0.55 * len(projs) + 1.0)),
                                                    min(40, 1.8 + 0.26 * len(blocks))), squeeze=False)
    for ax, j in zip(axes[0], cols):
        g = np.full((len(blocks), len(projs)), np.nan)
        for n, (r, c) in pos.items():
            g[r, c] = z[table.names.index(n), j]
        im = ax.imshow(g, aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
        ax.set_title(table.options[j].label, fontsize=9)
        ax.set_xticks(range(len(projs)))
        ax.set_xticklabels(projs, rotation=60, ha="right", fontsize=7)
        step = max(1, int(np.ceil(len(blocks) / 40)))
        ax.set_yticks(range(0, len(blocks), step))
        ax.set_yticklabels([blocks[i].rsplit(".", 1)[-1] for i in range(0, len(blocks), step)], fontsize=6)
    axes[0][0].set_ylabel(f"block ({blocks[0].rsplit('.', 1)[0]}.N)")
    cb = fig.colorbar(im, ax=list(axes[0]), fraction=0.03)
    cb.set_label("log10 predicted loss increase")
    if rest:
        fig.text(0.01, 0.005, f"not shown (outside the blocks): {', '.join(rest[:6])}"
                 + (" ..." if len(rest) > 6 else ""), fontsize=7)
    fig.suptitle(title or f"sensitivity ({table.method}), {len(table.names)} layers: one panel per bit-width",
                 fontsize=10)
    return _save(fig, path)
