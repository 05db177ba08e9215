"""The report as markdown (leaderboard.md): the blocks of harness/report/document.py."""

from __future__ import annotations

import html
from typing import Any

from harness.report.document import report_blocks
from harness.report.leaderboard import Leaderboard
from harness.report.store import GALLERY_KINDS


def _md_cell(value: Any) -> str:
    """A table cell; a (text, hover title) cell keeps its text (markdown has no hover)."""
    text = value[0] if isinstance(value, tuple) else value
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(board: Leaderboard, plots: dict[str, str] | None = None, gallery: dict | None = None,
                pairwise_metrics: list[str] | None = None) -> str:
    """The report as markdown, in the HTML report's order; ``details`` blocks become
    ``<details>`` elements (GitHub renders the markdown inside them). ``plots``: title ->
    relative png path; ``gallery``: as returned by :func:`harness.report.gallery.collect_gallery`,
    with paths relative to the markdown file."""
    lines = _render(report_blocks(board, plots, gallery, pairwise_metrics), plots or {})
    return "\n".join(lines).rstrip("\n") + "\n"


def _render(blocks: list[tuple], plots: dict[str, str]) -> list[str]:
    lines: list[str] = []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "ul":
            lines += [f"- {item}" for item in block[1]] + [""]
        elif kind == "table":
            _, head, rows, _ = block
            lines.append("| " + " | ".join(_md_cell(h) for h in head) + " |")
            lines.append("|" + "---|" * len(head))
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in rows]
            lines.append("")
        elif kind == "img":
            lines += [f"![{block[1]}]({plots[block[2]]})", ""]
        elif kind == "gallery":
            g = block[1]
            lines.append("| image id | method | " + " | ".join(GALLERY_KINDS) + " |")
            lines.append("|" + "---|" * (2 + len(GALLERY_KINDS)))
            for image_id in g["ids"]:
                for entry in g["rows"]:
                    kinds = entry["images"].get(image_id, {})
                    cells = [image_id, f"{entry.get('name', entry['label'])} (seed {entry['seed']})"]
                    cells += [f"![{k}]({kinds[k]})" if k in kinds else "-" for k in GALLERY_KINDS]
                    lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            lines.append("")
        elif kind == "details":
            _, summary, inner, is_open = block
            lines += [f"<details{' open' if is_open else ''}><summary>{html.escape(summary, quote=False)}</summary>", ""]
            lines += _render(inner, plots) + ["</details>", ""]
    return lines
