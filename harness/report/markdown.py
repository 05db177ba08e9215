"""The report as markdown (leaderboard.md): the blocks of harness/report/document.py."""

from __future__ import annotations

from typing import Any

from harness.report.document import report_blocks
from harness.report.leaderboard import Leaderboard
from harness.report.store import GALLERY_KINDS


def _md_cell(text: Any) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(board: Leaderboard, plots: dict[str, str] | None = None, gallery: dict | None = None) -> str:
    """The report as markdown. ``plots``: title -> relative png path; ``gallery``: as
    returned by :func:`collect_gallery`, with paths relative to the markdown file."""
    lines: list[str] = []
    for block in report_blocks(board, plots, gallery):
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
                    cells = [image_id, f"{entry['label']} (seed {entry['seed']})"]
                    cells += [f"![{k}]({kinds[k]})" if k in kinds else "-" for k in GALLERY_KINDS]
                    lines.append("| " + " | ".join(_md_cell(c) for c in cells) + " |")
            lines.append("")
    return "\n".join(lines).rstrip("\n") + "\n"
