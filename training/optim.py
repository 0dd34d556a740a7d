"""The optimizer and LR step schedule of every training here: `MoProTrainer`, `evaluation.finetune` and
`evaluation.classifier_retrain`; `training.plan` prints what they build."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.optim.lr_scheduler import MultiStepLR
from transformers import Trainer, TrainingArguments


def create_optimizer(model: torch.nn.Module, args: TrainingArguments) -> torch.optim.Optimizer:
    """The optimizer of `--optim` (SGD officially) with `--optim_args` as transformers reads them (SGD: momentum,
    nesterov, dampening), over every trainable parameter, weight decay on all of them: official MoPro
    (train.py L208: `model.parameters()`) and its evaluation recipes decay BatchNorm and biases too."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args, model)
    params = [p for p in model.parameters() if p.requires_grad]
    # The Trainer's two groups (decay, no decay; the second empty): optimizer states saved by it load into this one.
    groups = [{"params": params, "weight_decay": args.weight_decay}, {"params": [], "weight_decay": 0.0}]
    return optimizer_cls(groups, **kwargs)


def sgd_momentum(args: TrainingArguments) -> float | None:
    """The momentum `create_optimizer` gives SGD (torch's default 0 when `optim_args` sets none); None if not SGD."""
    optimizer_cls, kwargs = Trainer.get_optimizer_cls_and_kwargs(args)
    return float(kwargs.get("momentum", 0.0)) if optimizer_cls is torch.optim.SGD else None


def step_lr_scheduler(
    optimizer: torch.optim.Optimizer, milestones: Sequence[float], steps_per_epoch: float, gamma: float
) -> MultiStepLR:
    """The official step decay: the learning rate times `gamma` from the first optimizer step of each milestone
    epoch on (`adjust_learning_rate` at every epoch's start), the milestones given in epochs."""
    return MultiStepLR(optimizer, [round(epoch * steps_per_epoch) for epoch in milestones], gamma)


def milestone_learning_rates(
    learning_rate: float, milestones: Sequence[float], steps_per_epoch: float, gamma: float
) -> dict[int, float]:
    """{optimizer step: learning rate from it} at each milestone, read off the scheduler a run builds."""
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(()))], lr=learning_rate)
    scheduler = step_lr_scheduler(optimizer, milestones, steps_per_epoch, gamma)
    optimizer.step()  # no gradient: a no-op, so that the scheduler does not warn about its order
    rates = {}
    for step in sorted(scheduler.milestones):
        scheduler.last_epoch = step - 1  # the scheduler's own step to `step`, the steps between changing nothing
        scheduler.step()
        rates[step] = scheduler.get_last_lr()[0]
    return rates

