"""Markdown tables and the self-contained HTML page (figures embedded)."""
from __future__ import annotations

import base64
import html
import math
import re
from pathlib import Path

import pandas as pd


def md_table(df: pd.DataFrame) -> str:
    def cell(v):
        if isinstance(v, float):
            return "" if math.isnan(v) else f"{v:.4f}"
        return "" if v is None else str(v).replace("|", "\\|").replace("\n", " ")

    head = "| " + " | ".join(df.columns) + " |\n|" + "---|" * len(df.columns) + "\n"
    return head + "".join("| " + " | ".join(cell(v) for v in row) + " |\n" for row in df.itertuples(index=False))


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>{title}</title><style>
body {{ font-family: sans-serif; max-width: 1100px; margin: 2em auto; line-height: 1.4; }}
table {{ border-collapse: collapse; margin: 1em 0; display: block; max-width: 100%; overflow-x: auto; }}
td, th {{ border: 1px solid #ccc; padding: 3px 8px; font-size: 13px; }}
th {{ background: #f3f3f3; }}
img {{ max-width: 100%; }}
code {{ background: #f3f3f3; padding: 0 3px; }}
</style></head><body>
{body}
</body></html>
"""


def render_html(title: str, md: str, figures_dir: Path) -> str:
    """report.md as a page that stands alone: rendered by the `markdown` library, figures embedded."""
    import markdown

    def embed(match: re.Match) -> str:
        path = figures_dir / match.group(2)
        if not path.is_file():
            return match.group(0)
        return f"![{match.group(1)}](data:image/png;base64,{base64.b64encode(path.read_bytes()).decode()})"

    text = re.sub(r"!\[([^\]]*)\]\(([^)/]+\.png)\)", embed, md)
    body = markdown.markdown(text, extensions=["tables"], output_format="html")
    return PAGE.format(title=html.escape(title), body=body)
