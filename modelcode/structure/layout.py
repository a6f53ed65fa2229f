"""Where each node of a diagram goes, and the path each arrow takes. Units are points (1/72 inch), y down.

Each graph (the model, and the inside of every frame) is a grid. Rows follow the data flow: a node sits one
row below the lowest node it reads from along the main flow. Lanes (columns) follow the residual stream:
a node goes in the lane of its first input, or the next free lane to the right, so a block whose two
branches read the same input (GPT-NeoX's parallel residual) shows them side by side, and a sequential
block stays one column. Nodes that read nothing on the main flow (rotary tables, parameters) sit just
above and to the right of their first reader. Arrows are drawn orthogonally: straight down in a lane,
around the left of a lane when they skip over nodes (the residual connections), into the side of a
circle when they join a sum from another lane, and along the gap between lanes when they come from
another frame (rotary cos/sin into attention, the encoder output into cross-attention).
"""

from dataclasses import dataclass, field
from functools import lru_cache

from matplotlib.font_manager import FontProperties
from matplotlib.textpath import TextPath

from modelcode.structure.graph import Diagram, Edge, Graph, Node

ROW_GAP, LANE_GAP = 24.0, 46.0
FRAME_PAD_LEFT, FRAME_PAD_RIGHT, FRAME_PAD_BOTTOM, FRAME_HEADER = 34.0, 26.0, 4.0, 40.0
CIRCLE_OPS = {"+", "−", "×", "÷", "@"}
BOX_PAD_X, BOX_PAD_Y, LINE_SPACING = 10.0, 6.0, 1.3
DETAIL_WIDTH = 46  # characters per line of a box's settings


@dataclass(frozen=True)
class Line:
    text: str
    size: float
    bold: bool = False
    mono: bool = False
    color: str = "#222222"


@lru_cache(maxsize=4096)
def text_width(text: str, size: float, bold: bool = False, mono: bool = False) -> float:
    prop = FontProperties(family="monospace" if mono else "sans-serif", weight="bold" if bold else "normal")
    return TextPath((0, 0), text, size=size, prop=prop).get_extents().width if text.strip() else 0.0


def _wrap(text: str, width: int) -> list[str]:
    lines, line = [], ""
    for word in text.split(" "):
        if line and len(line) + 1 + len(word) > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return [*lines, line] if line else lines


def is_circle(node: Node) -> bool:
    return node.kind == "op" and node.title.split(" ")[0] in CIRCLE_OPS


def lines(node: Node) -> list[Line]:
    """The text of a box, top to bottom."""
    if node.kind in ("input", "output"):
        return [Line(node.title, 10, bold=True), Line(node.shape, 8, color="#555555")]
    if node.kind == "param":
        return [Line(node.title, 9, bold=True, mono=True), Line(f"parameter {node.shape}", 7.5, color="#555555")]
    if node.kind == "op":
        return [Line(node.title, 11 if is_circle(node) else 9, bold=is_circle(node), mono=not is_circle(node))]
    out = [Line(node.title, 10.5, bold=True)]
    if node.name:
        out.append(Line(node.name, 8.5, mono=True, color="#333333"))
    out += [Line(t, 7.5, color="#555555") for part in node.detail.split("\n") for t in _wrap(part, DETAIL_WIDTH)]
    if node.shape:
        params = f"  ·  {human(node.params)} params" if node.params else ""
        out.append(Line(f"→ {node.shape}{params}", 8, color="#666666"))
    return out


def human(n: int) -> str:
    """12,345,678 -> "12.3M"."""
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.3g}{unit}"
    return str(n)


def box_size(node: Node) -> tuple[float, float]:
    if node.kind == "port":
        return 0.0, 0.0
    ls = lines(node)
    if is_circle(node):
        d = max(24.0, text_width(ls[0].text, ls[0].size, True) + 12)
        return d, d
    w = max(text_width(ln.text, ln.size, ln.bold, ln.mono) for ln in ls) + 2 * BOX_PAD_X
    h = sum(ln.size * LINE_SPACING for ln in ls) + 2 * BOX_PAD_Y
    return max(w, 120.0 if node.kind == "module" else 60.0), h


@dataclass
class Rect:
    x: float
    y: float
    w: float
    h: float

    @property
    def cx(self) -> float:
        return self.x + self.w / 2

    @property
    def cy(self) -> float:
        return self.y + self.h / 2

    @property
    def bottom(self) -> float:
        return self.y + self.h

    @property
    def right(self) -> float:
        return self.x + self.w


@dataclass
class Grid:
    """One graph's grid: cells, row tops and heights, lane lefts and widths (relative to the graph origin)."""

    cell: dict[int, tuple[int, int]] = field(default_factory=dict)  # node -> (row, lane)
    row_y: list[float] = field(default_factory=list)
    row_h: list[float] = field(default_factory=list)
    lane_x: list[float] = field(default_factory=list)
    lane_w: list[float] = field(default_factory=list)
    lane_spine: list[float] = field(default_factory=list)  # x of the lane's centre line, from the lane's left
    origin: tuple[float, float] = (0.0, 0.0)  # absolute, once placed


class Layout:
    def __init__(self, diagram: Diagram):
        self.d = diagram
        self.rect: dict[int, Rect] = {}  # absolute
        self.grid_of: dict[int, Grid] = {}  # node -> the grid it sits in
        self.graph_of: dict[int, Graph] = {}
        self.parent: dict[int, int | None] = {}
        self.header_shift: dict[int, float] = {}
        self._index(diagram.root, None)
        self.size: dict[int, tuple[float, float]] = {}
        self.spine: dict[int, float] = {}  # node -> x where arrows enter and leave it, from its left
        self.grids: dict[int, Grid] = {}  # id(graph) -> grid
        self.width, self.height = self._measure(diagram.root)
        self._place(diagram.root, 0.0, 0.0)

    def _index(self, g: Graph, parent: int | None) -> None:
        for n in g.nodes:
            self.graph_of[n.id], self.parent[n.id] = g, parent
            if n.graph is not None:
                self._index(n.graph, n.id)

    def ancestor_in(self, node: int, g: Graph) -> int | None:
        """The node of `g` that is `node` or holds it (in a frame), if any."""
        while node is not None and self.graph_of[node] is not g:
            node = self.parent[node]
        return node

    def _edges_in(self, g: Graph) -> list[Edge]:
        ids = {n.id for n in g.nodes}
        return [e for e in self.d.edges if e.src in ids and e.dst in ids]

    def _rows(self, g: Graph) -> dict[int, int]:
        edges = [e for e in self._edges_in(g) if e.primary]
        preds: dict[int, list[int]] = {n.id: [] for n in g.nodes}
        for e in edges:
            preds[e.dst].append(e.src)
        sources = {n.id for n in g.nodes if not preds[n.id] and n.kind not in ("input", "port")}
        row: dict[int, int] = {}
        for n in g.nodes:  # nodes come in call order, a topological order of the data flow
            if n.id == g.out_port:
                continue
            ps = [row[p] for p in preds[n.id] if p in row and p not in sources]
            row[n.id] = max(ps) + 1 if ps else 0
        for s in sources:  # one row above the first node that reads it, wherever that is
            readers = [self.ancestor_in(e.dst, g) for e in self.d.edges if e.src == s]
            rows = [row[r] for r in readers if r is not None and r in row and r not in sources]
            row[s] = max(min(rows) - 1, 0) if rows else 0
        if g.out_port is not None:
            row[g.out_port] = max(row.values(), default=0) + 1
        return row

    def _lanes(self, g: Graph, row: dict[int, int]) -> dict[int, int]:
        edges = [e for e in self._edges_in(g) if e.primary]
        first_pred: dict[int, int] = {}
        for e in edges:
            first_pred.setdefault(e.dst, e.src)
        taken: set[tuple[int, int]] = set()
        lane: dict[int, int] = {}

        def put(n: int, want: int) -> None:
            while (row[n], want) in taken:
                want += 1
            lane[n] = want
            taken.add((row[n], want))

        order = sorted((n for n in g.nodes), key=lambda n: row[n.id])
        later = []
        inputs = 0
        for n in order:
            if n.kind == "input":
                put(n.id, inputs)
                inputs += 1
            elif n.id in first_pred and first_pred[n.id] in lane:
                put(n.id, lane[first_pred[n.id]])
            elif n.kind == "port":
                put(n.id, 0)
            else:
                later.append(n)
        for n in later:  # sources: right of their first reader
            readers = [self.ancestor_in(e.dst, g) for e in self.d.edges if e.src == n.id]
            lanes = [lane[r] for r in readers if r in lane]
            put(n.id, min(lanes) + 1 if lanes else 0)
        return lane

    def _measure(self, g: Graph) -> tuple[float, float]:
        for n in g.nodes:
            self.size[n.id] = self._measure_frame(n) if n.graph is not None else box_size(n)
            self.spine.setdefault(n.id, self.size[n.id][0] / 2)
        row = self._rows(g)
        if not row:
            self.grids[id(g)] = Grid(row_y=[0.0], row_h=[0.0], lane_x=[0.0], lane_w=[0.0], lane_spine=[0.0])
            return 0.0, 0.0
        lane = self._lanes(g, row)
        grid = Grid(cell={n: (row[n], lane[n]) for n in row})
        n_rows, n_lanes = max(row.values()) + 1, max(lane.values()) + 1
        grid.row_h = [max([self.size[n][1] for n in row if row[n] == r], default=0.0) for r in range(n_rows)]
        # Nodes of a lane line up on one vertical (a frame's is where the stream enters it), so that the arrows
        # between them are straight.
        for i in range(n_lanes):
            members = [n for n in lane if lane[n] == i]
            grid.lane_spine.append(max([self.spine[n] for n in members], default=0.0))
            grid.lane_w.append(grid.lane_spine[-1] + max([self.size[n][0] - self.spine[n] for n in members],
                                                         default=0.0))
        y = 0.0
        for r, h in enumerate(grid.row_h):  # half a gap next to a port's row, which has no height
            y += 0.0 if r == 0 else ROW_GAP if h and grid.row_h[r - 1] else ROW_GAP / 2
            grid.row_y.append(y)
            y += h
        x = 0.0
        for w in grid.lane_w:
            grid.lane_x.append(x)
            x += w + LANE_GAP
        self.grids[id(g)] = grid
        return x - LANE_GAP, y

    def _measure_frame(self, n: Node) -> tuple[float, float]:
        w, h = self._measure(n.graph)
        title = max(text_width(frame_title(n), 10.5, bold=True), text_width(frame_detail(n), 7.5))
        grid = self.grids[id(n.graph)]
        entry = grid.lane_x[0] + grid.lane_spine[0]
        shift = max(0.0, title + 24 - (FRAME_PAD_LEFT + entry))  # keep the title clear of the entering arrow
        self.header_shift[n.id] = shift
        self.spine[n.id] = FRAME_PAD_LEFT + shift + entry
        repeat = text_width(f"×{n.repeat}", 16, bold=True) + 16 if n.repeat > 1 else 0.0
        width = max(FRAME_PAD_LEFT + shift + w + FRAME_PAD_RIGHT, title + repeat + 40)
        return width, FRAME_HEADER + h + FRAME_PAD_BOTTOM

    def _place(self, g: Graph, x0: float, y0: float) -> None:
        grid = self.grids[id(g)]
        grid.origin = (x0, y0)
        for n in g.nodes:
            r, ln = grid.cell[n.id]
            w, h = self.size[n.id]
            x = x0 + grid.lane_x[ln] + grid.lane_spine[ln] - self.spine[n.id]
            y = y0 + grid.row_y[r] + (0 if n.graph is not None else (grid.row_h[r] - h) / 2)
            self.rect[n.id] = Rect(x, y, w, h)
            self.grid_of[n.id] = grid
            if n.graph is not None:
                self._place(n.graph, x + FRAME_PAD_LEFT + self.header_shift[n.id], y + FRAME_HEADER)
        # Ports sit on the frame's border, so that arrows run through it without a break.
        if g.in_port is not None and self.parent.get(g.in_port) is not None:
            frame = self.rect[self.parent[g.in_port]]
            self.rect[g.in_port].y = frame.y
        if g.out_port is not None and self.parent.get(g.out_port) is not None:
            frame = self.rect[self.parent[g.out_port]]
            self.rect[g.out_port].y = frame.bottom

    # ----- arrows -----

    def entry(self, node: int) -> tuple[float, float]:
        """Where an arrow into this node ends: a frame is entered at its in-port."""
        n = self.d.nodes[node]
        if n.graph is not None and n.graph.in_port is not None:
            p = self.rect[n.graph.in_port]
            return p.x, p.y
        r = self.rect[node]
        return r.cx, r.y

    def exit(self, node: int) -> tuple[float, float]:
        n = self.d.nodes[node]
        if n.graph is not None and n.graph.out_port is not None:
            p = self.rect[n.graph.out_port]
            return p.x, p.y
        r = self.rect[node]
        return r.cx, r.bottom

    def _between(self, grid: Grid, lane: int, r0: int, r1: int) -> list[int]:
        """Nodes of `grid` in `lane` in rows strictly between r0 and r1."""
        return [n for n, (r, ln) in grid.cell.items() if ln == lane and r0 < r < r1 and self.size[n] != (0.0, 0.0)]

    def row_top(self, node: int) -> float:
        grid = self.grid_of[node]
        return grid.origin[1] + grid.row_y[grid.cell[node][0]]

    def route(self, e: Edge) -> tuple[list[tuple[float, float]], tuple[float, float] | None]:
        """The arrow's points, and the corner where it leaves the straight line down from its source (or None)."""
        src, dst = self.d.nodes[e.src], self.d.nodes[e.dst]
        x0, y0 = self.exit(e.src)
        if self.graph_of[e.src] is not self.graph_of[e.dst]:
            return self._cross(e, x0, y0), None
        grid = self.grid_of[e.dst]
        rd = self.rect[e.dst]
        xt, yt = self.entry(e.dst)
        (rs, ls), (rt, lt) = grid.cell[e.src], grid.cell[e.dst]
        # Below the source: under a frame's header when the source is the frame's entry.
        below = grid.origin[1] + ROW_GAP / 4 if src.kind == "port" else y0 + ROW_GAP / 2
        above = self.row_top(e.dst) - ROW_GAP / 2
        circle = is_circle(dst)
        if dst.graph is None and not circle and abs(x0 - rd.cx) > 1 and ls != lt:
            xt = rd.cx + (rd.w / 4 if x0 > rd.cx else -rd.w / 4)  # beside the arrow coming from above
        if ls == lt and not self._between(grid, ls, rs, rt):
            if abs(x0 - xt) < 0.5:
                return [(x0, y0), (xt, yt)], None
            return [(x0, y0), (x0, above), (xt, above), (xt, yt)], (x0, above)
        if ls == lt:  # skips over nodes of its own lane: around their left (a residual connection)
            xb = min(self.rect[n].x for n in self._between(grid, ls, rs, rt)) - 16
            if circle:
                return [(x0, y0), (x0, below), (xb, below), (xb, rd.cy), (rd.x, rd.cy)], (x0, below)
            return [(x0, y0), (x0, below), (xb, below), (xb, above), (xt, above), (xt, yt)], (x0, below)
        if circle and not self._between(grid, ls, rs, rt + 1):  # joins a sum from the side
            side = rd.right if x0 > rd.cx else rd.x
            return [(x0, y0), (x0, rd.cy), (side, rd.cy)], None
        if src.kind != "port" and not self._between(grid, ls, rs, rt):  # down its own lane, then across
            return [(x0, y0), (x0, above), (xt, above), (xt, yt)], (x0, above)
        return [(x0, y0), (x0, below), (xt, below), (xt, yt)], (x0, below)  # across first, then down

    def _cross(self, e: Edge, x0: float, y0: float) -> list[tuple[float, float]]:
        """A side input from another frame: down the gap between the two frames' lanes, then into the side of
        the reading box (or its top, off-centre, when another box stands beside it)."""
        rd = self.rect[e.dst]
        g = self.graph_of[e.src]
        dst_anc = self.ancestor_in(e.dst, g)
        if dst_anc is None:  # not drawn from an outer level: go straight
            return [(x0, y0), (x0, rd.y - ROW_GAP / 2), (rd.cx, rd.y - ROW_GAP / 2), (rd.cx, rd.y)]
        grid = self.grids[id(g)]
        (rs, ls), (rt, lt) = grid.cell[e.src], grid.cell[dst_anc]
        gx = grid.origin[0]
        if self.d.nodes[e.src].graph is None and not self._between(grid, ls, rs, rt + 1):
            xc = x0  # straight down its own lane
        elif ls > lt:
            xc = gx + grid.lane_x[ls] - LANE_GAP / 2
        elif ls < lt:
            xc = gx + grid.lane_x[lt] - LANE_GAP / 2
        else:
            xc = gx + grid.lane_x[ls] + grid.lane_w[ls] + LANE_GAP / 3
        start = [(x0, y0)] if xc == x0 else [(x0, y0), (x0, y0 + ROW_GAP / 3), (xc, y0 + ROW_GAP / 3)]
        side = rd.right if xc > rd.cx else rd.x
        inner = self.grid_of[e.dst]
        row = inner.cell[e.dst][0]
        lo, hi = sorted((xc, side))
        blocked = [n for n, (r, _) in inner.cell.items() if r == row and n != e.dst and self.size[n] != (0.0, 0.0)
                   and lo < self.rect[n].cx < hi]
        if not blocked:
            return [*start, (xc, rd.cy), (side, rd.cy)]
        above = rd.y - ROW_GAP * 0.3  # not the residual's corner, which sits half a gap up
        xe = rd.cx + (rd.w / 4 if xc > rd.cx else -rd.w / 4)
        return [*start, (xc, above), (xe, above), (xe, rd.y)]


def frame_title(n: Node) -> str:
    return f"{n.title}  ·  {n.name}" if n.name else n.title


def frame_detail(n: Node) -> str:
    params = f"{human(n.params)} params" + (" each" if n.repeat > 1 else "") if n.params else ""
    return "  ·  ".join(filter(None, [n.detail, params]))
