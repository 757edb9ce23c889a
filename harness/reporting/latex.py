"""The paper's table: a study's summary as LaTeX (booktabs), written beside the report as table.tex.

Per level: the objective (and the kNN monitor) as mean ± std over seeds in percent, n, the best level
in bold, levels the paired decisions call worse marked with a dagger, the paper's values in their own
column (another dataset and scale: never mixed into ours), and a caption that says the recipe, the
seeds and the decision rule. Pure functions of the report's tables; `\\input{table.tex}` needs
`\\usepackage{booktabs}`.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from harness.planning.decide import SLIGHTLY_WORSE, WORSE

_SPECIAL = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
            "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def escape(text: object) -> str:
    """Text as LaTeX prints it (end_to_end -> end\\_to\\_end)."""
    return "".join(_SPECIAL.get(ch, ch) for ch in str(text))


def _level_text(value: object) -> str:
    return escape(f"{value:g}" if isinstance(value, float) else value)


def _mean_std(mean: float, std: float, n: int) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "--"
    if n < 2 or std is None or (isinstance(std, float) and math.isnan(std)):
        return f"{100 * mean:.1f}"
    return f"{100 * mean:.1f} $\\pm$ {100 * std:.1f}"


def _reference(values: list[dict], row: dict, factors: list[str]) -> str:
    """The paper's value for this level, if the study file gives one ('fail' as the paper says it)."""
    for entry in values:
        keys = [k for k in entry if k != "value"]
        if keys and all(k in factors and str(row.get(k)) == str(entry[k]) for k in keys):
            value = entry["value"]
            return f"{value:.1f}" if isinstance(value, (int, float)) else escape(value)
    return ""


def study_table(name: str, summary: pd.DataFrame, factors: list[str], objective: str, verdicts: dict,
                best: tuple | None, reference: dict, recipe: str, seeds: int, rule: str,
                maximize: bool = True) -> str:
    """One study's table. `verdicts`: level (tuple of factor values) -> the paired decision against
    the best (decide.WORSE, ...); `best`: the best level of the decisions, bold."""
    values = reference.get("values") or []
    has_ref = bool(values)
    metric = {"probe_top1": "linear probe top-1 (\\%)", "knn_top1": "kNN top-1 (\\%)"}.get(objective, escape(objective))
    columns = "l" * len(factors) + "r" + "r" * (2 if objective != "knn_top1" else 1) + ("r" if has_ref else "")
    head = [escape(f.rsplit(".", 1)[-1]) for f in factors] + ["$n$", metric]
    if objective != "knn_top1":
        head.append("kNN top-1 (\\%)")
    if has_ref:
        head.append(f"paper ({escape(reference.get('metric', ''))})" if reference.get("metric") else "paper")
    lines = [f"\\begin{{tabular}}{{{columns}}}", "\\toprule", " & ".join(head) + " \\\\", "\\midrule"]
    for _, row in summary.iterrows():
        level = tuple(row[f] for f in factors)
        n = int(row["n"])
        cell = _mean_std(row.get(f"{objective}_mean"), row.get(f"{objective}_std"), n)
        if best is not None and level == tuple(best):
            cell = f"\\textbf{{{cell}}}"
        elif verdicts.get(level) in (WORSE, SLIGHTLY_WORSE):
            cell += "$^\\dagger$"
        cells = [_level_text(v) for v in level] + [str(n), cell]
        if objective != "knn_top1":
            cells.append(_mean_std(row.get("knn_top1_mean"), row.get("knn_top1_std"), n))
        if has_ref:
            cells.append(_reference(values, dict(zip(factors, level)), factors))
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}"]
    what = metric.replace(" (\\%)", "")
    caption = (f"Study \\texttt{{{escape(name)}}}: {what} as mean $\\pm$ std over "
               f"{seeds} seeds (recipe \\texttt{{{escape(recipe)}}}). Bold: the best level "
               f"({'highest' if maximize else 'lowest'} mean); $^\\dagger$: worse than it by the paired "
               f"decision ({escape(rule)}).")
    if has_ref:
        caption += f" Paper: {escape(reference.get('source', ''))}; another dataset and scale."
    return "\n".join(["\\begin{table}[t]", "\\centering", "\\small", *lines,
                      f"\\caption{{{caption}}}", f"\\label{{tab:{escape(name).replace(chr(92), '')}}}",
                      "\\end{table}", ""])


def document(tables: list[str]) -> str:
    """A standalone document around tables (what pdflatex compiles to check and picture them)."""
    return "\n".join(["\\documentclass{article}", "\\usepackage{booktabs}", "\\usepackage[margin=2cm]{geometry}",
                      "\\pagestyle{empty}", "\\begin{document}", *[f"{t}\n" for t in tables], "\\end{document}", ""])


def render_png(table: Path, dpi: int = 150) -> Path:
    """table.tex compiled with pdflatex and drawn by pdftoppm as table.png beside it (the picture a
    README shows). Needs Debian's texlive-latex-base, texlive-latex-recommended and poppler-utils.

    Raises:
        StudyError: pdflatex or pdftoppm missing, or the table does not compile (its log's last lines).
    """
    import shutil
    import subprocess
    import tempfile

    from harness.run.errors import StudyError

    tools = {name: shutil.which(name) for name in ("pdflatex", "pdftoppm")}
    if not all(tools.values()):
        raise StudyError("--latex-png: pdflatex and pdftoppm are needed (apt-get install texlive-latex-base "
                         "texlive-latex-recommended poppler-utils).")
    with tempfile.TemporaryDirectory(prefix="table-") as tmp:
        work = Path(tmp)
        shutil.copyfile(table, work / "table.tex")
        (work / "doc.tex").write_text(document(["\\input{table.tex}"]))
        done = subprocess.run([str(tools["pdflatex"]), "-interaction=nonstopmode", "-halt-on-error", "doc.tex"],
                              cwd=work, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise StudyError(f"{table}: pdflatex failed: {' '.join(done.stdout.splitlines()[-3:])}")
        subprocess.run([str(tools["pdftoppm"]), "-png", "-r", str(dpi), "-singlefile", "-cropbox", "doc.pdf", "doc"],
                       cwd=work, check=True, capture_output=True, timeout=300)
        out = table.with_suffix(".png")
        _crop(work / "doc.png", out)
    return out


def _crop(page: Path, out: Path, margin: int = 24) -> None:
    """The page's ink and a white margin (pdflatex sets a table on a whole page)."""
    from PIL import Image, ImageOps

    with Image.open(page) as image:
        box = ImageOps.invert(image.convert("L")).getbbox() or (0, 0, *image.size)
        left, top, right, bottom = box
        image.crop((max(left - margin, 0), max(top - margin, 0), min(right + margin, image.width),
                    min(bottom + margin, image.height))).save(out)
