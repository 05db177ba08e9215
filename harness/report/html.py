"""The self-contained HTML leaderboard: the blocks of harness/report/document.py rendered
through the Jinja2 template ``templates/leaderboard.html.j2`` (inline styles, plots and
gallery images embedded as base64 PNG data URIs, a few lines of inline script that sort a
table when its header is clicked). It opens offline, from a mail attachment or a CI
artifact, with no external request."""

from __future__ import annotations

import base64
import html
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from harness.report.document import report_blocks
from harness.report.leaderboard import Leaderboard
from harness.report.store import GALLERY_KINDS

TEMPLATE = "leaderboard.html.j2"


def inline(text: str) -> str:
    """Escape ``text`` and turn its **bold**, *italic* and `code` marks into tags (a code span
    fenced by two backticks and a space may hold backticks, as in markdown)."""
    text = str(text).replace("\\*", "\x00")
    out = html.escape(text, quote=False)
    out = re.sub(r"`` (.+?) ``|`([^`]+)`", lambda m: f"<code>{m.group(1) or m.group(2)}</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", out)
    return out.replace("\x00", "*")


def data_uri(path: Path | str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


@lru_cache(maxsize=1)
def _template():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(Path(__file__).parent / "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    return env.get_template(TEMPLATE)


def _cell(value: Any) -> dict[str, str]:
    """A table cell: plain text, or (text, hover title) — the title carries e.g. the CI."""
    if isinstance(value, tuple):
        return {"text": str(value[0]), "title": str(value[1])}
    return {"text": str(value), "title": ""}


def _context(blocks: list[tuple], plots: dict[str, Path]) -> list[dict[str, Any]]:
    """Document blocks -> the template's dicts (inline marks made HTML, images embedded)."""
    from markupsafe import Markup

    out: list[dict[str, Any]] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            out.append({"kind": kind, "text": Markup(inline(block[1]))})
        elif kind == "ul":
            out.append({"kind": "ul", "items": [Markup(inline(item)) for item in block[1]]})
        elif kind == "table":
            _, head, rows, css = block
            out.append({"kind": "table", "head": [str(h) for h in head], "rows": [[_cell(c) for c in row] for row in rows], "css": css})
        elif kind == "img":
            out.append({"kind": "img", "title": block[1], "src": data_uri(plots[block[2]])})
        elif kind == "gallery":
            g = block[1]
            rows = []
            for image_id in g["ids"]:
                for entry in g["rows"]:
                    kinds = entry["images"].get(image_id, {})
                    cells = [{"alt": f"{entry['label']} {image_id} {k}", "src": data_uri(kinds[k])} if k in kinds else None
                             for k in GALLERY_KINDS]
                    rows.append({"image_id": str(image_id), "label": f"{entry.get('name', entry['label'])} (seed {entry['seed']})", "cells": cells})
            out.append({"kind": "gallery", "kinds": list(GALLERY_KINDS), "rows": rows})
        elif kind == "details":
            _, summary, inner, is_open = block
            out.append({"kind": "details", "summary": Markup(inline(summary)), "blocks": _context(inner, plots), "open": is_open})
    return out


def render_html(board: Leaderboard, plots: dict[str, Path] | None = None, gallery: dict | None = None,
                pairwise_metrics: list[str] | None = None) -> str:
    """The report as one HTML document. ``plots``: title -> PNG path; ``gallery``: as
    returned by :func:`harness.report.gallery.collect_gallery` (absolute paths)."""
    blocks = _context(report_blocks(board, plots, gallery, pairwise_metrics), plots or {})
    return _template().render(title="wsss-bench leaderboard", blocks=blocks)
