"""The benchmark scripts run end to end at toy sizes and write what BENCHMARKS.md reads (not their figures: those come
from full runs, never from tests)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from training.data.noisy_fashion_mnist import FASHION_MNIST_APT_PACKAGE, FASHION_MNIST_DIR

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import bench_class_diversity  # noqa: E402
import demo_seeds  # noqa: E402
import label_noise_benchmark  # noqa: E402
import noisy_benchmark  # noqa: E402
import regime_grid  # noqa: E402


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"needs the Debian package {FASHION_MNIST_APT_PACKAGE}",
)
def test_noisy_benchmark_runs_both_methods_and_reports_paired_differences(tmp_path):
    def run(method, seed):
        args = noisy_benchmark.parse_args(
            ["--num_train", "200", "--num_test", "100", "--batch_size", "32", "--queue_size", "64",
             "--workers", "0", "--results_dir", str(tmp_path)]
        )  # fmt: skip
        return noisy_benchmark.run("sym40", method, 2, seed, args)

    runs = [run(method, seed) for method in ("ce", "mopro") for seed in (0, 1)]
    assert [path.name for path in runs] == ["sym40_wd0.0001_ce_s0", "sym40_wd0.0001_ce_s1",
                                            "sym40_wd0.0001_mopro_s0", "sym40_wd0.0001_mopro_s1"]  # fmt: skip
    history = json.loads((runs[2] / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == [1, 2]
    for key in ("test_accuracy", "official_ood_recall", "distance_ood_precision", "distance_auroc"):
        assert 0.0 <= history[-1][key] <= 1.0, key
    summary = json.loads((runs[2] / "summary.json").read_text())
    assert summary["final_test_accuracy"] == history[-1]["test_accuracy"]
    assert summary["arguments"]["weight_decay"] == 1e-4 and summary["lr_milestones"] == [1, 2]
    decisions = json.loads((runs[2] / "per_class_decisions.json").read_text())
    assert sum(row["given"] for row in decisions) == summary["num_train"]

    table = noisy_benchmark.report(tmp_path)
    assert (tmp_path / "noisy_sym40_2epochs_wd0.0001_crop0.2.png").stat().st_size > 0
    ce = {s: json.loads((runs[s] / "summary.json").read_text())["final_test_accuracy"] for s in (0, 1)}
    mopro = {s: json.loads((runs[2 + s] / "summary.json").read_text())["final_test_accuracy"] for s in (0, 1)}
    differences = [100 * (mopro[s] - ce[s]) for s in (0, 1)]
    mean = sum(differences) / 2
    sd = (sum((d - mean) ** 2 for d in differences)) ** 0.5  # n - 1 = 1
    row = next(line for line in table.splitlines() if "| mopro | 0, 1 |" in line)
    assert row.endswith(f"| {mean:.2f} ± {sd:.2f} (n=2) |")


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"needs the Debian package {FASHION_MNIST_APT_PACKAGE}",
)
def test_regime_grid_runs_every_method_per_cell_and_reports_paired_differences(tmp_path, monkeypatch):
    """One toy cell, 2 seeds, 3 methods, split over 2 lanes: every run once, then the paired table and the plot."""
    for name, value in (("SETTINGS", ("sym40",)), ("CROPS", (1.0,)), ("EPOCHS", (2,)), ("SEEDS", (0, 1)),
                        ("NUM_TRAIN", 120), ("NUM_TEST", 60),
                        ("EXTRA_FLAGS", ["--batch_size", "32", "--queue_size", "64"])):  # fmt: skip
        monkeypatch.setattr(regime_grid, name, value)
    for lane in (0, 1):
        regime_grid.main(
            ["run", "--lane", str(lane), "--lanes", "2", "--workers", "0", "--results_dir", str(tmp_path)]
        )
    runs = sorted(path.parent.name for path in tmp_path.glob("e2/*/summary.json"))
    assert runs == ["sym40_wd0.0001_crop1_ce_s0", "sym40_wd0.0001_crop1_ce_s1", "sym40_wd0.0001_crop1_mopro_adaptive_s0",
                    "sym40_wd0.0001_crop1_mopro_adaptive_s1", "sym40_wd0.0001_crop1_mopro_s0",
                    "sym40_wd0.0001_crop1_mopro_s1"]  # fmt: skip
    adaptive = json.loads((tmp_path / "e2" / runs[2] / "summary.json").read_text())
    assert adaptive["noise_correction_schedule"] == "adaptive"
    assert json.loads((tmp_path / "e2" / runs[4] / "summary.json").read_text())["noise_correction_schedule"] == "fixed"

    regime_grid.report(tmp_path)
    (row,) = json.loads((tmp_path / "grid.json").read_text())

    def finals(method):
        runs = [tmp_path / "e2" / f"sym40_wd0.0001_crop1_{method}_s{seed}" / "summary.json" for seed in (0, 1)]
        return [100 * json.loads(path.read_text())["final_test_accuracy"] for path in runs]

    paired = [m - c for m, c in zip(finals("mopro_adaptive"), finals("ce"), strict=True)]
    assert row["mopro_adaptive_minus_ce"] == pytest.approx(sum(paired) / 2)
    assert row["mopro_adaptive_minus_ce_sd"] == pytest.approx(abs(paired[0] - paired[1]) / 2**0.5)
    assert row["mopro_adaptive_per_seed"] == pytest.approx(paired)  # the plot's dots
    # What the official rule's decisions would get right at their best scored epoch, from the adaptive runs' histories
    adaptive_runs = [tmp_path / "e2" / f"sym40_wd0.0001_crop1_mopro_adaptive_s{seed}" for seed in (0, 1)]
    histories = [json.loads((run / "history.json").read_text()) for run in adaptive_runs]
    ceilings = [max(h["official_kept_label_accuracy"] for h in history if "official_kept_label_accuracy" in h)
                for history in histories]  # fmt: skip
    assert row["correction_ceiling"] == pytest.approx(100 * sum(ceilings) / 2)
    assert row["given_labels_right"] == pytest.approx(60.0)
    assert "| 60 / " in (tmp_path / "grid.md").read_text()
    assert (tmp_path / "regime_grid.png").stat().st_size > 0
    assert "1 of 1 cells complete" in (tmp_path / "grid.md").read_text()


def test_demo_seeds_report_pairs_the_runs_by_seed(tmp_path):
    """The report reads what run_mopro writes (all_results.json, trainer_state.json); constructed runs here."""
    finals = {("mopro", 0): 0.70, ("mopro", 1): 0.72, ("ce", 0): 0.60, ("ce", 1): 0.66}
    for (method, seed), final in finals.items():
        out = tmp_path / f"{method}_s{seed}"
        out.mkdir()
        (out / "all_results.json").write_text(
            json.dumps({"eval_accuracy": final, "train_noise_correction_start_epoch": 5})
        )
        history = [
            {"eval_accuracy": 0.65, "epoch": 1.0},
            {"loss": 1.0, "epoch": 1.5},
            {"eval_accuracy": final, "epoch": 2.0},
        ]
        (out / "trainer_state.json").write_text(json.dumps({"log_history": history}))
    (tmp_path / "ce_s2").mkdir()  # an unfinished run is left out
    summary = demo_seeds.report(tmp_path)
    assert summary["seeds"] == [0, 1]
    assert summary["mopro_minus_ce"] == pytest.approx([10.0, 6.0])
    assert summary["ce"]["best"] == pytest.approx([65.0, 66.0])
    assert "| MoPro − CE, paired by seed | | **8.00 ± 2.83** |" in (tmp_path / "table.md").read_text()
    assert (tmp_path / "demo_seeds.png").stat().st_size > 0


def test_regime_grid_goal_per_cell():
    """+3 where CE memorises (final more than 1 point below its best), no worse than -1 elsewhere."""
    row = {"ce_memorises": True, "mopro_adaptive_minus_ce": 2.9}
    assert not regime_grid.goal_met(row) and regime_grid.goal_met({**row, "mopro_adaptive_minus_ce": 3.0})
    row = {"ce_memorises": False, "mopro_adaptive_minus_ce": -1.01}
    assert not regime_grid.goal_met(row) and regime_grid.goal_met({**row, "mopro_adaptive_minus_ce": -0.99})


@pytest.mark.skipif(
    not (FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file(),
    reason=f"needs the Debian package {FASHION_MNIST_APT_PACKAGE}",
)
def test_label_noise_benchmark_trains_both_methods_and_scores_them_against_the_truth(tmp_path):
    common = ["--num_train", "80", "--epochs", "2", "--batch_size", "16", "--queue_size", "64", "--workers", "0",
              "--results_dir", str(tmp_path)]  # fmt: skip
    for method in ("mopro", "cleanlab"):
        label_noise_benchmark.main(["train", "--method", method, *common])
    label_noise_benchmark.main(["train", "--method", "mopro", "--correction_schedule", "adaptive", *common])
    assert (tmp_path / "mopro_s0" / "model" / "sample_dynamics.safetensors").is_file()  # the report's evidence
    cleanlab = json.loads((tmp_path / "cleanlab_s0" / "run.json").read_text())
    mopro = json.loads((tmp_path / "mopro_s0" / "run.json").read_text())
    # 80 images + 20% OOD on top = 100 samples; each of the 5 folds trains on the other 80.
    assert (mopro["training_runs"], mopro["sample_epochs"]) == (1, 2 * 100)
    assert (cleanlab["training_runs"], cleanlab["sample_epochs"]) == (5, 5 * 2 * 80)
    out_of_fold = np.load(tmp_path / "cleanlab_s0" / "out_of_fold.npz")
    assert out_of_fold["probabilities"].shape == (100, 10)
    np.testing.assert_allclose(out_of_fold["probabilities"].sum(1), 1, atol=1e-5)  # every row held out once

    label_noise_benchmark.main(["cost", "--repeats", "1", *common])
    cost = json.loads((tmp_path / "cost.json").read_text())
    assert cost["mopro_run_vs_cleanlab"] > 0 and [len(v) for v in cost["seconds_per_epoch"].values()] == [1, 1]

    table = label_noise_benchmark.main(["report", "--results_dir", str(tmp_path)])
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert list(scores) == [*label_noise_benchmark.METHODS[:2], "MoPro adaptive, fitted thresholds",
                            "MoPro adaptive, training rule", "cleanlab"]  # fmt: skip
    assert scores["MoPro, fitted thresholds"]["0"]["label_evidence"] == "neighbour vote + training dynamics"
    for method, by_seed in scores.items():
        for key in ("label_error_f1", "ood_precision", "relabel_precision"):
            value = by_seed["0"][key]
            assert value is None or 0 <= value <= 1, (method, key)
    assert scores["cleanlab"]["0"]["compute_vs_cleanlab"] == 1.0
    assert (tmp_path / "table.md").read_text().startswith("| method | label-error P |")
    assert (tmp_path / "label_noise.png").stat().st_size > 0 and "Measured alone, A/B alternated" in table
    label_noise_benchmark.main(["report", "--results_dir", str(tmp_path), "--seeds", "0"])
    assert (tmp_path / "table_s0.md").read_text() == (tmp_path / "table.md").read_text()

    # The label-evidence comparison on the same run: each evidence's report, rendered as a table.
    import label_evidence_dev
    import render_benchmarks

    result = label_evidence_dev.main([str(tmp_path / "mopro_s0"), "--out", str(tmp_path / "evidence.json")])
    row = result["rows"][0]
    assert list(row["evidence"]) == ["combined", "training", "neighbours"] and row["data"] == "fashion_mnist"
    assert [row["evidence"][e]["label_evidence"] for e in row["evidence"]] == [
        "neighbour vote + training dynamics", "training dynamics", "neighbour vote"]  # fmt: skip
    table = render_benchmarks.RENDERERS["label_evidence"].render(json.loads((tmp_path / "evidence.json").read_text()))
    assert table.count("| fashion mnist | 0 | fixed |") == 3 and "Mean label-error F1 over the 1 runs" in table


def test_data_pipeline_benchmark_quick_run(tmp_path):
    output = tmp_path / "data_pipeline.json"
    subprocess.run(
        [sys.executable, str(BENCH / "bench_data_pipeline.py"), "--images", "8", "--repetitions", "1",
         "--image_size", "64", "--output", str(output)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    result = json.loads(output.read_text())
    names = [row["pipeline"] for row in result["pipelines"]]
    assert names[0].startswith("official") and any("shipped" in name for name in names)
    assert result["agreement_uint8_levels"]["uint8_batch_normalised_equals_float_batch"] is True
    assert result["agreement_uint8_levels"]["decode_jpeg_vs_pil_max_abs_diff"] == 0


def test_class_diversity_benchmark_quick_run(tmp_path):
    output = tmp_path / "class_diversity.json"
    bench_class_diversity.main(
        ["--num_samples", "1200", "--num_classes", "40", "--samples_per_shard", "20", "--shuffle_buffer", "20",
         "--workdir", str(tmp_path), "--output", str(output)]
    )  # fmt: skip
    result = json.loads(output.read_text())
    orders = result["orders"]
    streams = ["class_sorted_shards", "shuffled_shards", "webvision_stream_in_file_order", "webvision_stream"]
    assert list(orders) == ["uniform", *streams]
    assert (result["samples_per_shard"], result["shuffle_buffer"], result["num_classes"]) == (20, 20, 40)
    for name in streams:
        assert len(orders[name]["distinct_per_batch"]) == 2 and orders[name]["order_differs_between_epochs"]
    # the class-sorted list really is the hard case the shuffled shards fix
    assert orders["class_sorted_shards"]["fraction_of_uniform"] < orders["shuffled_shards"]["fraction_of_uniform"]
    assert (
        orders["webvision_stream_in_file_order"]["fraction_of_uniform"]
        < orders["webvision_stream"]["fraction_of_uniform"]
    )


def test_bad_inputs_quick_run_classifies_outcomes(tmp_path):
    """The harness's self-checks (fake commands of known behaviour) land in their outcome, and the real quick
    case runs to an outcome (which one depends on the command: that is the benchmark's figure, not the test's)."""
    import bad_inputs

    rows_path = tmp_path / "rows.json"
    result = bad_inputs.main(["--quick", "--json", str(rows_path), "--output", str(tmp_path / "bad_inputs.json")])
    outcomes = {row["name"]: row["outcome"] for row in result["rows"]}
    assert outcomes.pop("self_raw_traceback") == "raw traceback"
    assert outcomes.pop("self_clear_error") == "clear error"
    assert outcomes.pop("self_silent") == "silent"
    assert outcomes.pop("self_skip_counted") == "skip counted"
    assert outcomes.pop("self_lost") == "lost"
    assert list(outcomes) == ["shards_folder_missing"] and outcomes["shards_folder_missing"] in bad_inputs.OUTCOMES
    assert result["totals"]["cases"] == 6 and result["totals"]["lost"] >= 1
    assert json.loads(rows_path.read_text())["rows"] == result["rows"]
    assert json.loads((tmp_path / "bad_inputs.json").read_text())["machine"]["cpu_count"] >= 1


def test_gpu_benchmark_quick_run_on_cpu(tmp_path):
    """`bench/gpu_benchmark.py --device cpu --quick`: every row of the GPU table runs (per-rank and one-GPU, fp32,
    bf16 + channels_last, compile; both end-to-end paths from JPEG files), and a MoPro step has no host sync."""
    output = tmp_path / "gpu_benchmark.json"
    completed = subprocess.run(
        [sys.executable, str(BENCH / "gpu_benchmark.py"), "--device", "cpu", "--quick", "--output", str(output)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    result = json.loads(output.read_text())
    rows = {(row["configuration"], row["setting"]): row for row in result["rows"]}
    assert set(rows) == {
        ("per-rank", "fp32"), ("per-rank", "bf16 + channels_last"), ("per-rank", "bf16 + channels_last + compile"),
        ("one-GPU", "fp32"), ("one-GPU", "bf16 + channels_last"),
    }  # fmt: skip
    assert rows[("per-rank", "fp32")]["bn_groups"] == 1 and rows[("one-GPU", "fp32")]["bn_groups"] == 8
    for row in rows.values():
        assert "error" not in row, row
        mopro = row["models"]["MoPro"]
        assert mopro["host_syncs_per_step"] == 0, mopro["host_syncs_by_name"]
        assert mopro["img_per_s"] > 0 and row["floor_ratio"] > 1
        assert mopro["ratio_to_floor"] == pytest.approx(mopro["ratio_to_ce"] / row["floor_ratio"])
    paths = [row["path"] for row in result["end_to_end"]]
    assert paths == ["end-to-end, CPU workers", "end-to-end, GPU decode + augment"]
    assert all(row.get("img_per_s", 0) > 0 and row["ratio_to_model_only"] > 0 for row in result["end_to_end"])
    assert "host syncs/step" in completed.stdout and "per-rank" in completed.stdout
