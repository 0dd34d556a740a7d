"""bench/render_benchmarks.py: the figures of README.md and BENCHMARKS.md are their result files' rendering."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import collect_natural, render_benchmarks  # noqa: E402


def copy_tree(tmp_path: Path) -> Path:
    """The two documents and the result files, in a scratch root the test may change."""
    root = tmp_path / "repo"
    (root / "bench").mkdir(parents=True)
    for name in render_benchmarks.DOCUMENTS:
        shutil.copy(ROOT / name, root / name)
    shutil.copytree(ROOT / "bench" / "results-committed", root / "bench" / "results-committed")
    return root


def run_check(root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "bench/render_benchmarks.py", "--check", "--root", str(root)], cwd=ROOT,
                          capture_output=True, text=True)  # fmt: skip


def test_check_passes_on_the_committed_tree():
    done = run_check(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "rendered blocks match" in done.stdout


def test_every_committed_result_file_backs_a_block():
    """A result file committed without a block that renders it would be a figure nobody checks."""
    sources = set()
    for name in render_benchmarks.DOCUMENTS:
        _, findings = render_benchmarks.render_text((ROOT / name).read_text(), ROOT, name)
        sources |= {f.source for f in findings}
    committed = {f"bench/results-committed/{p.name}" for p in (ROOT / "bench" / "results-committed").glob("*.json")}
    assert committed <= sources


def test_check_fails_when_a_rendered_number_is_edited(tmp_path):
    root = copy_tree(tmp_path)
    readme = (root / "README.md").read_text()
    assert "69.22% clean test accuracy" in readme
    (root / "README.md").write_text(readme.replace("69.22% clean test accuracy", "71.22% clean test accuracy", 1))
    done = run_check(root)
    assert done.returncode == 1
    assert "README.md:" in done.stdout and "demo_" in done.stdout
    assert "-" in done.stdout and "71.22" in done.stdout and "69.22" in done.stdout  # the diff shows both


def test_check_fails_when_a_result_file_changes_and_rendering_repairs_it(tmp_path):
    root = copy_tree(tmp_path)
    source = root / "bench" / "results-committed" / "bad_inputs_merged_main.json"
    data = json.loads(source.read_text())
    data["totals"]["clear error"] -= 1
    data["totals"]["silent"] += 1
    source.write_text(json.dumps(data))
    done = run_check(root)
    assert done.returncode == 1
    assert "bad_inputs_totals" in done.stdout and "1 silent" in done.stdout
    rewrite = subprocess.run([sys.executable, "bench/render_benchmarks.py", "--root", str(root)], cwd=ROOT,
                             capture_output=True, text=True)  # fmt: skip
    assert rewrite.returncode == 0, rewrite.stderr
    assert "87 clear errors" in (root / "BENCHMARKS.md").read_text()
    assert run_check(root).returncode == 0


def test_bad_blocks_are_one_line_errors(tmp_path):
    root = copy_tree(tmp_path)
    marker = "<!-- rendered: {} from {}; edit the run, not this -->x<!-- end rendered -->"
    cases = (("text ", "no_such_kind", "rehearsal.json", "unknown renderer"),
             ("text ", "rehearsal_summary", "nope.json", "cannot read"),
             ("text ", "rehearsal_summary", "demo_main_command.json", "cannot render"),  # another kind's file
             ("", "rehearsal_summary", "rehearsal.json", "must follow text on its line"),  # would end the paragraph
             ("text ", "rehearsal_table", "rehearsal.json", "must start a line"))  # fmt: skip
    for before, kind, source, expected in cases:
        (root / "README.md").write_text("intro\n" + before + marker.format(kind, "bench/results-committed/" + source))
        done = run_check(root)
        assert done.returncode == 2
        assert done.stderr.startswith("error: README.md:2:") and expected in done.stderr
        assert "Traceback" not in done.stderr


# --------------------------------------------------------------------------------- the natural-image benchmark
def fake_natural_results(results_dir: Path) -> None:
    """Seed 0 of `human` finished for CE and MoPro adaptive (not fixed), seed 1 of CE only; `human`'s detection
    report scored seed 0; nothing else."""

    def run(setting: str, seed: int, method: str, accuracies: list[float], start: float | None = None) -> None:
        folder = results_dir / "accuracy" / f"{setting}_s{seed}" / method
        folder.mkdir(parents=True)
        results = {"eval_accuracy": accuracies[-1], "epoch": float(len(accuracies))}
        if start is not None:
            results["train_noise_correction_start_epoch"] = start
        (folder / "all_results.json").write_text(json.dumps(results))
        history = [{"epoch": float(e + 1), "eval_accuracy": a} for e, a in enumerate(accuracies)]
        history.insert(1, {"epoch": 1.0, "loss": 2.0})  # a training log line between evaluations
        (folder / "trainer_state.json").write_text(json.dumps({"log_history": history}))

    run("human", 0, "ce", [0.40, 0.55, 0.50])
    run("human", 0, "mopro_adaptive", [0.42, 0.53, 0.58], start=2.0)
    run("human", 1, "ce", [0.45, 0.52, 0.51])
    (results_dir / "accuracy" / "human_s1" / "mopro_adaptive").mkdir(parents=True)  # started, not finished
    detection = results_dir / "detection" / "human"
    detection.mkdir(parents=True)
    summary = {"label_error_precision": 0.8, "label_error_recall": 0.6, "label_error_f1": 0.6857,
               "label_quality_auroc": 0.9, "ood_auroc": None, "fraction_clean": 0.7}  # fmt: skip
    (detection / "scores.json").write_text(json.dumps({"MoPro, fitted thresholds": {"0": summary},
                                                        "cleanlab": {"0": {**summary, "fraction_clean": 0.5}}}))  # fmt: skip


def test_collector_reads_a_partial_tree_and_the_table_shows_what_is_missing(tmp_path):
    fake_natural_results(tmp_path / "natural")
    output = tmp_path / "natural_benchmark.json"
    assert collect_natural.main(["--results_dir", str(tmp_path / "natural"), "--output", str(output),
                                 "--commit", "abc1234", "--load", "a test"]) == 0  # fmt: skip
    data = json.loads(output.read_text())
    human = data["accuracy"]["human"]
    assert human["0"]["ce"] == {"final": 0.50, "best": 0.55, "best_epoch": 2, "correction_start_epoch": None,
                                 "epochs": 3}
    assert human["0"]["mopro_adaptive"] == {"final": 0.58, "best": 0.58, "best_epoch": 3, "correction_start_epoch": 2,
                                             "epochs": 3}
    assert human["0"]["mopro_fixed"] is None and human["1"]["mopro_adaptive"] is None and human["2"]["ce"] is None
    assert data["_run"]["commit"] == "abc1234" and data["_run"]["load"] == "a test"
    assert {"cpu_count", "load_average"} <= set(data["_run"]["machine"])
    cell = data["detection"]["human"]["MoPro, fitted thresholds"]["0"]
    assert cell["flagged_vs_true"] == pytest.approx(0.75) and cell["fraction_flagged"] == pytest.approx(0.3)
    assert data["detection"]["human"]["cleanlab"]["1"] is None and data["detection"]["asym20"] == {}

    table = render_benchmarks.natural_accuracy(data)
    rows = {tuple(cell.strip() for cell in line.split("|")[1:3]): line for line in table.splitlines()}
    assert "50.00 / 51.00 / missing" in rows[("human", "CE")]
    assert "50.50 ± 0.71 (2 of 3 seeds)" in rows[("human", "CE")]
    adaptive = rows[("human", "MoPro, adaptive")]
    assert "58.00 / missing / missing" in adaptive
    assert "+8.00 (1 of 3 seeds)" in adaptive  # paired with CE on seed 0 only
    assert rows[("human", "CE")].rstrip(" |").endswith("3.00")  # final below best: 5 and 1 points
    assert "missing / missing / missing" in rows[("asym40", "MoPro, fixed (epoch 4)")]
    # header + 4 settings x (3 demo-recipe rows + queue_vote) + the own-data recipe's 2 rows x 3 versions (40 epochs,
    # output stride 16, the length rule) on human and ood20 only
    assert len([line for line in table.splitlines() if line.startswith("| ") and "---" not in line]) == 1 + 4 * 4 + 2 * 6
    assert "missing / missing / missing" in rows[("ood20", "MoPro, own-data recipe (length rule)")]
    assert "| asym20 | CE, own-data recipe" not in table
    assert "| ood20 | MoPro, own-data recipe (40 epochs) |" in table
    assert "| ood20 | MoPro, own-data recipe + output stride 16 (tried) |" in table

    detection = render_benchmarks.natural_detection(data)
    assert "| human | MoPro, fitted thresholds | 0 | 80.0 | 60.0 | 68.6 | 0.900 | – | 0.750 |" in detection
    assert "| ood20 | all | missing |" in detection

    render_benchmarks.plot_natural(data, tmp_path / "natural.png")
    assert (tmp_path / "natural.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_natural_blocks_render_in_a_document(tmp_path):
    """A natural-benchmark block in BENCHMARKS.md renders and checks like any other."""
    fake_natural_results(tmp_path / "natural")
    root = copy_tree(tmp_path)
    collect_natural.main(["--results_dir", str(tmp_path / "natural"), "--output",
                          str(root / "bench/results-committed/natural_benchmark.json"), "--load", "a test"])  # fmt: skip
    marker = "<!-- rendered: natural_accuracy from bench/results-committed/natural_benchmark.json; edit the run, not this -->"
    benchmarks = root / "BENCHMARKS.md"
    benchmarks.write_text(benchmarks.read_text() + f"\n{marker}\nstale\n<!-- end rendered -->\n")
    assert run_check(root).returncode == 1
    assert render_benchmarks.main(["--root", str(root)]) == 0
    assert "missing / missing / missing" in benchmarks.read_text()
    assert (root / render_benchmarks.NATURAL_PLOT).is_file()
    assert run_check(root).returncode == 0


def test_rows_run_later_join_the_table_without_the_other_rows_run_folders(tmp_path):
    """`collect_natural.py --rows` adds the finished cells of the named rows to the committed file and keeps every
    other cell (their run folders may be gone); the addition is stamped and said under the table."""
    fake_natural_results(tmp_path / "first")
    output = tmp_path / "natural_benchmark.json"
    collect_natural.main(["--results_dir", str(tmp_path / "first"), "--output", str(output), "--commit", "aaa1111",
                          "--load", "first load"])  # fmt: skip
    later = tmp_path / "later" / "accuracy" / "ood20_s1" / "own_length_ce"
    later.mkdir(parents=True)
    (later / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.61, "epoch": 96.0}))
    stray = tmp_path / "later" / "accuracy" / "human_s0" / "ce"  # a row not named: must not replace the kept cell
    stray.mkdir(parents=True)
    (stray / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.01, "epoch": 30.0}))
    rows = ["own_length_ce", "own_length_mopro_adaptive"]
    assert collect_natural.main(["--results_dir", str(tmp_path / "later"), "--output", str(output), "--commit",
                                 "bbb2222", "--load", "later load", "--rows", *rows]) == 0  # fmt: skip
    data = json.loads(output.read_text())
    assert data["accuracy"]["human"]["0"]["ce"]["final"] == 0.50  # kept from the first collection
    assert data["accuracy"]["ood20"]["1"]["own_length_ce"]["final"] == 0.61
    assert data["accuracy"]["ood20"]["0"]["own_length_ce"] is None  # listed by the protocol, not run
    assert data["_run"]["commit"] == "aaa1111"
    assert [a["commit"] for a in data["_run"]["added"]] == ["bbb2222"] and data["_run"]["added"][0]["rows"] == rows
    table = render_benchmarks.natural_accuracy(data)
    assert "missing / 61.00 / missing" in table
    assert "Added later (CE, own-data recipe (length rule); MoPro, own-data recipe (length rule))" in table
    assert "`bbb2222`, later load" in table
    # a second addition of the same rows keeps the finished cell when its folder is gone
    assert collect_natural.main(["--results_dir", str(tmp_path / "first"), "--output", str(output), "--load", "x",
                                 "--rows", "own_length_ce"]) == 0  # fmt: skip
    assert json.loads(output.read_text())["accuracy"]["ood20"]["1"]["own_length_ce"]["final"] == 0.61


@pytest.mark.parametrize("argv", [["--rows", "own_lenght_ce"], ["--rows", "own_length_ce", "--output", "gone.json"]])
def test_adding_rows_refuses_an_unknown_row_or_a_missing_file_in_one_line(tmp_path, capsys, argv):
    fake_natural_results(tmp_path / "natural")
    output = tmp_path / "natural_benchmark.json"
    collect_natural.main(["--results_dir", str(tmp_path / "natural"), "--output", str(output), "--load", "a test"])
    argv = [str(tmp_path / a) if a.endswith(".json") else a for a in argv]
    before = output.read_text()
    assert collect_natural.main(["--results_dir", str(tmp_path / "natural"), "--output", str(output),
                                 "--load", "a test", *argv]) == 2  # fmt: skip
    error = capsys.readouterr().err.strip()
    assert error.startswith("error: --rows: ") and "\n" not in error
    assert output.read_text() == before
