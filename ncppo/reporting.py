"""A report built once as blocks (headings, paragraphs, lists, tables, figures) and written both as Markdown
and as a self-contained HTML page, so the two say the same; the inline Markdown the reports use
(`` `code` ``, ``**bold**``) is rendered in the HTML. Used by ``ncppo report`` and the toy world's report.

A block is a tuple: ``("h1"|"h2"|"h3", text)``, ``("p", text)``, ``("list", [items])``,
``("table", header, rows)`` or ``("figure", file name in the output folder, caption)``.
"""

from __future__ import annotations

import base64
import html
import re
from pathlib import Path

from ncppo.io import atomic_write_text


def _inline_html(text: str) -> str:
    """Escaped text with the inline Markdown the report writes: `code` and **bold**."""
    parts = re.split(r"(`[^`]*`)", text)
    out = []
    for part in parts:
        if len(part) >= 2 and part.startswith("`") and part.endswith("`"):
            out.append(f"<code>{html.escape(part[1:-1])}</code>")
        else:
            out.append(re.sub(r"\*\*(.+?)\*\*", r"<strong>\1</strong>", html.escape(part)))
    return "".join(out)


def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _render(blocks: list[tuple], out: Path) -> tuple[str, str]:
    md, page = [], []
    for block in blocks:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            md += ["#" * int(kind[1]) + " " + block[1], ""]
            page.append(f"<{kind}>{_inline_html(block[1])}</{kind}>")
        elif kind == "p":
            md += [block[1], ""]
            page.append(f"<p>{_inline_html(block[1])}</p>")
        elif kind == "list":
            md += [f"- {item}" for item in block[1]] + [""]
            page.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in block[1]) + "</ul>")
        elif kind == "table":
            header, rows = block[1], block[2]
            md += ["| " + " | ".join(map(_md_cell, header)) + " |", "|" + "---|" * len(header)]
            md += ["| " + " | ".join(_md_cell(c) for c in r) + " |" for r in rows] + [""]
            head = "".join(f"<th>{_inline_html(h)}</th>" for h in header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(str(c))}</td>" for c in r) + "</tr>" for r in rows)
            page.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif kind == "figure":
            name, caption = block[1], block[2]
            md += [f"![{caption}]({name})", "", f"*{caption}*", ""]
            data = base64.b64encode((out / name).read_bytes()).decode()
            page.append(f"<figure><img src='data:image/png;base64,{data}' alt='{html.escape(caption)}'>"
                        f"<figcaption>{_inline_html(caption)}</figcaption></figure>")
    return "\n".join(md), "\n".join(page)


STYLE = ("body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1150px;margin:2em auto;padding:0 1em;"
         "color:#222;line-height:1.45}h1{font-size:1.6em}h2{margin-top:1.8em;border-bottom:1px solid #ddd;padding-bottom:.2em}"
         "table{border-collapse:collapse;margin:.6em 0;font-size:.9em}td,th{border:1px solid #ccc;padding:3px 8px;"
         "text-align:left;vertical-align:top}th{background:#f3f3f3}tr:nth-child(even) td{background:#fafafa}"
         "code{background:#f1f1f1;padding:0 .25em;border-radius:3px;font-size:.9em}img{max-width:100%}"
         "figure{margin:1em 0}figcaption{color:#555;font-size:.9em}ul{padding-left:1.4em}")


def write_blocks(blocks: list[tuple], out: Path, title: str) -> Path:
    """``out/report.md`` and ``out/report.html`` (figures inlined) from ``blocks``; returns the Markdown's path."""
    md, body = _render(blocks, out)
    page = (f"<!doctype html><html lang='en'><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style><body>\n{body}\n</body></html>")
    atomic_write_text(out / "report.md", md)
    atomic_write_text(out / "report.html", page)
    return out / "report.md"
