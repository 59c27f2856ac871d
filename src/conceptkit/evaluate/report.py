"""`--report DIR` of `conceptkit evaluate`: PNG plots (matplotlib, Agg) and one self-contained HTML page.

Rendering only: it reads an evaluation's JSON document and its saved arrays and computes nothing
new. The HTML embeds every PNG as a base64 data URI, so the one file opens anywhere.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from conceptkit import store
from conceptkit.errors import UsageError
from conceptkit.evaluate import report_sections
from conceptkit.evaluate.page import page


def write(doc: dict[str, Any], arrays: dict[str, np.ndarray], folder: Path) -> dict[str, str]:
    """Write the plots and `report.html` for an evaluation document into `folder`; returns {name: path}."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"--report {folder} is a file, not a folder")
    render = {"sliders": report_sections.sliders_section, "images": report_sections.images_section, "cluster": report_sections.cluster_section}[doc["what"]]
    title, sections, files = render(doc, arrays, folder)
    note = (f"conceptkit evaluate {doc['what']} · key {doc['key']} · encoder {doc.get('encoder', '')} · "
            f"every number is recomputable from the arrays in {doc['path']}")
    path = folder / "report.html"
    with store.atomic_path(path) as tmp:
        tmp.write_text(page(title, sections, note), encoding="utf-8")
    return {**files, "html": str(path)}
