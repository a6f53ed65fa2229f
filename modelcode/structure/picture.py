"""Render a diagram with matplotlib (SVG and PNG): frames, boxes coloured by what they compute, arrows."""

from collections import Counter
from pathlib import Path

from matplotlib.figure import Figure  # not pyplot: no global state, no window, whatever the user's backend
from matplotlib.patches import Circle, FancyArrowPatch, FancyBboxPatch, Rectangle

from modelcode.structure.graph import Diagram, Node
from modelcode.structure.layout import (
    BOX_PAD_Y,
    LINE_SPACING,
    Layout,
    Rect,
    frame_detail,
    frame_title,
    is_circle,
    lines,
    text_width,
)

# category -> (fill, border, legend name)
COLORS = {
    "embedding": ("#e9dcf7", "#8e5cc2", "embedding"),
    "position": ("#f9dcea", "#c2588f", "positions"),
    "attention": ("#fde0c2", "#dd8032", "attention"),
    "mlp": ("#cfe6f7", "#3f88c5", "feed-forward"),
    "norm": ("#fff3b0", "#c9a400", "normalization"),
    "linear": ("#d5efdb", "#45a85f", "linear"),
    "activation": ("#eef6d6", "#86ad2f", "activation"),
    "op": ("#ffffff", "#555555", "tensor op"),
    "param": ("#f2f2f2", "#888888", "parameter"),
    "io": ("#ececec", "#666666", "input / output"),
    "other": ("#eeeeee", "#888888", "other"),
}
FRAME_COLORS = {"block": ("#f4f5f7", "#8d939c"), "stack": ("#fbfcfe", "#b5bcc7")}
EDGE, SIDE_EDGE = "#3d3d3d", "#7256a8"
MARGIN, TITLE_H = 24.0, 58.0


def _text(ax, x, y, line, ha="center", **kw):
    ax.text(x, y, line.text, fontsize=line.size, fontweight="bold" if line.bold else "normal",
            family="monospace" if line.mono else "sans-serif", color=line.color, ha=ha, va="center", **kw)


def _box(ax, node: Node, r: Rect) -> None:
    fill, border, _ = COLORS.get(node.category, COLORS["other"])
    if is_circle(node):
        ax.add_patch(Circle((r.cx, r.cy), r.w / 2, facecolor=fill, edgecolor=border, lw=1.3, zorder=3))
        _text(ax, r.cx, r.cy + 0.5, lines(node)[0], zorder=4)
        return
    rounding = r.h / 2 if node.kind in ("input", "output") else 7 if node.kind == "module" else 5
    ax.add_patch(FancyBboxPatch((r.x, r.y), r.w, r.h, boxstyle=f"round,pad=0,rounding_size={rounding}",
                                facecolor=fill, edgecolor=border, lw=1.3, zorder=3,
                                linestyle=(0, (3, 2)) if node.kind == "param" else "-"))
    y = r.y + BOX_PAD_Y
    for line in lines(node):
        h = line.size * LINE_SPACING
        _text(ax, r.cx, y + h / 2, line, zorder=4)
        y += h


def _frame(ax, node: Node, r: Rect) -> None:
    fill, border = FRAME_COLORS[node.category]
    ax.add_patch(FancyBboxPatch((r.x, r.y), r.w, r.h, boxstyle="round,pad=0,rounding_size=12", facecolor=fill,
                                edgecolor=border, lw=1.4, zorder=1, linestyle="-" if node.category == "block" else
                                (0, (6, 3))))
    ax.text(r.x + 12, r.y + 15, frame_title(node), fontsize=10.5, fontweight="bold", color="#333333", va="center",
            zorder=2)
    if frame_detail(node):
        ax.text(r.x + 12, r.y + 29, frame_detail(node), fontsize=7.5, color="#666666", va="center", zorder=2)
    if node.repeat > 1:
        ax.text(r.right - 12, r.y + 18, f"×{node.repeat}", fontsize=16, fontweight="bold", color="#b03a2e",
                ha="right", va="center", zorder=2)


def _arrow(ax, points, color: str, dashed: bool, head: bool) -> None:
    style = (0, (4, 2.5)) if dashed else "-"
    if len(points) > 2:
        xs, ys = zip(*points[:-1], strict=True)
        ax.plot(xs, ys, color=color, lw=1.3, linestyle=style, solid_joinstyle="miter", zorder=2)
    ax.add_patch(FancyArrowPatch(points[-2], points[-1], arrowstyle="-|>" if head else "-", mutation_scale=11,
                                 color=color, lw=1.3, linestyle=style, shrinkA=0, shrinkB=0, zorder=2))


def render(diagram: Diagram, subtitle: str = "") -> Figure:
    lay = Layout(diagram)
    width = max(lay.width, text_width(subtitle, 9) + 20, 360.0) + 2 * MARGIN
    legend_h = _legend(None, diagram, MARGIN, 0.0, width - MARGIN)
    height = lay.height + 2 * MARGIN + TITLE_H + legend_h + 20
    fig = Figure(figsize=(width / 72, height / 72))
    ax = fig.add_axes((0, 0, 1, 1))
    ax.set_xlim(0, width)
    ax.set_ylim(height, 0)
    ax.axis("off")
    ox, oy = MARGIN + (width - 2 * MARGIN - lay.width) / 2, MARGIN + TITLE_H
    ax.add_patch(Rectangle((0, 0), width, height, facecolor="white", edgecolor="none", zorder=0))
    ax.text(MARGIN, MARGIN + 10, diagram.title, fontsize=16, fontweight="bold", color="#222222", va="center")
    ax.text(MARGIN, MARGIN + 32, subtitle, fontsize=9, color="#555555", va="center")

    def shift(p):
        return p[0] + ox, p[1] + oy

    for node_id, r in lay.rect.items():
        node = diagram.nodes[node_id]
        moved = Rect(r.x + ox, r.y + oy, r.w, r.h)
        if node.graph is not None:
            _frame(ax, node, moved)
        elif node.kind != "port":
            _box(ax, node, moved)
    fanout = Counter(e.src for e in diagram.edges if e.primary)
    for e in diagram.edges:
        points, branch = lay.route(e)
        points = [shift(p) for p in points]
        into_port = diagram.nodes[e.dst].kind == "port"
        _arrow(ax, points, EDGE if e.primary else SIDE_EDGE, not e.primary, not into_port)
        if branch is not None and fanout[e.src] > 1:
            ax.add_patch(Circle(shift(branch), 2.6, color=EDGE, zorder=2))
        if e.label:  # beside the longest vertical stretch
            (xa, ya), (_, yb) = max(zip(points, points[1:], strict=False),
                                    key=lambda s: abs(s[1][1] - s[0][1]) if s[0][0] == s[1][0] else -1)
            ax.text(xa + 5, (ya + yb) / 2, e.label, fontsize=8.5, style="italic", color=SIDE_EDGE, ha="left",
                    va="center", zorder=5, bbox=dict(facecolor="white", edgecolor="none", pad=1.0, alpha=0.9))
    _legend(ax, diagram, MARGIN, height - MARGIN - legend_h, width - MARGIN)
    return fig


def _legend(ax, diagram: Diagram, x0: float, y0: float, right: float) -> float:
    """The colours used, in rows that fit the width; returns the height (draws nothing without `ax`)."""
    used = [c for c in COLORS if any(n.category == c for n in diagram.nodes.values())]
    x, y = x0, y0 + 8
    for c in used:
        fill, border, name = COLORS[c]
        step = 21 + text_width(name, 8) + 16
        if x + step - 16 > right and x > x0:
            x, y = x0, y + 20
        if ax is not None:
            ax.add_patch(FancyBboxPatch((x, y - 6), 16, 12, boxstyle="round,pad=0,rounding_size=3", facecolor=fill,
                                        edgecolor=border, lw=1.1))
            ax.text(x + 21, y, name, fontsize=8, color="#444444", va="center")
        x += step
    return y - y0 + 8


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure; the suffix (.svg, .png) chooses the format."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=200 if path.suffix.lower() == ".png" else 72, facecolor="white")
    return path
