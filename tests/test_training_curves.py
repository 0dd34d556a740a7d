"""`evaluation.training_curves`: the series read from a trainer state, the correction start, the PNG and its command."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from evaluation import training_curves


def trainer_state(start_log: int | None = 4) -> dict:
    """Logs of a 6-epoch run, two training logs per epoch and one evaluation; correction strength turns positive at
    the `start_log`-th training log (None: never)."""
    history = []
    for k in range(12):
        epoch = (k + 1) / 2
        strength = 0.0 if start_log is None or k < start_log else 1.0
        history.append({
            "epoch": epoch, "step": 10 * (k + 1), "loss": 5.0 - 0.3 * k, "loss_cls": 2.0 - 0.1 * k,
            "loss_instance": 2.5, "loss_prototype": 0.5, "fraction_kept": 1.0 - 0.05 * strength,
            "fraction_relabeled": 0.1 * strength, "fraction_ood": 0.05 * strength,
            "classifier_prototype_agreement": 0.1 * k / 2, "fit_given_labels": 0.4, "correction_strength": strength,
        })  # fmt: skip
        if k % 2 == 1:
            history.append({"epoch": epoch, "step": 10 * (k + 1), "eval_accuracy": 0.1 * epoch, "eval_loss": 1.0})
    history.append({"epoch": 6.0, "step": 120, "train_runtime": 1.0, "train_loss": 3.0})  # the Trainer's summary
    return {"log_history": history, "global_step": 120, "epoch": 6.0}


def test_series_and_correction_start():
    curves = training_curves.read_training_curves(trainer_state())
    epochs, accuracy = curves.series["eval_accuracy"]
    assert epochs == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0] and accuracy == pytest.approx([0.1 * e for e in epochs])
    assert curves.series["loss_cls"][1][:2] == pytest.approx([2.0, 1.9]) and len(curves.series["loss"][0]) == 12
    assert "eval_loss" not in curves.series and "train_loss" not in curves.series
    # Without the run's record: the last log before correction was seen (the 4th training log ends epoch 2).
    assert curves.correction_start == 2.0
    # The run's own record wins; -1 (never began) and no correction at all mark nothing.
    recorded = {training_curves.START_KEY: 2.0}
    assert training_curves.read_training_curves(trainer_state(5), recorded).correction_start == 2.0
    assert (
        training_curves.read_training_curves(trainer_state(None), {training_curves.START_KEY: -1}).correction_start
        is None
    )
    assert training_curves.read_training_curves(trainer_state(None)).correction_start is None


def test_png_beside_the_run_and_the_command(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "trainer_state.json").write_text(json.dumps(trainer_state()))
    (run / "all_results.json").write_text(json.dumps({training_curves.START_KEY: 2.0, "eval_accuracy": 0.6}))
    path = training_curves.main([str(run)])
    assert path == run / training_curves.CURVES_FILE and f"wrote {path}" in capsys.readouterr().out
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == (880, 560)
    # A CE run logs no contrastive losses or schedule signals: the picture still comes, with what it has.
    ce = trainer_state(None)
    for entry in ce["log_history"]:
        for key in ("loss_instance", "loss_prototype", "classifier_prototype_agreement", "correction_strength"):
            entry.pop(key, None)
    (run / "trainer_state.json").write_text(json.dumps(ce))
    other = training_curves.plot_training_curves(run / "trainer_state.json", tmp_path / "ce.png")
    assert other.is_file()


@pytest.mark.parametrize("content", [None, "not json", json.dumps({"log_history": []}), json.dumps({"x": 1})])
def test_bad_input_is_a_one_line_error(tmp_path, content, capsys):
    from modeling_mopro.cli import run_command

    if content is not None:
        (tmp_path / "trainer_state.json").write_text(content)
    with pytest.raises(SystemExit) as exit_info:
        run_command(training_curves.main, [str(tmp_path)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and error.count("\n") == 1 and "trainer_state.json" in error
