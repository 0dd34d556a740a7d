"""The defects the rehearsal of the shipped WebVision recipe found (issue 19, `bench/rehearsal.py`), one test each:
a logger the shipped configs name but nothing installs, checkpoints without a limit, `--torch_compile` silently
training cross-entropy, precision from the accelerate config reported as fp32, DDP searching for unused parameters
MoPro never has, and an output folder that only one node of several sees."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import set_seed
from transformers.integrations import get_available_reporting_integrations

from evaluation.model_card import build_model_card
from modeling_mopro import MoProForImageClassification, MoProForPreTraining, MoProPhase
from tests._tiny import MoProModelTester
from tests.trainer_fixtures import tiny_config, tiny_image_dataset, tiny_trainer
from training import plan
from training.run_mopro import parse_args, save_run_args

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = sorted((ROOT / "training" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", SHIPPED, ids=lambda p: p.name)
def test_shipped_configs_report_only_to_installed_loggers(config):
    # Before: the WebVision configs named tensorboard, which is no dependency: TensorBoardCallback raised on every rank.
    _, _, training_args = parse_args([str(config)])
    missing = set(training_args.report_to) - set(get_available_reporting_integrations())
    assert not missing, f"{config.name} reports to {missing}, which is not installed"


@pytest.mark.parametrize("name", ["webvision_v1_r50.yaml", "webvision_v2_r50.yaml"])
def test_shipped_webvision_configs_keep_a_bounded_number_of_checkpoints(name):
    # 90 epochs x ~0.37 GB otherwise; at least 2, so `resume last` keeps a checkpoint before the newest.
    _, _, training_args = parse_args([str(ROOT / "training" / "configs" / name)])
    assert training_args.save_strategy == "epoch"
    assert training_args.save_total_limit is not None and training_args.save_total_limit >= 2


def _train_logs(trainer):
    return [entry for entry in trainer.state.log_history if "loss" in entry]


def test_torch_compile_keeps_every_mopro_loss_and_phase(tmp_path):
    # 48 samples / batch 6: prototypes from step 8, correction from step 16. Before: the Trainer compiled the whole
    # model, `unwrap_model` returned the compiled wrapper, and compute_loss trained CE without a phase ever changing.
    set_seed(0)
    trainer = tiny_trainer(
        str(tmp_path), tiny_image_dataset(48), max_steps=17, torch_compile=True, torch_compile_backend="eager"
    )
    assert isinstance(trainer.accelerator.unwrap_model(trainer.model), MoProForPreTraining)
    trainer.train()
    logs = _train_logs(trainer)
    assert [entry["phase"] for entry in logs] == [0] * 8 + [1] * 8 + [2]
    assert all(entry["loss_instance"] > 0 for entry in logs)
    assert all(entry["loss_prototype"] > 0 for entry in logs[8:])
    assert trainer.args.torch_compile and trainer.args.torch_compile_backend == "eager"
    # the backbones' feature extractors are the compiled part; the checkpoint names are the plain model's
    compiled = [
        m for m in trainer.model.modules() if hasattr(m.__dict__.get("forward_features"), "_torchdynamo_orig_callable")
    ]
    assert len(compiled) == 2
    assert set(trainer.model.state_dict()) == set(MoProForPreTraining(tiny_config()).state_dict())


def test_a_dynamo_backend_from_the_accelerate_config_compiles_the_backbones_and_says_so(tmp_path, monkeypatch):
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12))
    assert isinstance(trainer.accelerator.unwrap_model(trainer.model), MoProForPreTraining)
    assert trainer.args.torch_compile and trainer.args.torch_compile_backend == "eager"


def test_precision_from_the_accelerate_config_is_reported_by_the_run_and_the_card(tmp_path, monkeypatch):
    # `accelerate launch` with a config asking for bf16 sets ACCELERATE_MIXED_PRECISION; before, the run trained in
    # bf16 autocast while run_args.json (hence the card) said bf16: false.
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "bf16")
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12), max_steps=1)
    assert trainer.accelerator.mixed_precision == "bf16"
    assert trainer.args.bf16
    model_args, data_args, _ = parse_args([str(ROOT / "training" / "configs" / "demo.yaml")])
    save_run_args(str(tmp_path), model_args, data_args, trainer.args)
    run_args = json.loads((tmp_path / "run_args.json").read_text())
    assert run_args["training_args"]["bf16"] is True
    card = build_model_card(trainer.model.config, "user/mopro", run_args=run_args, model_name="mopro")
    assert "| precision | bf16 autocast in the backbones, fp32 heads and losses |" in str(card)


def test_the_card_says_fp32_when_nothing_asked_for_less(tmp_path):
    trainer = tiny_trainer(str(tmp_path), tiny_image_dataset(12), max_steps=1)
    assert trainer.accelerator.mixed_precision == "no" and not trainer.args.bf16
    card = build_model_card(trainer.model.config, "user/mopro", run_args={"training_args": trainer.args.to_dict()})
    assert "| precision | fp32 |" in str(card)


def test_the_plan_reads_precision_and_dynamo_from_an_accelerate_config(tmp_path, monkeypatch, capsys):
    for name in ("ACCELERATE_MIXED_PRECISION", "ACCELERATE_DYNAMO_BACKEND"):
        # set, then removed: monkeypatch then restores the variable's absence after the plan has set it
        monkeypatch.setenv(name, "no")
        monkeypatch.delenv(name)
    config = tmp_path / "accelerate.yaml"
    config.write_text(
        "compute_environment: LOCAL_MACHINE\nmixed_precision: bf16\ndynamo_config:\n  dynamo_backend: INDUCTOR\n"
    )
    v1 = str(ROOT / "training" / "configs" / "webvision_v1_r50.yaml")
    result = plan.main([v1, "--num_processes", "8", "--accelerate_config_file", str(config), "--json"])
    capsys.readouterr()
    assert result["precision"]["backbone"].startswith("bf16 autocast (from the accelerate config")
    assert [d["name"] for d in result["departures_from_official"]] == ["precision"]
    assert "backend inductor" in result["torch_compile"]
    assert os.environ["ACCELERATE_MIXED_PRECISION"] == "bf16"  # as `accelerate launch` would set it (undone after)


@pytest.mark.parametrize("phase", list(MoProPhase))
def test_mopro_uses_every_trainable_parameter_in_every_phase(phase):
    # The ground for `find_unused_parameters=False` (below): DDP raises if a parameter gets no gradient.
    tester = MoProModelTester()
    model = tester.create_pretraining_model()
    model.set_phase(phase)
    for seed in range(2):  # the second step has a filled queue and moved prototypes
        model.zero_grad(set_to_none=True)
        pixel_values, pixel_values_key, labels = tester.prepare_inputs(seed=seed)
        model(pixel_values=pixel_values, pixel_values_key=pixel_values_key, labels=labels).loss.backward()
        assert [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None] == []


def test_ddp_skips_the_unused_parameter_search_for_mopro_only(tmp_path):
    trainer = tiny_trainer(str(tmp_path / "mopro"), tiny_image_dataset(12))
    assert trainer.accelerator.ddp_handler.find_unused_parameters is False
    # the CE baseline never uses the projection head: the Trainer's default (search) stays
    ce = tiny_trainer(str(tmp_path / "ce"), tiny_image_dataset(12), model=MoProForImageClassification(tiny_config()))
    assert ce.accelerator.ddp_handler.find_unused_parameters is True


_NODE_SCRIPT = textwrap.dedent(
    """
    import sys
    from training.arguments import MoProTrainingArguments
    from modeling_mopro.cli import run_command
    from training.run_mopro import check_output_dir_shared

    def main(argv):
        out, save_on_each_node = argv[0], argv[1] == "true"
        args = MoProTrainingArguments(output_dir=out, use_cpu=True, report_to="none", save_on_each_node=save_on_each_node)
        check_output_dir_shared(args)
        print("checked", args.process_index, args.world_size, flush=True)
        import torch.distributed as dist
        dist.barrier()
        dist.destroy_process_group()

    run_command(main, sys.argv[1:])
    """
)


def _two_nodes(tmp_path, folders, save_on_each_node: bool, port: int):
    """Two one-process 'nodes' on localhost (LOCAL_RANK 0 on both), each with its own --output_dir."""
    script = tmp_path / "node.py"
    script.write_text(_NODE_SCRIPT)
    procs = []
    for rank, folder in enumerate(folders):
        env = {
            **os.environ, "PYTHONPATH": str(ROOT), "RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
        }  # fmt: skip
        argv = [sys.executable, str(script), str(folder), "true" if save_on_each_node else "false"]
        procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return [(p.wait(timeout=300), *p.communicate()) for p in procs]


@pytest.mark.slow
def test_an_output_folder_not_shared_by_the_nodes_is_refused(tmp_path):
    # Before: the run started, and the second node's checkpoints held no model or optimizer (it could never resume).
    per_node = [tmp_path / "node0", tmp_path / "node1"]
    for rc, out, err in _two_nodes(tmp_path, per_node, save_on_each_node=False, port=29613):
        assert rc == 2, (out, err)
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "not one folder shared by the 2 nodes" in lines[0], err
    # --save_on_each_node does not give the other nodes weights (transformers saves them on rank 0 only): refused
    for rc, _, err in _two_nodes(tmp_path, per_node, save_on_each_node=True, port=29614):
        assert rc == 2 and "--save_on_each_node true on 2 nodes" in err, err
    # one folder both nodes see: accepted, and no marker left behind
    shared = [tmp_path / "shared"] * 2
    results = _two_nodes(tmp_path, shared, save_on_each_node=False, port=29615)
    assert [rc for rc, _, _ in results] == [0, 0], results
    assert not list((tmp_path / "shared").glob(".node-check-*"))


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.device_count() > 1, reason="with GPUs the processes do form one group")
def test_processes_that_do_not_form_a_group_are_refused(tmp_path):
    """`--multi_gpu` on a machine without a GPU and a run not on the CPU: two processes each alone as rank 0. Before,
    both went on and the second refused the folder as "in use by another run"; now each says why, with the fix."""
    argv = ["accelerate", "launch", "--multi_gpu", "--num_processes", "2", "--main_process_port", "29617",
            "training/run_mopro.py", "training/configs/demo.yaml", "--use_cpu", "false", "--num_train", "64",
            "--num_test", "64", "--output_dir", str(tmp_path / "out")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(argv, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert done.returncode != 0 and len(lines) == 2, done.stderr[-3000:]
    assert all("launched as 2 processes, but they do not form one process group" in line for line in lines)
    assert "--cpu" in lines[0] and not (tmp_path / "out").exists()  # refused before the folder is touched
