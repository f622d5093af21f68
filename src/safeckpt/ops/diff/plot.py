"""plot_diff: the per-layer relative change of a `DiffReport`, as a chart (matplotlib).

The picture people want after fine-tuning: x is the layer index (read from
names such as ``model.layers.12.mlp.up_proj.weight``, ``h.3.attn.c_attn.weight``,
``blocks.7.norm1.weight``, ``encoder.layer.5.output.dense.weight``), y is
``rel_l2`` = ||b-a|| / ||a|| on a log scale, one series per parameter kind
(the name with the layer prefix removed: ``mlp.up_proj.weight``). Several
stacks (an encoder and a decoder) are laid side by side on one x axis,
separated by a dotted line and labelled. With many kinds the series are
grouped by the last two name parts, and past `MAX_SERIES` the largest stay
and the rest are drawn as grey "other" dots. Tensors outside layers
(embeddings, head, final norm) are horizontal bars in a panel below.

Equal tensors (rel_l2 = 0) cannot sit on a log axis: they are drawn as hollow
markers on a floor line labelled "equal" a decade below the smallest change;
an infinite change (||a|| = 0) is drawn as a triangle on a ceiling line.
Tensors without a value comparison (only on one side, a new shape, renamed)
are counted in the subtitle. The format follows the file extension (png, svg,
pdf, ...); matplotlib is imported only here, with the Agg backend.
"""

from __future__ import annotations

import math
import os
from typing import NamedTuple, Optional

from ... import errors
from .compare import DiffReport

__all__ = ["plot_diff", "layer_of", "LayerName"]

# Series drawn in colour; the rest become "other".
MAX_SERIES = 10
# Tensors outside layers shown in the bar panel (the largest changes).
MAX_BARS = 20
# Characters of a label (long tensor names are cut in the middle).
MAX_LABEL_CHARS = 48

INSTALL_HINT = "install matplotlib (pip install 'safeckpt[plot]')"

# Digits of a layer index at most (a longer number in a name is not a layer).
MAX_INDEX_DIGITS = 6


class LayerName(NamedTuple):
    """A tensor name split at its layer index: ``model.layers`` / 12 / ``mlp.up_proj.weight``."""

    stack: str
    index: int
    kind: str


def layer_of(name: str) -> Optional[LayerName]:
    """The stack, layer index and kind of a tensor name (split at its first numeric part);
    None outside layers.

    >>> layer_of("model.layers.12.mlp.up_proj.weight")
    LayerName(stack='model.layers', index=12, kind='mlp.up_proj.weight')
    >>> layer_of("lm_head.weight") is None
    True
    """
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isascii() and part.isdigit() and len(part) <= MAX_INDEX_DIGITS:
            return LayerName(".".join(parts[:i]), int(part), ".".join(parts[i + 1:]) or "(tensor)")
    return None


def plot_diff(report: DiffReport, path: "os.PathLike | str", *, title: Optional[str] = None) -> str:
    """Draw the per-layer relative change of `report` to `path` (PNG, SVG, PDF by extension).

    >>> plot_diff(diff("base.safetensors", "tuned.safetensors"), "diff.png")
    'diff.png'
    """
    plt = _pyplot()
    path = os.fspath(path)
    points = [(e.name, e.rel_l2) for e in report.entries if e.rel_l2 is not None]
    layered = [(layer_of(name), rel) for name, rel in points]
    in_layers = [(where, rel) for where, rel in layered if where is not None]
    outside = [(name, rel) for (name, rel), (where, _) in zip(points, layered) if where is None]
    scale = _Scale([rel for _, rel in points])

    rows = 2 if outside and in_layers else 1
    heights = [3, max(1.2, 0.28 * min(len(outside), MAX_BARS))] if rows == 2 else [1]
    figure, axes = plt.subplots(rows, 1, figsize=(11, 5.5 + (heights[-1] if rows == 2 else 0)),
                                gridspec_kw={"height_ratios": heights}, squeeze=False)
    figure.suptitle(title or _title(report), fontsize=12)
    skipped = len(report.entries) - len(points)
    subtitle = f"{len(points)} tensors compared" + (f", {skipped} without values (only on one side, "
                                                      "new shape or renamed) not shown" if skipped else "")
    if in_layers:
        _draw_layers(axes[0][0], in_layers, scale)
    if outside:
        _draw_outside(axes[-1][0], outside, scale, alone=not in_layers)
    if not points:
        axes[0][0].text(0.5, 0.5, "no tensor values to compare", ha="center", va="center",
                        transform=axes[0][0].transAxes)
        axes[0][0].set_axis_off()
    figure.text(0.5, 0.005, subtitle, ha="center", va="bottom", fontsize=8, color="0.35")
    figure.tight_layout(rect=(0, 0.02, 1, 1))
    try:
        figure.savefig(path, dpi=120)
    except (OSError, ValueError) as exc:
        raise errors.SafeckptError(f"cannot write the plot: {exc}", path=path) from None
    finally:
        plt.close(figure)
    return path


# --- pieces --------------------------------------------------------------------------

def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise errors.SafeckptError(f"plotting needs matplotlib: {INSTALL_HINT}") from None
    matplotlib.use("Agg", force=True)  # no display, whatever the environment says
    import matplotlib.pyplot as plt

    return plt


def _title(report: DiffReport) -> str:
    paths = [p.rstrip("/" + os.sep) or p for p in (report.a, report.b)]
    parts = 1
    while parts < 4 and len({_tail(p, parts) for p in paths}) < 2:  # step-10/tensors... vs step-30/...
        parts += 1
    a, b = (_tail(p, parts) for p in paths)
    return f"relative change ||B-A|| / ||A|| per layer\nA: {a}   B: {b}"


def _tail(path: str, parts: int) -> str:
    """The last `parts` components of `path`."""
    return os.path.join(*os.path.normpath(path).split(os.sep)[-parts:])


class _Scale:
    """Where zero and infinite changes go on the log axis."""

    def __init__(self, values: list[float]) -> None:
        self.values = list(values)
        finite = [v for v in values if v > 0 and math.isfinite(v)]
        low = min(finite) if finite else 1e-6
        high = max(finite) if finite else 1.0
        self.floor = 10 ** (math.floor(math.log10(low)) - 1)
        self.ceiling = 10 ** (math.ceil(math.log10(high)) + 1)
        self.zeros = any(v == 0 for v in values)
        self.infinite = any(math.isinf(v) for v in values)

    def y(self, value: float) -> float:
        if value <= 0:
            return self.floor
        return self.ceiling if math.isinf(value) else value

    def mark_axis(self, ax, values: list[float], horizontal: bool = True) -> None:
        """Whole decades on the log axis (a narrow range would get unreadable ticks), and the
        floor and ceiling lines where zeros and infinities are drawn."""
        shown = [self.y(v) for v in values]
        low = 10 ** math.floor(math.log10(min(shown)) + 1e-9)
        high = 10 ** math.ceil(math.log10(max(shown)) - 1e-9)
        if high <= low:
            high = low * 10
        (ax.set_ylim if horizontal else ax.set_xlim)(low / 1.6, high * 1.6)
        line = ax.axhline if horizontal else ax.axvline
        if self.zeros:
            line(self.floor, color="0.6", linestyle=":", linewidth=1)
        if self.infinite:
            line(self.ceiling, color="0.6", linestyle=":", linewidth=1)


def _series(points: list[tuple[LayerName, float]]) -> tuple[dict[str, list], list]:
    """Points grouped by kind (coarser when there are many); the overflow as 'other'."""
    kinds = {where.kind for where, _ in points}
    key = (lambda k: k) if len(kinds) <= MAX_SERIES else (lambda k: ".".join(k.split(".")[-2:]))
    groups: dict[str, list] = {}
    for where, rel in points:
        groups.setdefault(key(where.kind), []).append((where, rel))
    if len(groups) <= MAX_SERIES:
        return groups, []
    ranked = sorted(groups, key=lambda k: -max(_rank(rel) for _, rel in groups[k]))
    kept = {k: groups[k] for k in ranked[:MAX_SERIES - 1]}
    other = [p for k in ranked[MAX_SERIES - 1:] for p in groups[k]]
    return kept, other


def _rank(value: float) -> float:
    return math.inf if math.isinf(value) else value


def _draw_layers(ax, points: list[tuple[LayerName, float]], scale: _Scale) -> None:
    stacks: dict[str, tuple[int, int]] = {}  # stack -> (first, last) layer index, in order seen
    for where, _ in points:
        low, high = stacks.get(where.stack, (where.index, where.index))
        stacks[where.stack] = (min(low, where.index), max(high, where.index))
    offsets, position = {}, 0
    for stack, (low, high) in stacks.items():
        offsets[stack] = position - low
        position += high - low + 2  # a gap between stacks

    def x(where: LayerName) -> int:
        return offsets[where.stack] + where.index

    groups, other = _series(points)
    markers = "osD^v<>px*"
    for i, (kind, members) in enumerate(sorted(groups.items())):
        members = sorted(members, key=lambda p: x(p[0]))
        xs: list[float] = []
        ys: list[float] = []
        for k, (where, rel) in enumerate(members):
            if k and where.stack != members[k - 1][0].stack:  # no line from one stack into the next
                xs.append(x(where) - 1)
                ys.append(math.nan)
            xs.append(x(where))
            ys.append(scale.y(rel) if rel > 0 else math.nan)  # zeros: hollow markers only
        line, = ax.plot(xs, ys, marker=markers[i % len(markers)], markersize=4, linewidth=1.2,
                        label=_short(kind))
        _hollow_zeros(ax, [(x(w), rel) for w, rel in members], line.get_color(), scale)
    if other:
        ax.scatter([x(w) for w, _ in other], [scale.y(rel) for _, rel in other], s=8, color="0.6",
                   label=f"other ({len(other)} tensors)", zorder=1)
    ax.set_yscale("log")
    scale.mark_axis(ax, [rel for _, rel in points])
    ax.set_ylabel("relative L2 change (log)")
    if len(stacks) > 1:
        for stack, (low, high) in stacks.items():
            start = offsets[stack] + low
            if start > 0:
                ax.axvline(start - 1, color="0.75", linestyle=":", linewidth=1)
            ax.text(start, 1.0, _short(stack, 30), transform=ax.get_xaxis_transform(), fontsize=8,
                    va="bottom", color="0.3")
        ax.set_xlabel("layer index (stacks side by side)")
        ticks = [(offsets[s] + i, i) for s, (low, high) in stacks.items() for i in range(low, high + 1)]
    else:
        stack = next(iter(stacks))
        ax.set_xlabel(f"layer index ({_short(stack, 40)}.N)")
        ticks = [(offsets[stack] + i, i) for i in range(stacks[stack][0], stacks[stack][1] + 1)]
    step = max(1, len(ticks) // 24)
    ax.set_xticks([t for t, _ in ticks[::step]], [str(label) for _, label in ticks[::step]], fontsize=8)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    _labels_for_marks(ax, scale)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0, frameon=False)


def _hollow_zeros(ax, points: list[tuple[int, float]], color, scale: _Scale) -> None:
    zero_x = [x for x, rel in points if rel == 0]
    if zero_x:
        ax.scatter(zero_x, [scale.floor] * len(zero_x), s=30, facecolors="white", edgecolors=color, zorder=3)


def _labels_for_marks(ax, scale: _Scale) -> None:
    transform = ax.get_yaxis_transform()
    if scale.zeros:
        ax.text(1.0, scale.floor, " equal", transform=transform, fontsize=7, va="center", color="0.4")
    if scale.infinite:
        ax.text(1.0, scale.ceiling, " ||A||=0", transform=transform, fontsize=7, va="center", color="0.4")


def _draw_outside(ax, points: list[tuple[str, float]], scale: _Scale, alone: bool) -> None:
    shown = sorted(points, key=lambda p: -_rank(p[1]))[:MAX_BARS][::-1]
    values = [scale.y(rel) for _, rel in shown]
    colors = ["0.7" if rel == 0 else ("tab:red" if math.isinf(rel) else "tab:blue") for _, rel in shown]
    base = scale.floor / 10
    ax.barh(range(len(shown)), [v - base for v in values], color=colors, left=base)
    ax.set_yticks(range(len(shown)), [_short(name) for name, _ in shown], fontsize=7)
    ax.set_xscale("log")
    scale.mark_axis(ax, scale.values + [base], horizontal=False)  # the same decades as the layers
    more = len(points) - len(shown)
    ax.set_title(("tensors" if alone else "tensors outside layers")
                 + (f" (the {len(shown)} largest changes; {more} more)" if more else "")
                 + ("; grey: equal" if any(rel == 0 for _, rel in shown) else ""), fontsize=9)
    ax.set_xlabel("relative L2 change (log)")
    ax.grid(True, which="major", axis="x", alpha=0.3)


def _short(text: str, limit: int = MAX_LABEL_CHARS) -> str:
    if len(text) <= limit:
        return text
    keep = (limit - 1) // 2
    return f"{text[:keep]}…{text[-(limit - 1 - keep):]}"
