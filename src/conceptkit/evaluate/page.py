"""The HTML of an evaluation report: tables, embedded PNGs, one self-contained page."""

from __future__ import annotations

import base64
import html
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    return html.escape(str(v))


def html_table(title: str, columns: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{fmt(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<h2>{html.escape(title)}</h2><table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def img(path: str, caption: str) -> str:
    data = base64.b64encode(Path(path).read_bytes()).decode("ascii")
    return (f'<figure><img alt="{html.escape(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


CSS = """body{font-family:system-ui,sans-serif;margin:2em auto;padding:0 1.5em;max-width:1100px;color:#222;background:#fff}
table{border-collapse:collapse;margin:.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;text-align:right;font-size:13px}
th{background:#f0f0f0}figure{display:inline-block;margin:.5em}img{max-width:100%;image-rendering:pixelated}
figcaption{font-size:12px;color:#555}.note{color:#555;font-size:13px}"""


def page(title: str, sections: list[str], note: str = "") -> str:
    return (f"<!DOCTYPE html><html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title><style>{CSS}</style></head>"
            f"<body><h1>{html.escape(title)}</h1><p class=\"note\">{html.escape(note)}</p>{''.join(sections)}</body></html>\n")
