"""``fedsilo report`` on run directories written by real jobs, without MPI.

``runs/plain`` and ``runs/dp`` are the text files (config.yaml, metrics.jsonl, summary.json)
of two real 2-participant runs of ``fedsilo train`` on a synthetic shard set: 5 rounds
without DP (3, then resumed to 5), and 3 rounds of DP-SGD at ε = 8 per site.
"""

from __future__ import annotations

import html.parser
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fedsilo.boardlog import scalars
from fedsilo.errors import ReportError
from fedsilo.rundir import RunDir
from fedsilo.runreport import load_run, write_report

RUNS = Path(__file__).resolve().parent / "runs"
PNG = b"\x89PNG\r\n\x1a\n"


class Cells(html.parser.HTMLParser):
    """Every element's attributes, by class and by id."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.by_class: dict[str, list[dict[str, str | None]]] = {}
        self.ids: set[str] = set()
        self.sources: list[str] = []
        self.rows: list[str] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attributes = dict(attrs)
        for name in (attributes.get("class") or "").split():
            self.by_class.setdefault(name, []).append(attributes)
        if attributes.get("id"):
            self.ids.add(attributes["id"])
        for key in ("src", "href"):
            if attributes.get(key):
                self.sources.append(attributes[key])
        if tag == "tr" and attributes.get("data-run") and attributes.get("class") is None:
            self.rows.append(attributes["data-run"])

    def values(self, kind: str) -> list[float]:
        return [float(a["data-value"]) for a in self.by_class.get(kind, [])
                if a.get("data-value") is not None]


def rows_of(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def copy_run(name: str, tmp_path: Path) -> Path:
    return Path(shutil.copytree(RUNS / name, tmp_path / name))


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG and len(data) > 10_000, (path, len(data))


def test_a_finished_run(tmp_path):
    page = write_report([RUNS / "plain"], out=tmp_path / "out")
    summary = json.loads((RUNS / "plain" / "summary.json").read_text())
    cells = Cells(page.read_text())
    assert cells.values("final-acc") == [summary["test"]["acc"]]
    assert cells.values("final-auc") == [summary["test"]["auc"]]
    assert cells.values("final-loss") == [summary["test"]["loss"]]
    assert cells.values("final-val-acc") == [summary["val"]["acc"]]
    rows = rows_of(RUNS / "plain")
    assert cells.values("best-acc") == [max(r["acc"] for r in rows)]
    assert [a["class"] for a in cells.by_class["status"]] == ["status status-finished"]
    for name in ("test", "validation", "time"):
        assert_png(tmp_path / "out" / f"{name}.png")
        assert f"plot-{name}" in cells.ids
    # without DP there is no privacy to plot
    assert not (tmp_path / "out" / "epsilon.png").exists() and "plot-epsilon" not in cells.ids
    # self-contained: every image is a data URI, nothing is fetched
    assert cells.sources and all(s.startswith("data:image/png;base64,") for s in cells.sources)
    assert "<script" not in page.read_text() and "<link" not in page.read_text()
    # the configuration is on the page
    assert "strategy:" in page.read_text() and "notes" not in cells.ids


def test_a_dp_run_shows_epsilon_per_site_against_its_budget(tmp_path):
    page = write_report([RUNS / "dp"], out=tmp_path)
    cells = Cells(page.read_text())
    last = rows_of(RUNS / "dp")[-1]
    assert sorted(cells.values("epsilon")) == sorted(last["epsilon"].values())
    assert cells.values("budget") == [8.0, 8.0]
    assert cells.values("max-epsilon") == [max(last["epsilon"].values())]
    assert_png(tmp_path / "epsilon.png")
    # under DP, metrics.jsonl holds no federated validation: neither does the report
    assert not (tmp_path / "validation.png").exists()
    assert cells.values("final-val-acc") == []


def test_a_crashed_run_reports_its_complete_rows(tmp_path):
    run = copy_run("plain", tmp_path)
    (run / "summary.json").unlink()
    text = (run / "metrics.jsonl").read_text()
    cut = text.rindex("\n", 0, len(text) - 1) + 200  # 200 characters into the last row
    (run / "metrics.jsonl").write_text(text[:cut])
    loaded = load_run(run)
    assert [r["round"] for r in loaded.rows] == [1, 2, 3, 4]
    assert loaded.status == "interrupted"
    page = write_report([run], out=tmp_path / "out")
    cells = Cells(page.read_text())
    assert cells.values("final-acc") == [rows_of(RUNS / "plain")[3]["acc"]]
    assert "line 5 of metrics.jsonl" not in page.read_text()
    assert "the last line of metrics.jsonl (line 5) was cut mid-line" in page.read_text()
    assert "--resume" in page.read_text()
    assert_png(tmp_path / "out" / "test.png")


def test_a_running_run(tmp_path):
    """A job holds the run directory's lock while it runs: the report says it is running."""
    run = copy_run("plain", tmp_path)
    (run / "summary.json").unlink()
    handle = RunDir(run).lock()
    try:
        page = write_report([run], out=tmp_path / "out")
    finally:
        handle.close()
    cells = Cells(page.read_text())
    assert [a["class"] for a in cells.by_class["status"]] == ["status status-running"]
    assert load_run(run).status == "interrupted"  # the lock is released


def test_two_runs_side_by_side(tmp_path):
    page = write_report([RUNS / "plain", RUNS / "dp"], out=tmp_path)
    cells = Cells(page.read_text())
    assert cells.rows == ["plain", "dp"]
    finals = [json.loads((RUNS / r / "summary.json").read_text())["test"]["acc"]
              for r in ("plain", "dp")]
    assert cells.values("final-acc") == finals
    # the configurations' differences, key by key
    assert "config-diff" in cells.ids and "dp.enabled" in page.read_text()
    for name in ("test", "validation", "epsilon", "time"):
        assert_png(tmp_path / f"{name}.png")
    # the overlaid plot is wider than one run's panels: two runs draw two time panels
    single = write_report([RUNS / "plain"], out=tmp_path / "one").parent / "time.png"
    assert (tmp_path / "time.png").stat().st_size > single.stat().st_size


def test_runs_of_the_same_name_are_told_apart(tmp_path):
    first = shutil.copytree(RUNS / "plain", tmp_path / "a" / "run")
    second = shutil.copytree(RUNS / "plain", tmp_path / "b" / "run")
    cells = Cells(write_report([first, second], out=tmp_path / "out").read_text())
    assert cells.rows == ["a/run", "b/run"]


def _cli(capsys, *argv: str) -> tuple[int, str]:
    """``fedsilo report ARGV`` in this process: exit status and stderr."""
    from fedsilo.cli import main

    code = main(["report", *argv])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("missing", "no such directory"),
    ("file", "is not a directory"),
    ("not_a_run", "is not a fedsilo run directory"),
    ("no_rounds", "holds no metrics.jsonl yet"),
    ("empty", "metrics.jsonl is empty"),
    ("only_a_cut_line", "holds no complete row"),
    ("bad_config", "is not valid YAML"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case, message):
    target = tmp_path / case
    if case == "file":
        target.write_text("hello")
    elif case != "missing":
        target.mkdir()
    if case in ("no_rounds", "bad_config"):
        (target / "config.yaml").write_text("rounds: [unclosed\n" if case == "bad_config"
                                            else "rounds: 3\n")
    if case in ("empty", "bad_config"):
        (target / "metrics.jsonl").write_text("" if case == "empty" else
                                              (RUNS / "plain" / "metrics.jsonl").read_text())
    if case == "only_a_cut_line":
        (target / "metrics.jsonl").write_text('{"round": 1, "acc": 0.')
    if case == "not_a_run":
        (target / "model.pt").write_bytes(b"not read")
    code, stderr = _cli(capsys, str(target), "--out", str(tmp_path / "out"))
    assert code == 2, stderr
    assert stderr.startswith("fedsilo: error: ") and message in stderr
    assert stderr.count("\n") == 1 and "Traceback" not in stderr
    assert not (tmp_path / "out" / "report.html").exists()
    with pytest.raises(ReportError, match=message):
        load_run(target)


def test_the_command_prints_the_page_and_loads_no_torch(tmp_path):
    """fedsilo report runs where there is no torch (a laptop beside a copied run)."""
    run = copy_run("dp", tmp_path)
    probe = ("import sys; from fedsilo.cli import main; code = main(['report', sys.argv[1]]);"
             "assert 'torch' not in sys.modules and 'mpi4py' not in sys.modules, 'torch loaded';"
             "sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", probe, str(run)], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    page = run / "report" / "report.html"
    assert result.stdout.strip() == str(page) and page.is_file()


def test_the_board_scalars_are_the_rows_own_figures():
    """Each TensorBoard scalar is a figure of the metrics row, and under DP nothing per site
    but ε: the event files release nothing metrics.jsonl does not hold."""
    for run in ("plain", "dp"):
        for row in rows_of(RUNS / run):
            tags = scalars(row)
            for key in ("acc", "auc", "loss"):
                assert tags[f"test/{key}"] == row[key]
            for phase, value in row["seconds"].items():
                assert tags[f"seconds/{phase}"] == value
            assert tags["bytes/total"] == sum(row["bytes"].values())
            for site, value in (row.get("epsilon") or {}).items():
                assert tags[f"epsilon/site_{site}"] == value
            allowed = ("test/", "val/", "epsilon/", "user_epsilon/", "seconds/", "bytes/")
            assert all(tag.startswith(allowed) for tag in tags), sorted(tags)
            if run == "dp":
                assert not any(t.startswith("val/") for t in tags)
                per_site = {t for t in tags if "site" in t}
                assert per_site == {f"epsilon/site_{s}" for s in row["epsilon"]}


def test_an_unwritable_out_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    code, stderr = _cli(capsys, str(RUNS / "plain"), "--out", str(blocker / "out"))
    assert code == 2 and stderr.startswith("fedsilo: error: cannot write the report to ")
    assert stderr.count("\n") == 1
