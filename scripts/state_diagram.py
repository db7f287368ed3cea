"""Draw a Mermaid state diagram as SVG, for the documentation site.

``docs/state-machine.md`` (generated from the core's transition table by
``scripts/gen_docs.py``) holds its diagram as a Mermaid ``stateDiagram-v2``
block, which code hosts draw as they show the file. The site draws the same
block itself, at build time, so that it needs no script from elsewhere: this
module reads the block's edges (``a --> b: events``, ``[*] --> a``,
``a --> [*]``) and lays them out in two rows.

- The main row is the longest path from the start to the first final state,
  once the edges that go back (found by a depth-first walk from the start)
  are set aside: the way a task goes when all is well.
- Every other state sits in the row below, ordered by where its neighbours in
  the main row are.
- Edges within the main row go straight to the next state, or arc above the
  row (the ones going back arc higher); edges between the rows are straight
  lines, two opposite ones drawn apart; a state's edge to itself is a loop.

Blocks of another kind of diagram are left as they are.
"""

from __future__ import annotations

import html
import math
import re
from collections.abc import Iterable

START = "[*]"
BLOCK = re.compile(r"^```mermaid\n(?P<body>stateDiagram(?:-v2)?\n.*?)^```\n", re.M | re.S)
EDGE = re.compile(r"^\s*(?P<source>\S+)\s*-->\s*(?P<target>\S+?)\s*(?::\s*(?P<label>.*?))?\s*$")

CHAR = 7.6  # width of one character of the labels' monospace font, in px
NODE_H = 34
GAP_X = 70
ROW_Y = (150.0, 330.0)
MARGIN = 30


def render_mermaid_blocks(markdown: str) -> str:
    """Replace each Mermaid state diagram in a page by its SVG drawing."""
    return BLOCK.sub(lambda m: "\n" + draw(m["body"]) + "\n\n", markdown)


def parse(body: str) -> tuple[list[tuple[str, str, str]], list[str], list[str]]:
    """The edges (source, target, label), the initial states and the final states."""
    edges: list[tuple[str, str, str]] = []
    initial: list[str] = []
    final: list[str] = []
    for line in body.splitlines()[1:]:
        match = EDGE.match(line)
        if match is None:
            if line.strip():
                raise ValueError(f"state diagram: cannot read {line.strip()!r}")
            continue
        source, target, label = match["source"], match["target"], match["label"] or ""
        if source == START:
            initial.append(target)
        elif target == START:
            final.append(source)
        else:
            edges.append((source, target, label))
    return edges, initial, final


def _back_edges(
    starts: list[str], succ: dict[str, list[str]], states: list[str]
) -> set[tuple[str, str]]:
    back: set[tuple[str, str]] = set()
    seen: set[str] = set()
    on_path: set[str] = set()

    def visit(node: str) -> None:
        seen.add(node)
        on_path.add(node)
        for nxt in succ.get(node, []):
            if nxt in on_path:
                back.add((node, nxt))
            elif nxt not in seen:
                visit(nxt)
        on_path.discard(node)

    for node in [*starts, *states]:
        if node not in seen:
            visit(node)
    return back


def _main_row(
    starts: list[str], final: list[str], succ: dict[str, list[str]], back: set[tuple[str, str]]
) -> list[str]:
    """The longest forward path from an initial state to the first final state."""
    goal = final[0] if final else None
    best: dict[str, list[str]] = {}

    def longest(node: str) -> list[str]:
        if node not in best:
            best[node] = [node] if node == goal or goal is None else []
            for nxt in succ.get(node, []):
                if (node, nxt) in back or nxt == node:
                    continue
                tail = longest(nxt)
                if tail and len(tail) + 1 > len(best[node]):
                    best[node] = [node, *tail]
        return best[node]

    paths = [longest(s) for s in starts]
    return max(paths, key=len) if paths and max(map(len, paths)) else starts[:1]


def draw(body: str) -> str:
    """The SVG drawing of one ``stateDiagram-v2`` block."""
    edges, initial, final = parse(body)
    states: list[str] = []
    for name in [*initial, *(s for e in edges for s in e[:2]), *final]:
        if name not in states:
            states.append(name)
    succ: dict[str, list[str]] = {}
    for source, target, _ in edges:
        succ.setdefault(source, []).append(target)
    back = _back_edges(initial, succ, states)
    main = _main_row(initial, final, succ, back)
    column = {s: float(i) for i, s in enumerate(main)}
    others = [s for s in states if s not in column]
    neighbours: dict[str, list[float]] = {s: [] for s in others}
    for source, target, _ in edges:
        if source in neighbours and target in column:
            neighbours[source].append(column[target])
        if target in neighbours and source in column:
            neighbours[target].append(column[source])
    others.sort(key=lambda s: sum(neighbours[s]) / len(neighbours[s]) if neighbours[s] else 0.0)

    width = {s: max(90.0, CHAR * len(s) + 28) for s in states}
    step = max(width.values()) + GAP_X
    x: dict[str, float] = {}
    y: dict[str, float] = {}
    left = MARGIN + 60  # room for the initial state's dot
    for s in main:
        x[s], y[s] = left + step * column[s] + step / 2, ROW_Y[0]
    previous = -1e9
    for s in others:
        wanted = (
            left + step * (sum(neighbours[s]) / len(neighbours[s])) + step / 2
            if neighbours[s]
            else left + step / 2
        )
        x[s], y[s] = max(wanted, previous + step), ROW_Y[1]
        previous = x[s]
    right = max(x[s] + width[s] / 2 for s in states) + 80
    bottom = ROW_Y[1] + NODE_H / 2 + 80

    pairs = {(s, t) for s, t, _ in edges}
    highest = ROW_Y[0] - NODE_H / 2 - 50.0  # the loops' and arcs' tops lower this
    shapes: list[str] = []
    labels: list[str] = []

    def box_point(state: str, towards_x: float, towards_y: float) -> tuple[float, float]:
        cx, cy = x[state], y[state]
        dx, dy = towards_x - cx, towards_y - cy
        if dx == 0 and dy == 0:
            return cx, cy
        scale = min(
            (width[state] / 2) / abs(dx) if dx else float("inf"),
            (NODE_H / 2) / abs(dy) if dy else float("inf"),
        )
        return cx + dx * scale, cy + dy * scale

    for source, target, label in edges:
        text = label
        if source == target:
            cx, top = x[source], y[source] - NODE_H / 2
            shapes.append(
                f'<path d="M {cx - 14:.1f} {top:.1f} C {cx - 30:.1f} {top - 42:.1f} '
                f'{cx + 30:.1f} {top - 42:.1f} {cx + 14:.1f} {top:.1f}" marker-end="url(#arrow)"/>'
            )
            labels.append(_label(cx, top - 40, text))
            continue
        same_row = y[source] == y[target]
        if same_row and source in column:
            span = column[target] - column[source]
            if span == 1:
                a = box_point(source, x[target], y[target])
                b = box_point(target, x[source], y[source])
                shapes.append(_line(a, b))
                labels.append(_label((a[0] + b[0]) / 2, a[1] - 8, text))
                continue
            # An arc above the row: higher for a longer span, higher still going
            # back; forward arcs leave and reach the right and left quarters of
            # the boxes, backward ones the other quarters, so no two meet.
            rise = 20 + 40 * abs(span) + (30 if span < 0 else 0)
            top = y[source] - NODE_H / 2
            side = 1 if span > 0 else -1
            a = (x[source] + side * width[source] / 4, top)
            b = (x[target] - side * width[target] / 4, top)
            apex = top - rise
            highest = min(highest, top - rise * 0.75 - 20)
            shapes.append(
                f'<path d="M {a[0]:.1f} {a[1]:.1f} C {a[0]:.1f} {apex:.1f} {b[0]:.1f} '
                f'{apex:.1f} {b[0]:.1f} {b[1]:.1f}" marker-end="url(#arrow)"/>'
            )
            labels.append(_label((a[0] + b[0]) / 2, top - rise * 0.75 - 4, text))
            continue
        sx, sy, tx, ty = x[source], y[source], x[target], y[target]
        if (target, source) in pairs:
            # Two opposite edges between the same states: draw them apart.
            length = ((tx - sx) ** 2 + (ty - sy) ** 2) ** 0.5
            nx, ny = -(ty - sy) / length * 9, (tx - sx) / length * 9
            sx, sy, tx, ty = sx + nx, sy + ny, tx + nx, ty + ny
        a = box_point(source, tx, ty) if (target, source) not in pairs else (sx, sy)
        b = box_point(target, sx, sy) if (target, source) not in pairs else (tx, ty)
        if (target, source) in pairs:
            a = _clip(a, b, width[source] / 2, NODE_H / 2)
            b = _clip(b, a, width[target] / 2, NODE_H / 2)
        shapes.append(_line(a, b))
        labels.append(_label_along(a, b, text))

    markers: list[str] = []
    for s in initial:
        cx, cy = x[s] - width[s] / 2 - 50, y[s]
        markers.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="8" class="dot"/>')
        shapes.append(_line((cx + 8, cy), (x[s] - width[s] / 2, cy)))
    for s in final:
        if s in column and s == main[-1]:
            cx, cy, a = x[s] + width[s] / 2 + 50, y[s], (x[s] + width[s] / 2, y[s])
            b = (cx - 11, cy)
        else:
            cx, cy, a = x[s], y[s] + NODE_H / 2 + 50, (x[s], y[s] + NODE_H / 2)
            b = (cx, cy - 11)
        shapes.append(_line(a, b))
        markers.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="10" class="ring"/>')
        markers.append(f'<circle cx="{cx:.1f}" cy="{cy:.1f}" r="5.5" class="dot"/>')

    nodes = [
        f'<rect x="{x[s] - width[s] / 2:.1f}" y="{y[s] - NODE_H / 2:.1f}" '
        f'width="{width[s]:.1f}" height="{NODE_H}" rx="8"/>'
        f'<text x="{x[s]:.1f}" y="{y[s] + 5:.1f}" class="state">{html.escape(s)}</text>'
        for s in states
    ]
    title = "State diagram: " + "; ".join(
        f"{s} to {t}" + (f" on {lbl}" if lbl else "") for s, t, lbl in edges
    )
    return "\n".join(
        [
            '<figure class="state-diagram">',
            f'<svg xmlns="http://www.w3.org/2000/svg" '
            f'viewBox="0 {highest - 10:.0f} {right:.0f} {bottom - highest + 10:.0f}" '
            f'role="img" class="state-diagram" style="max-width: 100%; height: auto">',
            f"<title>{html.escape(title)}</title>",
            "<defs>",
            '<marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" '
            'markerHeight="7" orient="auto-start-reverse">',
            '<polygon points="0,0 10,5 0,10" fill="currentColor"/>',
            "</marker>",
            "<style>",
            "svg.state-diagram { color: #37474f; font-family: ui-monospace, monospace; }",
            "svg.state-diagram path, svg.state-diagram line "
            "{ fill: none; stroke: currentColor; stroke-width: 1.3; }",
            "svg.state-diagram rect { fill: #e8eaf6; stroke: #3f51b5; stroke-width: 1.5; }",
            "svg.state-diagram text { font-size: 12px; text-anchor: middle; fill: currentColor; }",
            "svg.state-diagram text.state { font-size: 13px; font-weight: 600; }",
            "svg.state-diagram text.label { paint-order: stroke; stroke: #ffffff; "
            "stroke-width: 4px; stroke-linejoin: round; }",
            "svg.state-diagram .dot { fill: currentColor; stroke: none; }",
            "svg.state-diagram .ring { fill: none; stroke: currentColor; stroke-width: 1.5; }",
            "</style>",
            "</defs>",
            *shapes,
            *nodes,
            *markers,
            *labels,
            "</svg>",
            "</figure>",
        ]
    )


def _line(a: Iterable[float], b: Iterable[float]) -> str:
    (x1, y1), (x2, y2) = a, b
    return (
        f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" marker-end="url(#arrow)"/>'
    )


def _clip(
    point: tuple[float, float], towards: tuple[float, float], half_w: float, half_h: float
) -> tuple[float, float]:
    """Move ``point`` (inside a state's box, offset from its centre) out to the box's edge."""
    dx, dy = towards[0] - point[0], towards[1] - point[1]
    scale = min(half_w / abs(dx) if dx else float("inf"), half_h / abs(dy) if dy else float("inf"))
    return point[0] + dx * scale, point[1] + dy * scale


def _label_along(a: tuple[float, float], b: tuple[float, float], text: str) -> str:
    """A label along the line from a to b, nearer a, just above it, read left to right."""
    angle = math.degrees(math.atan2(b[1] - a[1], b[0] - a[0]))
    if angle > 90:
        angle -= 180
    elif angle < -90:
        angle += 180
    # Lines between the rows cross near their middles: a label starts a little
    # way from its source instead, clear of the source's box.
    length = math.hypot(b[0] - a[0], b[1] - a[1])
    share = 0.5 if a[1] == b[1] else min(0.5, (16 + CHAR * len(text) / 2) / length)
    cx, cy = a[0] + (b[0] - a[0]) * share, a[1] + (b[1] - a[1]) * share
    normal = math.radians(angle - 90)
    cx, cy = cx + 5 * math.cos(normal), cy + 5 * math.sin(normal)
    if not text:
        return ""
    return (
        f'<text x="{cx:.1f}" y="{cy:.1f}" class="label" '
        f'transform="rotate({angle:.1f} {cx:.1f} {cy:.1f})">{html.escape(text)}</text>'
    )


def _label(cx: float, cy: float, text: str) -> str:
    if not text:
        return ""
    return f'<text x="{cx:.1f}" y="{cy:.1f}" class="label">{html.escape(text)}</text>'
