"""A minimal SVG writer: shapes appended as strings, escaped once here."""
from __future__ import annotations

import itertools
from xml.sax.saxutils import escape, quoteattr

FONT = "font-family='DejaVu Sans, Helvetica, Arial, sans-serif'"
_IDS = itertools.count()  # ids of markers/patterns stay unique when several SVGs share one HTML page


def _attrs(attrs: dict) -> str:
    return " ".join(f"{k.rstrip('_').replace('_', '-')}={quoteattr(str(v))}" for k, v in attrs.items() if v is not None)


class Svg:
    """An SVG document of a fixed size; elements are added in drawing order."""

    def __init__(self, width: float, height: float, title: str = ""):
        self.width, self.height = width, height
        self.parts: list[str] = []
        self.defs: list[str] = []
        if title:
            self.parts.append(f"<title>{escape(title)}</title>")

    def rect(self, x, y, w, h, **attrs) -> None:
        self.parts.append(f"<rect {_attrs(dict(x=round(x, 2), y=round(y, 2), width=round(w, 2), height=round(h, 2), **attrs))}/>")

    def path(self, d: str, **attrs) -> None:
        self.parts.append(f"<path {_attrs(dict(d=d, **attrs))}/>")

    def text(self, x, y, content: str, size: float = 12, anchor: str = "start", **attrs) -> None:
        self.parts.append(
            f"<text {_attrs(dict(x=round(x, 2), y=round(y, 2), font_size=size, text_anchor=anchor, **attrs))} {FONT}>"
            f"{escape(content)}</text>")

    def tooltip(self, content: str) -> None:
        """A hover text for the element added last (wraps it in a group)."""
        last = self.parts.pop()
        self.parts.append(f"<g><title>{escape(content)}</title>{last}</g>")

    def arrow_marker(self, color: str = "#888") -> str:
        name = f"arrow{next(_IDS)}"
        self.defs.append(
            f"<marker id='{name}' viewBox='0 0 10 10' refX='9' refY='5' markerWidth='7' markerHeight='7' "
            f"orient='auto-start-reverse'><path d='M 0 0 L 10 5 L 0 10 z' fill='{color}'/></marker>")
        return f"url(#{name})"

    def hatch(self, color: str = "#bbb") -> str:
        name = f"hatch{next(_IDS)}"
        self.defs.append(
            f"<pattern id='{name}' width='6' height='6' patternUnits='userSpaceOnUse' patternTransform='rotate(45)'>"
            f"<rect width='6' height='6' fill='#f4f4f4'/><line x1='0' y1='0' x2='0' y2='6' stroke='{color}' "
            f"stroke-width='2'/></pattern>")
        return f"url(#{name})"

    def __str__(self) -> str:
        defs = f"<defs>{''.join(self.defs)}</defs>" if self.defs else ""
        w, h = round(self.width), round(self.height)
        return (f"<svg xmlns='http://www.w3.org/2000/svg' width='{w}' height='{h}' viewBox='0 0 {w} {h}'>"
                f"{defs}{''.join(self.parts)}</svg>")


def text_width(content: str, size: float = 12) -> float:
    """A width estimate for laying out text (no font metrics in plain SVG)."""
    return 0.6 * size * len(content)
