"""The self-contained HTML leaderboard: the blocks of :func:`harness.report.report_blocks`
rendered with inline styles, plots and gallery images embedded as base64 PNG data URIs,
and a few lines of inline script that sort a table when its header is clicked. It opens
offline, from a mail attachment or a CI artifact, with no external request."""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path
from typing import Any

from harness.report import GALLERY_KINDS, Leaderboard, report_blocks

STYLE = """
:root { --fg: #1b1f24; --muted: #57606a; --line: #d0d7de; --head: #f6f8fa; --warn: #fff8c5; --bad: #ffebe9; }
* { box-sizing: border-box; }
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; color: var(--fg); margin: 0 auto;
       max-width: 1400px; padding: 16px 24px 48px; background: #fff; }
h1 { font-size: 26px; margin: 8px 0 12px; }
h2 { font-size: 20px; margin: 32px 0 8px; padding-bottom: 4px; border-bottom: 1px solid var(--line); }
h3 { font-size: 16px; margin: 20px 0 6px; }
p { margin: 6px 0 10px; max-width: 110ch; }
code { background: var(--head); padding: 0 4px; border-radius: 4px; font-size: 12.5px; }
ul.warnings { background: var(--warn); border: 1px solid #d4a72c66; border-radius: 6px; padding: 8px 12px 8px 28px; }
.scroll { overflow-x: auto; margin: 6px 0 14px; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid var(--line); padding: 4px 8px; text-align: left; vertical-align: top; white-space: nowrap; }
th { background: var(--head); position: sticky; top: 0; cursor: pointer; user-select: none; }
th.sorted-asc::after { content: " \\25B2"; font-size: 10px; }
th.sorted-desc::after { content: " \\25BC"; font-size: 10px; }
tr:nth-child(even) td { background: #fbfcfd; }
table.failed td { background: var(--bad); white-space: normal; max-width: 60ch; }
table.main td:nth-child(2) { font-weight: 600; }
figure { display: inline-block; margin: 8px 16px 8px 0; vertical-align: top; }
figure img { max-width: 100%; border: 1px solid var(--line); }
figcaption { color: var(--muted); font-size: 12px; }
table.gallery img { display: block; width: 120px; height: auto; image-rendering: pixelated; }
table.gallery td { padding: 2px; }
footer { color: var(--muted); margin-top: 32px; font-size: 12px; }
"""

# Sort a table by the clicked column: numbers (leading number of the cell) before text.
SCRIPT = """
"use strict";
(function () {
  function key(cell) {
    var text = cell.textContent.trim();
    var m = text.match(/^[+-]?\\d+(\\.\\d+)?/);
    return m ? [0, parseFloat(m[0]), text] : [1, 0, text];
  }
  function compare(a, b) {
    if (a[0] !== b[0]) { return a[0] - b[0]; }
    if (a[0] === 0 && a[1] !== b[1]) { return a[1] - b[1]; }
    return a[2].localeCompare(b[2]);
  }
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var heads = table.querySelectorAll("thead th");
    heads.forEach(function (th, column) {
      th.addEventListener("click", function () {
        var body = table.tBodies[0];
        var rows = Array.prototype.slice.call(body.rows);
        var descending = th.classList.contains("sorted-asc");
        heads.forEach(function (h) { h.classList.remove("sorted-asc", "sorted-desc"); });
        th.classList.add(descending ? "sorted-desc" : "sorted-asc");
        rows.sort(function (r1, r2) {
          var c = compare(key(r1.cells[column]), key(r2.cells[column]));
          return descending ? -c : c;
        });
        rows.forEach(function (r) { body.appendChild(r); });
      });
    });
  });
})();
"""


def inline(text: str) -> str:
    """Escape ``text`` and turn its **bold**, *italic* and `code` marks into tags."""
    text = str(text).replace("\\*", "\x00")
    out = html.escape(text, quote=False)
    out = re.sub(r"`([^`]+)`", r"<code>\1</code>", out)
    out = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", out)
    out = re.sub(r"(?<![\w*])\*([^*\s][^*]*?)\*(?![\w*])", r"<em>\1</em>", out)
    return out.replace("\x00", "*")


def data_uri(path: Path | str) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(head: list[str], rows: list[list[Any]], css: str) -> str:
    parts = [f'<div class="scroll"><table class="sortable {html.escape(css)}"><thead><tr>']
    parts += [f"<th>{html.escape(str(h))}</th>" for h in head]
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def _gallery(gallery: dict) -> str:
    parts = ['<div class="scroll"><table class="gallery"><thead><tr><th>image id</th><th>method</th>']
    parts += [f"<th>{k}</th>" for k in GALLERY_KINDS]
    parts.append("</tr></thead><tbody>")
    for image_id in gallery["ids"]:
        for entry in gallery["rows"]:
            kinds = entry["images"].get(image_id, {})
            cells = [html.escape(str(image_id)), html.escape(f"{entry['label']} (seed {entry['seed']})")]
            for kind in GALLERY_KINDS:
                if kind in kinds:
                    alt = html.escape(f"{entry['label']} {image_id} {kind}")
                    cells.append(f'<img alt="{alt}" src="{data_uri(kinds[kind])}">')
                else:
                    cells.append("-")
            parts.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    parts.append("</tbody></table></div>")
    return "".join(parts)


def render_html(board: Leaderboard, plots: dict[str, Path] | None = None, gallery: dict | None = None) -> str:
    """The report as one HTML document. ``plots``: title -> PNG path; ``gallery``: as
    returned by :func:`harness.report.collect_gallery` (absolute paths)."""
    body: list[str] = []
    for block in report_blocks(board, plots, gallery):
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            body.append(f"<{kind}>{inline(block[1])}</{kind}>")
        elif kind == "p":
            body.append(f"<p>{inline(block[1])}</p>")
        elif kind == "ul":
            body.append('<ul class="warnings">')  # the only list in a report
            body += [f"<li>{inline(item)}</li>" for item in block[1]]
            body.append("</ul>")
        elif kind == "table":
            _, head, rows, css = block
            body.append(_table(head, rows, css))
        elif kind == "img":
            title = block[1]
            body.append(f'<figure><img alt="{html.escape(title)}" src="{data_uri(plots[block[2]])}">'
                        f"<figcaption>{html.escape(title)}</figcaption></figure>")
        elif kind == "gallery":
            body.append(_gallery(block[1]))
    title = "wsss-bench leaderboard"
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        "<link rel=\"icon\" href=\"data:,\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n<footer>Generated by wsss-bench report. Click a column header to sort.</footer>\n"
        + f"<script>{SCRIPT}</script>\n</body>\n</html>\n"
    )
