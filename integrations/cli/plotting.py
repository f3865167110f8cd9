"""``piecewise-quant inspect --plot``: a layer's weight histogram and, below it, one group's
weights with the values that group's grid can represent. matplotlib is imported only here, and
only when a plot is drawn."""

from __future__ import annotations

from pathlib import Path

from .common import UserError, group_label


def group_levels(q, row: int, group: int):
    """The values one group of ``q`` can represent (sorted, float32) and, for a grid with a dense
    centre (piecewise), its breakpoints ``(-p, p)``; ``(None, None)`` for a format that does not
    describe its levels. The format decodes (``WeightFormat.levels``/``breakpoints``)."""
    t, layer = q.quantized_tensors(), q.layer_spec
    try:
        levels = q.fmt.levels(t, layer)
    except NotImplementedError:
        return None, None
    r, g = min(row, levels.shape[0] - 1), min(group, levels.shape[1] - 1)
    bp = q.fmt.breakpoints(t, layer)
    p = None if bp is None else float(bp[r, g])
    return levels[r, g].sort().values, (None if p is None else (-p, p))


def check_plot_backend() -> None:
    """``--plot`` without matplotlib fails before any model is loaded."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("--plot needs matplotlib, which is not installed: pip install 'piecewise-quant[plot]'") from None


def plot_layer(name: str, q, float_weight, row: int, group: int, path: Path) -> Path:
    """Write ``path`` (a PNG): the weight histogram of layer ``name`` (``float_weight``, else its
    dequantized weight) and one group's weights against that group's grid levels and breakpoints."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    layer = q.layer_spec
    gs = layer.group_size
    n_groups = 1 if gs == -1 else layer.in_features // gs
    if not 0 <= row < layer.out_features:
        raise UserError(f"--row {row}: layer {name!r} has rows 0..{layer.out_features - 1}")
    if not 0 <= group < n_groups:
        raise UserError(f"--group {group}: layer {name!r} has groups 0..{n_groups - 1} per row")
    weight = float_weight if float_weight is not None else q.dequantize(torch.float32)
    weight = weight.detach().to(torch.float32)
    group_w = weight.reshape(-1) if gs == -1 else weight[row, group * gs : (group + 1) * gs]
    levels, breakpoints = group_levels(q, row, group)
    what = "float weights (--reference)" if float_weight is not None else "dequantized weights"
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 7))
    top.hist(weight.reshape(-1).numpy(), bins=200, color="tab:blue")
    top.set_title(f"{name}: {what}, {q.spec.grid} {q.spec.bits}-bit, group size {group_label(layer)}")
    top.set_yscale("log")
    top.set_xlabel("weight")
    _draw_group(bottom, group_w, what, levels, breakpoints)
    columns = f"columns {group * gs}..{(group + 1) * gs - 1}"
    where = "the whole tensor (one group)" if gs == -1 else f"row {row}, group {group} ({columns})"
    bottom.set_title(f"{where}: its grid" + ("" if levels is not None else " (unknown for this format)"))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fig.savefig(path, dpi=100)
    except (OSError, ValueError) as exc:
        raise UserError(f"--plot {path}: cannot write the image: {exc}") from None
    finally:
        plt.close(fig)
    return path


def _draw_group(ax, group_w, what: str, levels, breakpoints) -> None:
    """One group's weight histogram with its grid levels (grey) and piecewise breakpoints (red)."""
    ax.hist(group_w.numpy(), bins=100, color="tab:blue", label=what)
    if levels is not None:
        for i, v in enumerate(levels.tolist()):
            ax.axvline(v, color="0.4", linewidth=0.6, alpha=0.8, label="grid levels" if i == 0 else None)
    if breakpoints is not None:
        for i, v in enumerate(breakpoints):
            ax.axvline(v, color="tab:red", linestyle="--", linewidth=1.5, label="breakpoints ±p" if i == 0 else None)
    ax.set_xlabel("weight")
    ax.legend(loc="upper right", fontsize=8)
