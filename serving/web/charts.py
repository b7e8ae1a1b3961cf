"""Inline SVG charts: no JavaScript, no front-end build, readable when printed."""

from __future__ import annotations

from datetime import datetime
from html import escape


def trend_svg(
    points: list[tuple[datetime, float]],
    *,
    medium: float | None = None,
    high: float | None = None,
    width: int = 520,
    height: int = 180,
    label: str = "Risk over time",
) -> str:
    """A line of risk (0-1) over time with the tier thresholds as dashed lines."""
    pad_l, pad_r, pad_t, pad_b = 48, 12, 12, 30
    inner_w, inner_h = width - pad_l - pad_r, height - pad_t - pad_b
    top = max([0.3, *(r for _, r in points), (high or 0) * 1.2])
    top = min(1.0, round(top * 1.1 + 0.049, 1))

    def y(r: float) -> float:
        return pad_t + inner_h * (1 - r / top)

    if len(points) > 1:
        t0, t1 = points[0][0].timestamp(), points[-1][0].timestamp()
        span = (t1 - t0) or 1.0

        def x(t: datetime) -> float:
            return pad_l + inner_w * (t.timestamp() - t0) / span
    else:

        def x(_t: datetime) -> float:
            return pad_l + inner_w / 2

    parts = [
        f'<svg class="trend" role="img" aria-label="{escape(label)}" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(label)}</title>",
        f'<rect x="{pad_l}" y="{pad_t}" width="{inner_w}" height="{inner_h}" fill="#fafafa" stroke="#999"/>',
    ]
    for frac in (0.0, 0.5, 1.0):
        r = top * frac
        parts.append(
            f'<text x="{pad_l - 6}" y="{y(r) + 4:.1f}" font-size="12" text-anchor="end">{r * 100:.0f}%</text>'
        )
    for value, name, colour in ((medium, "medium", "#b26b00"), (high, "high", "#b00020")):
        if value is not None and value < top:
            parts.append(
                f'<line x1="{pad_l}" x2="{pad_l + inner_w}" y1="{y(value):.1f}" y2="{y(value):.1f}" '
                f'stroke="{colour}" stroke-dasharray="5 4"><title>{name} risk from {value * 100:.0f}%</title></line>'
            )
    if points:
        coords = " ".join(f"{x(t):.1f},{y(r):.1f}" for t, r in points)
        parts.append(f'<polyline points="{coords}" fill="none" stroke="#1f4e8c" stroke-width="2.5"/>')
        for t, r in points:
            parts.append(
                f'<circle cx="{x(t):.1f}" cy="{y(r):.1f}" r="4" fill="#1f4e8c">'
                f"<title>{t:%Y-%m-%d}: {r * 100:.1f}%</title></circle>"
            )
        parts.append(
            f'<text x="{pad_l}" y="{height - 8}" font-size="12">{points[0][0]:%Y-%m-%d}</text>'
        )
        if len(points) > 1:
            parts.append(
                f'<text x="{pad_l + inner_w}" y="{height - 8}" font-size="12" text-anchor="end">'
                f"{points[-1][0]:%Y-%m-%d}</text>"
            )
    parts.append("</svg>")
    return "".join(parts)
