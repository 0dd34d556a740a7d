"""The three MoPro loss terms as small pure functions (shapes in the docstrings).

L = L_ce + w_inst * L_ins + w_proto * L_pro ([0] MoPro, arXiv:2009.07995, Eq. 6). After noise correction starts,
L_ce and L_pro see only the kept samples while L_ins sees all of them (official `train.py`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def instance_logits(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float) -> torch.Tensor:
    """MoCo logits: the positive key first, then the queue of negatives.

    Args:
        q: (N, D) query embeddings (L2-normalised, with gradient).
        k: (N, D) momentum keys of the same images (no gradient).
        queue: (D, Q) earlier keys.
        temperature: softmax temperature.

    Returns:
        (N, 1 + Q) logits whose target is column 0.
    """
    l_pos = torch.einsum("nd,nd->n", q, k).unsqueeze(-1)  # (N, 1)
    l_neg = torch.einsum("nd,dq->nq", q, queue.detach())  # (N, Q)
    return torch.cat([l_pos, l_neg], dim=1) / temperature


def instance_contrastive_loss(logits: torch.Tensor) -> torch.Tensor:
    """InfoNCE over `instance_logits`: every row's positive is column 0.

    An empty batch (every image of this process's batch undecodable) gives 0, connected to the graph, as
    `masked_cross_entropy` does with nothing kept; a plain mean over no rows would be NaN.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return F.cross_entropy(logits, torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device))


def prototype_logits(q: torch.Tensor, prototypes: torch.Tensor, temperature: float) -> torch.Tensor:
    """Prototypical logits: (N, D) queries against (K, D) detached prototypes, giving (N, K)."""
    return q @ prototypes.detach().T / temperature


def masked_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the rows where `mask` is True.

    A batch with no kept sample gives 0 (connected to the graph, so every parameter still gets a gradient of
    zero and DDP's gradient all-reduce stays in step across processes), where a plain mean would give NaN.
    Computed as a masked sum over a clamped count: no branch on the mask's values, so no host synchronisation
    on a GPU (boolean indexing or `mask.any()` would wait for the device at every step).
    """
    per_sample = F.cross_entropy(logits, labels, reduction="none")  # (N,)
    kept = torch.where(mask, per_sample, per_sample.new_zeros(()))  # a left-out row's gradient is exactly 0
    return kept.sum() / mask.sum().clamp_min(1).to(per_sample.dtype)


__all__ = ["instance_contrastive_loss", "instance_logits", "masked_cross_entropy", "prototype_logits"]
