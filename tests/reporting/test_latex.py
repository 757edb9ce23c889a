"""The paper's table (harness.reporting.latex): escaped, the best level bold, the worse ones marked,
the paper's values apart; the committed momentum sweep's table.tex compiles with a real pdflatex."""
import shutil
import subprocess
from pathlib import Path

import pandas as pd
from conftest import _require
from timing import hang_s

from harness.planning.decide import EQUAL, WORSE
from harness.reporting import latex

ROOT = Path(__file__).resolve().parents[2]


def test_a_table_marks_the_best_and_the_worse_levels_and_escapes_names():
    summary = pd.DataFrame([
        {"moco.key_encoder": "end_to_end", "n": 3, "probe_top1_mean": 0.851, "probe_top1_std": 0.002,
         "knn_top1_mean": 0.78, "knn_top1_std": 0.01},
        {"moco.key_encoder": "memory_bank", "n": 3, "probe_top1_mean": 0.80, "probe_top1_std": 0.01,
         "knn_top1_mean": 0.70, "knn_top1_std": 0.02},
        {"moco.key_encoder": "momentum", "n": 3, "probe_top1_mean": 0.854, "probe_top1_std": 0.001,
         "knn_top1_mean": 0.79, "knn_top1_std": 0.01}])
    reference = {"source": "He et al. 2019", "metric": "ImageNet top-1 (%)",
                 "values": [{"moco.key_encoder": "momentum", "value": 60.6}, {"moco.key_encoder": "memory_bank", "value": 58.0}]}
    text = latex.study_table("mechanisms", summary, ["moco.key_encoder"], "probe_top1",
                             {("end_to_end",): EQUAL, ("memory_bank",): WORSE}, ("momentum",), reference,
                             "fmnist-tiny", 3, "paired t-intervals", True)
    rows = {line.split(" & ")[0]: line for line in text.splitlines() if " & " in line and "$n$" not in line}
    assert "\\textbf{85.4 $\\pm$ 0.1}" in rows["momentum"] and rows["momentum"].endswith("& 60.6 \\\\")
    assert "80.0 $\\pm$ 1.0$^\\dagger$" in rows["memory\\_bank"]  # decided worse: marked
    assert "$^\\dagger$" not in rows["end\\_to\\_end"] and rows["end\\_to\\_end"].endswith("&  \\\\")  # no paper value
    assert "\\toprule" in text and "3 seeds" in text and "fmnist-tiny" in text and "\\_" in text


def test_the_committed_table_compiles_with_pdflatex(tmp_path):
    """results/examples/momentum_sweep/report/table.tex, \\input into a document, with Debian's pdflatex
    (texlive-latex-base, texlive-latex-recommended for booktabs); the PNG beside it is made so."""
    pdflatex, pdftoppm = shutil.which("pdflatex"), shutil.which("pdftoppm")
    _require(pdflatex is not None and pdftoppm is not None, "pdflatex",
             ["texlive-latex-base", "texlive-latex-recommended", "poppler-utils"])
    table = ROOT / "results" / "examples" / "momentum_sweep" / "report" / "table.tex"
    shutil.copyfile(table, tmp_path / "table.tex")
    (tmp_path / "doc.tex").write_text(latex.document(["\\input{table.tex}"]))
    done = subprocess.run([pdflatex, "-interaction=nonstopmode", "-halt-on-error", "doc.tex"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=hang_s())
    assert done.returncode == 0, done.stdout[-2000:]
    assert (tmp_path / "doc.pdf").stat().st_size > 1000 and "Overfull" not in done.stdout
