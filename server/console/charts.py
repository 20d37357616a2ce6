"""The usage chart: an SVG drawn on the server by pygal, inlined in the page (no script)."""

from __future__ import annotations

from xml.etree import ElementTree

import pygal
from pygal.style import Style

CHART_WIDTH_PX = 960
CHART_HEIGHT_PX = 380
X_LABELS_SHOWN_MAX = 31  # beyond this, only every n-th day is labelled
PAYG_COLORS = ("#d62728", "#ff7f0e")  # pay-as-you-go: warm colors, plans: cool ones
PLAN_COLORS = ("#1f77b4", "#2ca02c", "#17becf", "#9467bd", "#393b79", "#637939",
               "#3182bd", "#31a354", "#756bb1", "#6baed6")

_STYLE_BASE = dict(background="white", plot_background="white", foreground="#222",
                   foreground_strong="#111", foreground_subtle="#999",
                   font_family="sans-serif", label_font_size=12, major_label_font_size=12,
                   legend_font_size=12, title_font_size=14)


def usage_chart(days: list[str], plan_series: list[tuple[str, list[int]]],
                payg_series: list[tuple[str, list[int]]]) -> str:
    """Stacked bars of units per billing day: one series per plan, one per pay-as-you-go
    region. Returns an ``<svg>`` element (no XML declaration, no script)."""
    colors = tuple(PLAN_COLORS[i % len(PLAN_COLORS)] for i in range(len(plan_series)))
    colors += PAYG_COLORS[:len(payg_series)]
    chart = pygal.StackedBar(
        style=Style(colors=colors or PLAN_COLORS, **_STYLE_BASE),
        js=[], disable_xml_declaration=True, explicit_size=True,
        width=CHART_WIDTH_PX, height=CHART_HEIGHT_PX,
        title="Units per billing day (UTC+8): plans and pay-as-you-go",
        legend_at_bottom=True, legend_at_bottom_columns=4, x_label_rotation=30,
        show_minor_x_labels=len(days) <= X_LABELS_SHOWN_MAX,
        x_labels_major_every=max(1, len(days) // X_LABELS_SHOWN_MAX + 1),
        value_formatter=lambda v: f"{int(v or 0):,}", y_title="units",
        include_x_axis=True, print_values=False, no_data_text="No usage in this range")
    chart.x_labels = days
    for title, values in plan_series + payg_series:
        chart.add(title, [v or None for v in values])
    return _without_scripts(chart.render_tree())


def _without_scripts(root: ElementTree.Element) -> str:
    """pygal always embeds a config script; the page runs none (and its CSP forbids them)."""
    for parent in list(root.iter()):
        for child in list(parent):
            if isinstance(child.tag, str) and child.tag.rpartition("}")[2] == "script":
                parent.remove(child)
    ElementTree.register_namespace("", "http://www.w3.org/2000/svg")
    ElementTree.register_namespace("xlink", "http://www.w3.org/1999/xlink")
    return ElementTree.tostring(root, encoding="unicode")


RUNWAY_EXPIRY_COLOR = "#555"


def runway_chart(plans: list[tuple[str, list[tuple[float, int]], float]]) -> str:
    """Projected remaining units per plan against days from now (issue 22): one line per
    plan, each ``(title, points, expires_in_days)``, and the expiries marked as dots on the
    x axis. Days are a drawing coordinate only; every figure shown as text is exact."""
    colors = tuple(PLAN_COLORS[i % len(PLAN_COLORS)] for i in range(len(plans)))
    chart = pygal.XY(
        style=Style(colors=colors + (RUNWAY_EXPIRY_COLOR,), **_STYLE_BASE),
        js=[], disable_xml_declaration=True, explicit_size=True,
        width=CHART_WIDTH_PX, height=CHART_HEIGHT_PX,
        title="Projected remaining units per plan at the recent rate (expiries marked)",
        legend_at_bottom=True, legend_at_bottom_columns=4, x_title="days from now",
        y_title="units", include_x_axis=True, dots_size=2,
        value_formatter=lambda v: f"{int(v or 0):,}",
        x_value_formatter=lambda v: f"{v:,.1f} d", no_data_text="No live plan")
    for title, points, _ in plans:
        chart.add(title, points)
    if plans:
        chart.add("expiry", [(expires, 0) for _, _, expires in plans], stroke=False,
                  dots_size=6)
    return _without_scripts(chart.render_tree())
