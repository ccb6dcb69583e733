"""A tiny document model (a list of blocks) rendered to markdown and to self-contained HTML.

The report builds its content once and renders it twice, so the two files cannot disagree. Blocks:
``("h", level, text)``, ``("p", text)``, ``("warn", text)``, ``("ul", [text, ...])``,
``("table", header, rows)``, ``("img", path, caption)``. Inline text may use ``**bold**`` and ```code```.
The HTML embeds images as base64 data URIs and styles inline: it opens anywhere, offline, as one file.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from pathlib import Path

Block = tuple

CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; max-width: 1300px; margin: 2em auto;
       padding: 0 1em; color: #1a1a1a; line-height: 1.45; }
h1 { border-bottom: 2px solid #ddd; padding-bottom: .2em; }
h2 { margin-top: 1.8em; border-bottom: 1px solid #eee; }
table { border-collapse: collapse; margin: .8em 0; font-size: 13px; }
th, td { border: 1px solid #d0d0d0; padding: 3px 8px; text-align: right; white-space: nowrap; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
tr:nth-child(even) td { background: #fafafa; }
code { background: #f2f2f2; padding: 0 3px; border-radius: 3px; font-size: 92%; }
.warn { background: #fff4e0; border-left: 4px solid #e69500; padding: .4em .8em; margin: .4em 0; }
figure { margin: 1em 0; } figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { color: #555; font-size: 13px; }
"""


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def to_markdown(blocks: Sequence[Block]) -> str:
    """Markdown text; images are linked by file name (they sit next to the markdown file)."""
    out = []
    for b in blocks:
        kind = b[0]
        if kind == "h":
            out.append("#" * b[1] + " " + b[2])
        elif kind == "p":
            out.append(b[1])
        elif kind == "warn":
            out.append(f"> **WARNING**: {b[1]}")
        elif kind == "ul":
            out.append("\n".join(f"- {item}" for item in b[1]))
        elif kind == "table":
            lines = ["| " + " | ".join(_md_cell(h) for h in b[1]) + " |", "|" + "---|" * len(b[1])]
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b[2]]
            out.append("\n".join(lines))
        elif kind == "img":
            out.append(f"![{b[2]}]({Path(b[1]).name})\n\n*{b[2]}*")
    return "\n\n".join(out) + "\n"


def _inline(text: str) -> str:
    """Escape, then turn ``**bold**`` and ```code``` into tags."""
    s = html.escape(str(text))
    s = re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", s)
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", s)


def _html_block(b: Block) -> str:
    kind = b[0]
    if kind == "h":
        return f"<h{b[1]}>{_inline(b[2])}</h{b[1]}>"
    if kind == "p":
        return f"<p>{_inline(b[1])}</p>"
    if kind == "warn":
        return f'<div class="warn"><strong>WARNING</strong>: {_inline(b[1])}</div>'
    if kind == "ul":
        return "<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in b[1]) + "</ul>"
    if kind == "table":
        head = "".join(f"<th>{_inline(h)}</th>" for h in b[1])
        body = "".join("<tr>" + "".join(f"<td>{_inline(c)}</td>" for c in row) + "</tr>" for row in b[2])
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    if kind == "img":
        data = base64.b64encode(Path(b[1]).read_bytes()).decode("ascii")
        return (
            f'<figure><img alt="{html.escape(b[2])}" src="data:image/png;base64,{data}">'
            f"<figcaption>{_inline(b[2])}</figcaption></figure>"
        )
    raise ValueError(f"unknown block kind {kind!r}")


def to_html(blocks: Sequence[Block], title: str) -> str:
    """One self-contained HTML page: inline CSS, images embedded, no external resources."""
    body = "\n".join(_html_block(b) for b in blocks)
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{CSS}</style></head>\n<body>\n{body}\n</body></html>\n"
    )
