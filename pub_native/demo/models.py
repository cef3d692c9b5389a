"""Multi-task ranking models for tabular data: MMoE and PLE over an embedding input layer.

Demo layer (plain ``torch.nn``), used by ``pub_native.demo``; the backbones of the PUB paper's
section VI-A2. A batch is anything with ``.categorical`` (B, C) int64 codes and ``.numerical``
(B, F) float features, e.g. :class:`pub_native.demo.data.Batch`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MMoE", "PLE", "MultiTaskModel", "TabularEmbedding", "build_model"]


class TabularEmbedding(nn.Module):
    """Input layer: one ``embed_dim`` vector per categorical column, plus one for all numerical
    features (a linear layer), concatenated into (B, (C + 1)·embed_dim) — the input layer of
    the paper's code. The categorical columns share one table, column c at offset Σ_{c'<c} V_c'.
    """

    def __init__(self, vocab_sizes: Sequence[int], n_numerical: int, embed_dim: int):
        super().__init__()
        if any(v < 1 for v in vocab_sizes):
            raise ValueError(f"vocab_sizes must be positive, got {tuple(vocab_sizes)}")
        self.embedding = nn.Embedding(max(sum(vocab_sizes), 1), embed_dim)
        # Small initial embeddings (xavier, gain 0.1), as in the paper's code.
        nn.init.xavier_uniform_(self.embedding.weight, gain=0.1)
        offsets = torch.tensor([0, *vocab_sizes[:-1]], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets[: len(vocab_sizes)], persistent=False)
        self.numerical = nn.Linear(n_numerical, embed_dim) if n_numerical else None
        self.output_dim = (len(vocab_sizes) + (1 if n_numerical else 0)) * embed_dim

    def forward(self, categorical: torch.Tensor, numerical: torch.Tensor) -> torch.Tensor:
        parts = []
        if self.offsets.numel():
            parts.append(self.embedding(categorical + self.offsets).flatten(1))
        if self.numerical is not None:
            parts.append(self.numerical(numerical))
        return torch.cat(parts, dim=1)


class _Experts(nn.Module):
    """n single-layer experts ReLU(W_e x + b_e) of the same shape, computed as one Linear:
    output (B, n, dim). Mathematically the same as n separate ``nn.Linear`` + ReLU."""

    def __init__(self, in_dim: int, n: int, dim: int):
        super().__init__()
        self.n, self.dim = n, dim
        self.linear = nn.Linear(in_dim, n * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.linear(x)).view(x.shape[0], self.n, self.dim)


def _gate(in_dim: int, n_experts: int) -> nn.Module:
    return nn.Sequential(nn.Linear(in_dim, n_experts), nn.Softmax(dim=1))


def _mix(gate: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Σ_e gate[:, e] · experts[:, e, :] -> (B, dim). (Multiply and sum: on the CPU, a batch of
    B (1 × n)·(n × dim) products through bmm is several times slower.)"""
    return (gate.unsqueeze(2) * experts).sum(1)


def _tower(in_dim: int, hidden: Sequence[int]) -> nn.Module:
    layers: list[nn.Module] = []
    for h in hidden:
        layers += [nn.Linear(in_dim, h), nn.ReLU()]
        in_dim = h
    layers.append(nn.Linear(in_dim, 1))
    return nn.Sequential(*layers)


class MultiTaskModel(nn.Module):
    """K binary tasks. ``forward(batch)`` -> logits (B, K); ``task_losses(batch)`` -> K losses.

    Subclasses implement :meth:`representation_and_logits`: the shared representation z (the
    trunk's output that the task heads read: a tensor or a list of tensors, for
    :class:`pub_native.balancers.MultiBalance`) and one (B,) logit tensor per task. The losses
    are built from those separate tensors (not from columns of the stacked logits), so that each
    loss's autograd graph reaches only its own tower: that is how PUB and
    ``pub_native.balancers`` tell shared from task-specific parameters.
    """

    n_tasks: int

    def representation_and_logits(self, batch) -> tuple:
        raise NotImplementedError

    def task_logits(self, batch) -> list[torch.Tensor]:
        return self.representation_and_logits(batch)[1]

    def forward(self, batch) -> torch.Tensor:
        return torch.stack(self.task_logits(batch), dim=1)

    def task_losses(self, batch, *, with_representation: bool = False):
        """Binary cross-entropy of each task, averaged over the batch (``batch.labels`` (B, K));
        with ``with_representation``, ``(losses, z)``."""
        z, logits = self.representation_and_logits(batch)
        labels = batch.labels
        losses = [F.binary_cross_entropy_with_logits(logit, labels[:, k])
                  for k, logit in enumerate(logits)]
        return (losses, z) if with_representation else losses


class MMoE(MultiTaskModel):
    r"""Multi-gate Mixture-of-Experts (Ma et al., KDD 2018), as in the PUB paper's section VI-A2.

    x = embedding(batch); experts e_j(x) = ReLU(W_j x + b_j), j = 1..n_experts (shared);
    per task k a softmax gate g_k(x) = softmax(V_k x + c_k) and a tower:
    logit_k = tower_k(Σ_j g_k(x)_j · e_j(x)).

    Shared parameters: the embeddings and the experts. Task-specific: gate k and tower k.
    Shared representation z (what the heads read from the shared part): the experts' outputs
    (B, n_experts, expert_dim) and the gates' input, an alias of the embedding (B, d).
    """

    def __init__(self, vocab_sizes: Sequence[int], n_numerical: int, n_tasks: int, *,
                 embed_dim: int = 16, n_experts: int = 8, expert_dim: int = 64,
                 tower_dims: Sequence[int] = (32,)):
        super().__init__()
        _check_sizes(n_tasks=n_tasks, embed_dim=embed_dim, n_experts=n_experts,
                     expert_dim=expert_dim)
        self.n_tasks = n_tasks
        self.embedding = TabularEmbedding(vocab_sizes, n_numerical, embed_dim)
        d = self.embedding.output_dim
        self.experts = _Experts(d, n_experts, expert_dim)
        self.gates = nn.ModuleList(_gate(d, n_experts) for _ in range(n_tasks))
        self.towers = nn.ModuleList(_tower(expert_dim, tower_dims) for _ in range(n_tasks))

    def representation_and_logits(self, batch) -> tuple:
        x = self.embedding(batch.categorical, batch.numerical)
        experts = self.experts(x)
        # The gates read the embedding through their own alias: a tensor of the representation
        # that the experts' output is not computed from (MultiBalance's heads end there).
        gate_in = x.view_as(x)
        return [experts, gate_in], [tower(_mix(gate(gate_in), experts)).squeeze(1)
                                    for gate, tower in zip(self.gates, self.towers, strict=True)]


class PLE(MultiTaskModel):
    r"""Progressive Layered Extraction (Tang et al., RecSys 2020), as in the PUB paper.

    ``n_levels`` extraction levels (the paper: two); level l has ``n_shared`` shared experts
    S^l and, per task k, ``n_specific`` task experts T_k^l, all single-layer ReLU experts.
    Inputs: level 1 gets x = embedding(batch) for every path; then
    h_k^l = softmax(gate_k^l(h_k^{l-1})) · [T_k^l(h_k^{l-1}), S^l(s^{l-1})] for task k and,
    below the last level, s^l = softmax(gate_s^l(s^{l-1})) · [T_1^l, ..., T_K^l, S^l](·) for
    the shared path; logit_k = tower_k(h_k^L).

    The paper's text gives 4 shared + 4 task experts (section VI-A3) and 8 + 8 (VI-A2); the
    default is 4 + 4, as in the paper's code (expert_num / 2 each).

    Shared representation z: the inputs of the last level, [h_1^{L-1}, ..., h_K^{L-1},
    s^{L-1}] (tensors that do not depend on each other), or the embedding for one level.
    """

    def __init__(self, vocab_sizes: Sequence[int], n_numerical: int, n_tasks: int, *,
                 embed_dim: int = 16, n_levels: int = 2, n_shared: int = 4,
                 n_specific: int = 4, expert_dim: int = 64, tower_dims: Sequence[int] = (32,)):
        super().__init__()
        _check_sizes(n_tasks=n_tasks, embed_dim=embed_dim, n_levels=n_levels,
                     n_shared=n_shared, n_specific=n_specific, expert_dim=expert_dim)
        self.n_tasks = n_tasks
        self.embedding = TabularEmbedding(vocab_sizes, n_numerical, embed_dim)
        self.levels = nn.ModuleList()
        in_dim = self.embedding.output_dim
        for level in range(n_levels):
            last = level == n_levels - 1
            self.levels.append(nn.ModuleDict({
                "shared_experts": _Experts(in_dim, n_shared, expert_dim),
                "task_experts": nn.ModuleList(
                    _Experts(in_dim, n_specific, expert_dim) for _ in range(n_tasks)),
                "task_gates": nn.ModuleList(
                    _gate(in_dim, n_specific + n_shared) for _ in range(n_tasks)),
                # The last level has no shared output, hence no shared gate.
                "shared_gate": nn.Identity() if last else _gate(
                    in_dim, n_tasks * n_specific + n_shared),
            }))
            in_dim = expert_dim
        self.towers = nn.ModuleList(_tower(expert_dim, tower_dims) for _ in range(n_tasks))

    def representation_and_logits(self, batch) -> tuple:
        x = self.embedding(batch.categorical, batch.numerical)
        task_in = [x] * self.n_tasks
        shared_in = x
        z = [x]
        for i, level in enumerate(self.levels):
            if i == len(self.levels) - 1 and i > 0:
                z = [*task_in, shared_in]
            shared = level["shared_experts"](shared_in)
            task = [experts(h)
                    for experts, h in zip(level["task_experts"], task_in, strict=True)]
            new_task_in = [
                _mix(gate(h), torch.cat([t, shared], dim=1))
                for gate, h, t in zip(level["task_gates"], task_in, task, strict=True)
            ]
            if not isinstance(level["shared_gate"], nn.Identity):
                shared_in = _mix(level["shared_gate"](shared_in), torch.cat([*task, shared], 1))
            task_in = new_task_in
        return z, [tower(h).squeeze(1) for tower, h in zip(self.towers, task_in, strict=True)]


MODELS = {"mmoe": MMoE, "ple": PLE}


def build_model(name: str, data, **kwargs) -> MultiTaskModel:
    """``"mmoe"`` or ``"ple"`` sized for a :class:`pub_native.demo.data.MultiTaskData`."""
    try:
        cls = MODELS[name.lower()]
    except (KeyError, AttributeError):
        raise ValueError(f"model must be one of {sorted(MODELS)}, got {name!r}") from None
    return cls(data.vocab_sizes, data.n_numerical, data.n_tasks, **kwargs)


def _check_sizes(**sizes: int) -> None:
    for name, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
