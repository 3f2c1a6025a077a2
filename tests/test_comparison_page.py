"""The comparison page: what it says, and that it renders in a real browser with no network."""

from __future__ import annotations

import re
import shutil
import subprocess

import pandas as pd
import pytest

from cbir.report import page as comparison_page

NS = [1, 10]


def fabricated_runs() -> pd.DataFrame:
    """Two encoders at two index sizes, as cbir.report.from_runs.load_runs returns them, plus a k-NN run."""
    rows = []
    for encoder, base in (("baseline", 0.40), ("random", 0.05)):
        for per_class, bump in (("3", 0.0), ("all", 0.03)):
            value = base + bump
            rows.append(
                {
                    "run": f"{encoder} · flat · {per_class}",
                    "run_id": f"{encoder}{per_class}",
                    "encoder": encoder,
                    "dataset": "synthetic",
                    "labels": "single",
                    "index_type": "flat",
                    "per_class": per_class,
                    "task": "retrieval",
                    "query_set": f"q{per_class}",
                    "micro/P_at_1": value,
                    "micro/P_at_1_ci_low": value - 0.04,
                    "micro/P_at_1_ci_high": value + 0.04,
                    "macro/P_at_1": value - 0.01,
                    "micro/P_at_10": value - 0.02,
                    "macro/P_at_10": value - 0.03,
                    "modality/CT/micro/P_at_1": value + 0.1,
                    "modality/MR/micro/P_at_1": value - 0.1,
                }
            )
    rows.append(
        {
            "run": "baseline · flat · all · knn",
            "run_id": "k",
            "encoder": "baseline",
            "per_class": "all",
            "task": "knn",
            **{
                f"knn/{m}": 0.5
                for m in (
                    "micro_roc_auc",
                    "macro_roc_auc",
                    "micro_f1",
                    "macro_f1",
                    "macro_precision",
                    "macro_recall",
                    "accuracy",
                )
            },
        }
    )
    rows.append(  # an encoder with a text tower: zero-shot classification beside k-NN
        {
            "run": "clip · flat · all · zero_shot",
            "run_id": "z",
            "encoder": "clip",
            "per_class": "all",
            "task": "zero_shot",
            **{f"zero_shot/{m}": 0.25 for m in ("micro_roc_auc", "macro_roc_auc", "micro_f1", "macro_f1")},
            **{f"zero_shot/{m}": 0.25 for m in ("macro_precision", "macro_recall")},
            "zero_shot/accuracy": 0.3125,
        }
    )
    return pd.DataFrame(rows)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    runs = fabricated_runs()
    tied = {
        "baseline · flat · all": "µP@1",
        "baseline · flat · 3": "µP@1",
        "random · flat · all": "",
    }
    per_class = pd.DataFrame(
        {
            "run": ["baseline · flat · all"] * 2,
            "class": ["CT/head/normal", "MR/abd/lesion"],
            "P@1": [0.5, 0.25],
            "P@10": [0.4, 0.2],
            "queries": [4, 3],
        }
    )
    path = tmp_path_factory.mktemp("page") / "comparison.html"
    return comparison_page.write_page(runs, NS, path, "test sweep", tied, per_class)


def test_answer_names_the_best_and_only_ties_on_the_same_queries():
    runs = fabricated_runs()
    line = comparison_page.best_line(runs, {"baseline · flat · 3": "µP@1", "random · flat · all": "µP@1"})
    # baseline at index size 3 answered other queries (q3): not a tie of the best (qall)
    assert line == "best micro P@1: baseline · flat · all 0.430 [0.39, 0.47]; tied: random · flat · all 0.080"
    assert line.startswith("best micro P@1: ") and "baseline · flat · 3" not in line
    assert comparison_page.best_line(runs, {}).endswith(
        "tied: none (ahead of every run that answered the same queries)"
    )


def test_page_is_self_contained_and_labels_index_sizes(page):
    text = page.read_text()
    assert not re.search(r"<script[^>]+src=", text)  # plotly's JavaScript is inline: opens offline
    assert "best micro P@1: baseline · flat · all 0.430 [0.39, 0.47]" in text
    # index sizes on a category axis in their order, `all` named as such (not a number)
    assert '"categoryarray":["3","all"]' in text and "index size (rows per class" in text
    assert "k-NN classification" in text and 'id="per-class"' in text and "tied for best" in text
    assert "Zero-shot classification" in text and "0.3125" in text  # beside k-NN, with its value


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.slow
@pytest.mark.skipif(
    chromium() is None,
    reason="chromium is not installed (Debian: apt-get install -y chromium)",
)
def test_page_renders_in_headless_chromium_without_network_or_console_errors(page, tmp_path):
    command = [
        chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--enable-logging=stderr",
        "--v=0",
        "--proxy-server=127.0.0.1:9",
        "--proxy-bypass-list=<-loopback>",  # any network request fails
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=5000",
        "--dump-dom",
        page.as_uri(),
    ]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    dom = proc.stdout
    # the leaderboard and the plots exist once plotly has drawn them
    assert '<table id="leaderboard"' in dom and dom.count('class="plot-container plotly"') >= 3, dom[-2000:]
    assert "baseline · flat · all" in dom and "main-svg" in dom
    console_errors = [
        line
        for line in proc.stderr.splitlines()
        if "CONSOLE" in line and re.search(r"error|Uncaught", line, re.IGNORECASE)
    ]
    assert not console_errors, console_errors


@pytest.fixture(scope="module")
def all_tasks_sweep(tmp_path_factory, shared_data_dir):
    from conftest import run_cbir

    cwd = tmp_path_factory.mktemp("all_tasks")
    proc = run_cbir(
        cwd,
        "-m",
        "debug=smoke",
        "encoder=baseline,random",
        "task=all",
        f"paths.data_dir={shared_data_dir}",
    )
    return cwd, proc


@pytest.mark.slow
def test_task_all_sweep_shows_classification_everywhere_and_no_one_point_curve(
    all_tasks_sweep,
):
    cwd, proc = all_tasks_sweep
    folder = next(cwd.glob("multirun/*/*"))
    table = pd.read_csv(folder / "comparison.csv")
    assert {"k-NN acc", "k-NN macro F1", "probe acc", "probe macro F1"} <= set(table.columns)
    assert table["k-NN acc"].between(0, 1).all()
    assert "k-NN acc" in proc.stdout and "probe acc" in (folder / "sweep_summary.txt").read_text()
    assert not (folder / "saturation.png").exists()  # one index size: a point, not a curve
    page = (folder / "comparison.html").read_text()
    assert "k-NN classification" in page and "Linear probe" in page and "best micro P@1: " in page
    # a job's own tables stay in its run.log; the console gets one line per job
    assert sum(line.startswith("done ") for line in proc.stdout.splitlines()) == 2
    assert "test queries, 0 excluded" not in proc.stdout and "all queries" not in proc.stdout


@pytest.mark.slow
def test_report_writes_the_page_too(all_tasks_sweep):
    from conftest import run_cbir

    cwd, _ = all_tasks_sweep
    run_cbir(cwd, "report.output_dir=rep", module="cbir.report")
    page = (cwd / "rep" / "comparison.html").read_text()
    assert "best micro P@1: baseline" in page and 'id="per-class"' in page and "k-NN classification" in page
