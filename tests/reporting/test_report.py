"""Reports from a small synthetic study made through the real Optuna API."""
import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import optuna
import pandas as pd
import pytest
from timing import hang_s

from harness.reporting.study_report import build_report

LEVELS = [0.0, 0.9, 0.99]
EXAMPLES = Path(__file__).resolve().parents[2] / "results" / "examples"


@pytest.fixture()
def synthetic_study(tmp_path):
    """3 momentum levels x 2 seeds: m=0 seed 0 diverged, m=0.9 seed 1 failed, the rest complete."""
    storage = f"sqlite:///{tmp_path / 'study.db'}"
    study = optuna.create_study(study_name="momentum_sweep", storage=storage, direction="maximize")
    study.set_user_attr("objective", "probe_top1")
    rng = np.random.default_rng(0)
    expected = {}
    for m in LEVELS:
        for seed in (0, 1):
            study.enqueue_trial({"moco.momentum": m, "seed": seed})
            trial = study.ask()
            trial.suggest_categorical("moco.momentum", LEVELS)
            trial.suggest_categorical("seed", [0, 1])
            key = f"momentum={m},seed={seed}"
            run = tmp_path / "runs" / key
            run.mkdir(parents=True)
            trial.set_user_attr("key", key)
            trial.set_user_attr("run_dir", str(run))
            losses = 6 - np.arange(1, 4) * 0.1 * (1 + m)
            with open(run / "metrics.jsonl", "w") as fh:
                for epoch, loss in enumerate(losses, 1):
                    fh.write(json.dumps({"kind": "epoch", "epoch": epoch, "step": epoch * 10, "loss": loss,
                                         "knn_top1": 0.5 + 0.05 * epoch + m / 10, "lr": 0.06}) + "\n")
            if (m, seed) == (0.0, 0):
                trial.set_user_attr("outcome", "diverged")
                trial.set_user_attr("failure_reason", "diverged: the loss became NaN/inf (step 12)")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            elif (m, seed) == (0.9, 1):
                trial.set_user_attr("outcome", "error")
                trial.set_user_attr("failure_reason", "RuntimeError: node died")
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                value = float(0.6 + m / 5 + rng.normal(0, 0.01))
                for name, v in {"probe_top1": value, "probe_top5": 0.99, "knn_top1": 0.65 + m / 10,
                                "epochs": 3, "gpu_hours": 0.5, "pixel_floor_top1": 0.7}.items():
                    trial.set_user_attr(name, v)
                study.tell(trial, value)
                expected.setdefault(m, []).append(value)
    return storage, expected


def test_report_tables_match_independent_computation(tmp_path, synthetic_study, monkeypatch):
    from harness.reporting import tensorboard
    from harness.run import runio

    monkeypatch.setattr(runio, "RESULTS", tmp_path / "results")
    storage, expected = synthetic_study
    out = build_report("momentum_sweep", storage, tmp_path / "report")
    # Written elsewhere (`--out`), a report leaves the study's directory alone: its TensorBoard logs too
    # (they went to results/momentum_sweep/tensorboard, where two such tests at once collided).
    assert not (tmp_path / "results").exists()
    assert (out / "tensorboard").is_dir() == tensorboard.available()
    summary = pd.read_csv(out / "summary.csv")
    for m, values in expected.items():
        row = summary[np.isclose(summary["moco.momentum"], m)].iloc[0]
        assert row["n"] == len(values)
        assert row["probe_top1_mean"] == pytest.approx(np.mean(values))
        if len(values) > 1:
            assert row["probe_top1_std"] == pytest.approx(np.std(values, ddof=1))
        assert row["gpu_hours"] == pytest.approx(0.5 * len(values))
    assert summary[summary["moco.momentum"] == 0.0].iloc[0]["diverged"] == 1
    assert summary[np.isclose(summary["moco.momentum"], 0.9)].iloc[0]["failed"] == 1

    trials = pd.read_csv(out / "trials.csv")
    states = dict(zip(trials["key"], trials["state"]))
    assert states["momentum=0.0,seed=0"] == "DIVERGED" and states["momentum=0.9,seed=1"] == "FAIL"
    assert (trials["state"] == "COMPLETE").sum() == 4
    curves = pd.read_csv(out / "curves.csv")
    assert len(curves) == 6 * 3 and set(curves["epoch"]) == {1, 2, 3}


def test_report_plots_exist_and_html_embeds_them(tmp_path, synthetic_study):
    storage, _ = synthetic_study
    out = build_report("momentum_sweep", storage, tmp_path / "report")
    pngs = sorted(out.glob("*.png"))
    assert {p.stem for p in pngs} >= {"objective", "curves", "knn_vs_probe"}
    for p in pngs:
        assert p.stat().st_size > 1000 and p.with_suffix(".svg").stat().st_size > 1000
    page = (out / "report.html").read_text()
    assert len(re.findall(r'src="data:image/png;base64,[A-Za-z0-9+/=]{100,}"', page)) == len(pngs)
    md = (out / "report.md").read_text()
    assert "DIVERGED" in md and "node died" in md and "diverged (loss NaN/inf)" in md
    assert "best level 0.99" in md and "runner-up 0.9 " in md and "fewer than 2 seeds ran both" in md  # 0.9 has n = 1
    assert "different dataset and scale" in md
    # m = 0 (0.6) is below the raw-pixel floor (0.7), m = 0.9 (0.78) and 0.99 (0.80) above it.
    floor_line = next(line for line in md.splitlines() if "raw-pixel floor 0.7000" in line)
    assert re.search(r"above it: 0\.9 \(\+0\.0\d+\), 0\.99 \(\+0\.\d+\); not above it: 0\.0 \(-0\.\d+\)", floor_line)


CHECK = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const out = document.createElement("pre");
  out.id = "reader-check";
  out.textContent = JSON.stringify({
    images: imgs.length, decoded: imgs.filter(i => i.complete && i.naturalWidth > 0).length,
    tables: document.querySelectorAll("table").length,
    rows: document.querySelectorAll("table tr").length,
    loose_items: [...document.querySelectorAll("li")].filter(li => !li.closest("ul, ol")).length,
    list_items: document.querySelectorAll("ul > li").length,
    backticks: (document.body.innerText.match(/`/g) || []).length,
    code: document.querySelectorAll("code").length,
  });
  document.body.appendChild(out);
});
</script>"""


def _chromium() -> str:
    from conftest import _require

    path = shutil.which("chromium")
    _require(path is not None, "Chromium", ["chromium"])
    return path


def test_report_html_as_a_reader_sees_it(tmp_path, synthetic_study):
    """Headless Chromium opens the page: every figure decodes, tables and lists are real HTML, no
    markdown shows through; a screenshot of it is a picture with content."""
    chromium = _chromium()
    storage, _ = synthetic_study
    out = build_report("momentum_sweep", storage, tmp_path / "report")
    pngs = sorted(out.glob("*.png"))
    page = out / "checked.html"
    page.write_text((out / "report.html").read_text().replace("</body>", CHECK + "</body>"))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run([chromium, *flags, "--virtual-time-budget=5000", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=hang_s()).stdout
    found = re.search(r'<pre id="reader-check">(.*?)</pre>', dom)
    assert found, dom[-2000:]
    seen = json.loads(html.unescape(found.group(1)))
    assert seen["images"] == len(pngs) >= 3 and seen["decoded"] == seen["images"]
    assert seen["tables"] >= 2 and seen["rows"] >= 1 + 3 + 1 + 2  # summary (3 levels) and the not-completed trials
    assert seen["loose_items"] == 0 and seen["list_items"] >= 4  # header facts and verdict lines are lists
    assert seen["backticks"] == 0 and seen["code"] >= 1  # `momentum_sweep` is rendered as code
    shot = tmp_path / "report.png"
    subprocess.run([chromium, *flags, "--hide-scrollbars", "--window-size=1200,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()], capture_output=True, timeout=hang_s())
    from PIL import Image

    with Image.open(shot) as image:
        assert image.size == (1200, 1600)
        assert sum(1 for n in image.convert("L").histogram() if n) > 20  # text and figures, not a blank page


def test_verdict_speaks_the_decisions_language_and_flags_a_loss_at_chance():
    """The verdict compares the best level with the runner-up as the decision table does (paired by
    seed, a t-interval, the margin's words), not with a second test; and a run that 'completed' with
    its loss still near ln(K+1) is called out."""
    from harness.planning.decide import RaceSpec
    from harness.reporting.verdicts import verdict

    def table(best, second, loss=3.0):
        rows = [{"moco.momentum": 0.99, "seed": s, "state": "COMPLETE", "probe_top1": v, "final_loss": 3.0,
                 "chance_loss": 8.3} for s, v in enumerate(best)]
        rows += [{"moco.momentum": 0.9, "seed": s, "state": "COMPLETE", "probe_top1": v, "final_loss": loss,
                  "chance_loss": 8.3} for s, v in enumerate(second)]
        return pd.DataFrame(rows)

    apart = verdict(table([0.80, 0.81, 0.80], [0.70, 0.72, 0.70]), ["moco.momentum"], "probe_top1")
    # paired differences 10, 9, 10 pt: mean 9.67, sd 0.577, t(0.975, 2 df) = 4.303: +- 1.43 pt
    assert apart[0] == ("moco.momentum: best level 0.99 (probe_top1 0.8033, n=3); runner-up 0.9 (0.7067): 0.99 vs "
                        "0.9 +9.67 pt [+8.23, +11.10], paired over 3 seeds at 95.0 %: better (margin ± 0.5 pt).")
    assert "Welch" not in "\n".join(apart)
    # Each level spreads 1.4 pt over seeds; paired, that spread cancels: -0.2..+0.4 pt on each seed,
    # an interval well inside a 2 pt margin.
    close = verdict(table([0.800, 0.822, 0.789, 0.811], [0.802, 0.818, 0.790, 0.809]), ["moco.momentum"], "probe_top1",
                    spec=RaceSpec(4, 4, 0.02))
    assert close[0].endswith("paired over 4 seeds at 95.0 %: practically equal (margin ± 2 pt).")
    noisy = verdict(table([0.80, 0.82, 0.79], [0.80, 0.81, 0.79]), ["moco.momentum"], "probe_top1")
    assert noisy[0].endswith(": undecided (margin ± 0.5 pt).")
    unpaired = verdict(table([0.80], [0.70, 0.71]), ["moco.momentum"], "probe_top1")
    assert unpaired[0].endswith("fewer than 2 seeds ran both: nothing to pair.")
    stuck = verdict(table([0.80, 0.81], [0.50, 0.51], loss=8.2), ["moco.momentum"], "probe_top1")
    assert any(line.startswith("moco.momentum = 0.9: completed, but the final loss 8.20") for line in stuck)
    assert not any(line.startswith("moco.momentum = 0.99: completed, but") for line in stuck)


def test_verdict_compares_a_factor_within_each_level_of_the_other():
    """Two factors (the mechanisms study's shape): K is judged within each mechanism, never pooled
    over them, and a mechanism that ran at one K only has nothing to compare."""
    from harness.reporting.verdicts import verdict

    rows = [{"moco.queue_size": k, "moco.key_encoder": enc, "seed": seed, "state": "COMPLETE", "probe_top1": v + d,
             "final_loss": 3.0, "chance_loss": 8.3}
            for k, enc, v in [(256, "memory_bank", 0.70), (4096, "memory_bank", 0.80), (256, "momentum", 0.90),
                              (4096, "momentum", 0.85), (256, "end_to_end", 0.95)]
            for seed, d in enumerate((0.0, 0.01))]
    lines = verdict(pd.DataFrame(rows), ["moco.queue_size", "moco.key_encoder"], "probe_top1")
    bank = next(line for line in lines if line.startswith("moco.queue_size (at moco.key_encoder = memory_bank)"))
    assert "best level 4096 (probe_top1 0.8050, n=2)" in bank  # pooled, 4096 would read 0.8275 and 256 0.8050
    moco = next(line for line in lines if line.startswith("moco.queue_size (at moco.key_encoder = momentum)"))
    assert "best level 256 (probe_top1 0.9050, n=2)" in moco
    assert not any("end_to_end)" in line for line in lines if line.startswith("moco.queue_size"))
    at_256 = next(line for line in lines if line.startswith("moco.key_encoder (at moco.queue_size = 256)"))
    assert "best level end_to_end" in at_256


def test_decision_table_of_an_adaptive_study(tmp_path):
    """Paired decisions from a results table: a clearly worse level is 'better'-d by the best with its
    interval; a level still undecided at max seeds says what the seeds could resolve."""
    import yaml

    from harness.planning.studyfile import parse_study
    from harness.reporting.verdicts import decision_lines

    study = parse_study("race", tmp_path / "race.yaml", yaml.safe_load(
        "description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9, 0.99, 0.999]}\n"
        "seeds: {initial: 2, max: 4}\ndecide: {margin: 0.002}\n"))
    shared = [0.0, 0.01, -0.01, 0.005]
    rows = []
    for m, base, wiggle in ((0.9, 0.80, 0.002), (0.99, 0.85, 0.0), (0.999, 0.848, 0.01)):
        for seed in range(4):
            rows.append({"moco.momentum": m, "seed": seed, "state": "COMPLETE",
                         "probe_top1": base + shared[seed] + wiggle * (-1) ** seed})
    lines = decision_lines(pd.DataFrame(rows), study, ["moco.momentum"], "probe_top1")
    table = "\n".join(lines)
    assert "split (Bonferroni) over 2 comparison(s), each spending its share over 3 looks (O'Brien-Fleming" in table
    better = next(line for line in lines if line.startswith("| 0.99 vs 0.9 |"))
    # At 3 seeds 0.999 leads (its own noise), so 0.9 is compared with it and stays undecided; at 4 the
    # best is 0.99 and the paired differences 0.048, 0.052, 0.048, 0.052 give 5.00 +- t(3 df) x sd / 2
    # at the last look's level (0.025 for each comparison, spent over 3 looks).
    from scipy import stats

    from harness.planning.spending import nominal_levels

    level = nominal_levels("obrien-fleming", (2, 3, 4), 0.025)[-1]
    assert 0.0125 < level < 0.025  # the last look gets most of it (the even split: 0.0083)
    half = 100 * stats.t.ppf(1 - level / 2, 3) * np.std([0.048, 0.052, 0.048, 0.052], ddof=1) / 2
    assert better == f"| 0.99 vs 0.9 | +5.00 pt | [{5 - half:+.2f}, {5 + half:+.2f}] | 4 | better |"
    undecided = next(line for line in lines if line.startswith("| 0.99 vs 0.999 |"))
    assert "| 4 | undecided at 4 seeds: the difference is below ±" in undecided
    assert "Trials run: 12 of the fixed design's 12" in table


def test_an_undecided_fixed_design_says_how_many_seeds_would_decide_it_and_how_to_race_for_them(tmp_path):
    """The main command's fixed 2-seed design leaves close comparisons undecided: the report names, per
    comparison, the seed count its observed paired spread needs (harness.planning.decide.seeds_to_decide, whose
    80 % is checked by simulation in test_decide) and the race that spends them."""
    import yaml

    from harness.planning.decide import seeds_to_decide
    from harness.planning.studyfile import parse_study
    from harness.reporting.verdicts import decision_lines

    study = parse_study("sweep", tmp_path / "sweep.yaml", yaml.safe_load(
        "description: x\nrecipe: fmnist-tiny\nfactors: {moco.momentum: [0.9, 0.99]}\nseeds: [0, 1]\n"))
    rows = [{"moco.momentum": m, "seed": s, "state": "COMPLETE", "probe_top1": v}
            for m, values in ((0.9, (0.846, 0.851)), (0.99, (0.850, 0.853))) for s, v in enumerate(values)]
    lines = decision_lines(pd.DataFrame(rows), study, ["moco.momentum"], "probe_top1")
    diffs = np.array([0.846 - 0.850, 0.851 - 0.853])
    n = seeds_to_decide(diffs.mean(), diffs.std(ddof=1), 0.005, 0.05)
    hint = next(line for line in lines if line.startswith("- 0.99 vs 0.9:"))
    assert f"about {n} seeds per level would decide it" in hint and n > 2
    assert any(f"`seeds: {{initial: 2, max: {n}}}`" in line and "python -m harness.study sweep" in line for line in lines)


class RebuiltExamples:
    """Copies of results/examples/ (their storage and runs, not their reports) in one directory, each
    report rebuilt by `python -m harness.report NAME` in this process, once for the module's tests."""

    def __init__(self, root: Path):
        self.root = root
        self.built: set[str] = set()

    def report(self, name: str, monkeypatch) -> Path:
        """The fresh report folder of the example `name` (built on the first call)."""
        from harness import report
        from harness.run import runio

        monkeypatch.setattr(runio, "RESULTS", self.root)
        if name not in self.built:
            assert report.main([name]) == 0
            self.built.add(name)
        return self.root / name / "report"


@pytest.fixture(scope="module")
def rebuilt_examples(tmp_path_factory) -> RebuiltExamples:
    root = tmp_path_factory.mktemp("examples")
    for example in EXAMPLES.iterdir():
        if example.is_dir():
            shutil.copytree(example, root / example.name, ignore=shutil.ignore_patterns("report"))
    return RebuiltExamples(root)


@pytest.mark.parametrize("name, trials", [("momentum_sweep", 10), ("momentum_race", 25), ("mechanisms", 14),
                                          ("dictionary", 18), ("shuffle_bn", 6)])
def test_the_committed_example_rebuilds_from_its_storage_with_the_same_numbers(rebuilt_examples, monkeypatch, name,
                                                                               trials):
    """results/examples/<study> carries its storage and run files: a fresh report of a copy gives the
    committed tables (what the README promises anyone who reruns it). `python -m harness.report NAME`
    is called in this process (its main, with HARNESS_RESULTS pointing at the copy)."""
    example = EXAMPLES / name
    fresh_report = rebuilt_examples.report(name, monkeypatch)
    tables = sorted(p.name for p in (example / "report").glob("*.csv"))
    assert {"summary.csv", "trials.csv", "curves.csv"} <= set(tables)
    for table in tables:
        fresh = pd.read_csv(fresh_report / table)
        committed = pd.read_csv(example / "report" / table)
        pd.testing.assert_frame_equal(fresh, committed)
    latex = sorted(p.name for p in (example / "report").glob("*.tex"))
    assert latex == ["table.tex"]  # the paper's table, committed and still what the report writes
    assert (fresh_report / "table.tex").read_text() == (example / "report" / "table.tex").read_text()
    assert len(pd.read_csv(example / "report" / "trials.csv")) == trials


def test_the_dictionary_section_reads_the_runs_and_says_not_measured_for_runs_made_before(rebuilt_examples,
                                                                                          monkeypatch):
    """The committed momentum sweep (run with the diagnostics) gets a consistency table with a value per
    level and its plot; the mechanisms example (runs made before them) says 'not measured' for the
    queue and the bank, '1 by construction' for end-to-end, and never prints a number for them; the
    suite page (the committed suite's runs) shows the section for its momentum and mechanism studies only."""
    from harness import report

    sweep_report = rebuilt_examples.report("momentum_sweep", monkeypatch)
    mechanisms_report = rebuilt_examples.report("mechanisms", monkeypatch)
    sweep = pd.read_csv(sweep_report / "diagnostics.csv")
    assert len(sweep) == 5 and sweep["key_consistency"].between(0, 1.000001).all()
    assert (sweep["seeds measured"] == "2 of 2").all() and sweep["effective_rank"].gt(1).all()
    assert (sweep_report / "consistency.png").exists()
    ages = pd.read_csv(sweep_report / "consistency.csv")
    assert sorted(ages["key_age_steps"].unique()) == [1, 4, 8, 16]  # K / B = 16 blocks
    md = (mechanisms_report / "report.md").read_text()
    section = md.split("## Dictionary consistency", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ") and "key_consistency" not in line
            and not line.startswith("|---")]
    assert len(rows) == 7 and all(line.count("not measured") >= 3 for line in rows)
    assert all(("1 by construction" in line) == ("end_to_end" in line) for line in rows)
    assert not (mechanisms_report / "consistency.png").exists()
    # a two-factor grid (K x key encoder): the interaction section, its table and figure
    assert "## Interaction" in md and "difference of differences" in md
    contrasts = pd.read_csv(mechanisms_report / "interaction.csv")
    assert len(contrasts) == 3 and (contrasts["n"] == 2).all()  # end-to-end runs at one K: no 2 x 2 with it
    assert (mechanisms_report / "interaction.png").exists()
    assert not (sweep_report / "interaction.csv").exists()  # one factor
    # The suite with the members the claim is about (and one without the section): each member's
    # report is rebuilt with the suite's, and the other four would add only figures to draw.
    suite_file = rebuilt_examples.root / "moco_ablation.yaml"
    suite_file.write_text("description: three of the suite's members\nsuite: [momentum_sweep, queue_sweep, mechanisms]\n")
    assert report.main([str(suite_file)]) == 0
    suite = (rebuilt_examples.root / "moco_ablation" / "report" / "report.md").read_text()
    members = {part.split("\n", 1)[0]: part for part in suite.split("\n## ")[1:]}
    assert "key_consistency" in members["momentum_sweep"] and "key_consistency" in members["mechanisms"]
    assert "key_consistency" not in members["queue_sweep"]


def test_the_page_summary_has_human_labels_and_one_column_a_metric():
    """The page's summary (summary.csv keeps every column): the probe as mean [95 % interval], kNN as
    mean ± std, what did not complete in one column; narrow enough for the page."""
    import pandas as pd

    from harness.reporting.tables import page_summary

    summary = pd.DataFrame([{"moco.momentum": 0.99, "n": 2, "probe_top1_mean": 0.85, "probe_top1_std": 0.01,
                             "probe_top1_ci95_low": 0.76, "probe_top1_ci95_high": 0.94, "knn_top1_mean": 0.78,
                             "knn_top1_std": 0.004, "knn_top1_ci95_low": 0.74, "knn_top1_ci95_high": 0.82,
                             "final_loss_mean": 3.8, "failed": 1, "diverged": 0, "pruned": 0, "running": 0,
                             "gpu_hours": 0.0}])
    shown = page_summary(summary, ["moco.momentum"])
    assert list(shown.columns) == ["moco.momentum", "n", "probe top-1, mean [95 % interval]", "kNN top-1, mean ± std",
                                   "final loss", "not completed"]
    row = shown.iloc[0]
    assert row["probe top-1, mean [95 % interval]"] == "0.8500 [0.7600, 0.9400]"
    assert row["kNN top-1, mean ± std"] == "0.7800 ± 0.0040" and row["not completed"] == "1 failed"
