"""Mixture of experts: the MLP of every `moe_every`-th block, single-device (model.py's Block).

For the N tokens x_t of a micro-batch (flattened [b, s, h] -> [N, h]), E experts, top-k routing:

    z_t   = x_t W_r^T                              router logits [N, E], fp32
    p_t   = softmax(z_t)                            router probabilities
    e_t,j = the j-th largest p_t,e  (j = 1 .. k)    chosen experts
    g_t,j = p_t,e_t,j / sum_j p_t,e_t,j             k > 1 (Mixtral, GShard); k = 1: g = p_t,e_t,1 (Switch)
    y_t   = sum_j g_t,j Expert_e_t,j(x_t)           Expert_e = the model's MLP (GELU or SwiGLU) with
                                                    its own weights, no biases

Capacity (`moe_capacity_factor` c): expert e takes at most C = ceil(c N k / E) assignments, first
choices before second choices, in token order within a choice; the others are dropped (that
term of y_t is zero, the residual carries x_t). None = dropless (every assignment computed).

Auxiliary losses, added to the training loss with weights `moe_aux_loss_coeff` / `moe_z_loss_coeff`:

    L_aux = E sum_e f_e P_e     f_e = share of the N k assignments routed to e (before dropping),
                                P_e = mean_t p_t,e           (Switch / GShard load balancing; 1 when
                                                             routing is uniform)
    L_z   = mean_t (logsumexp_e z_t,e)^2                     (ST-MoE router z-loss)

They reach the gradient through the layer's output (`AttachAuxLoss`, Megatron's
MoEAuxLossAutoScaler): the forward returns y unchanged, the backward hands the aux loss the
gradient `aux_loss_scale` (the step sets it to 1 / micro-batches, the factor each micro-batch's
loss gets). So the aux losses train the router on every pipeline stage, not only where the LM
loss is computed. Their values are accumulated per layer for logging: `moe_metrics(model)`.

Weights: `router.weight` [E, h]; `experts.fc_weight` [E, n_in, h] (SwiGLU: fused [gate | up],
n_in = 2f, as HF Mixtral's gate_up_proj), `experts.proj_weight` [E, h, f] (HF's down_proj).

Nothing here knows about parallelism: megatiny/parallel/experts.py swaps in a subclass that moves
the tokens to experts on other ranks (all-to-all) and splits each expert over tensor parallelism.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from megatiny.config import ModelConfig
from megatiny.split_backward import grouped_linear

# Accumulated statistics per layer (on the layer's device; read and reset by moe_metrics).
STATS = ("aux_loss", "z_loss", "dropped", "assignments", "calls")


class AttachAuxLoss(torch.autograd.Function):
    """y -> y; backward: dy for y and `scale` for `aux` (so aux joins the loss being minimized)."""

    @staticmethod
    def forward(ctx, y, aux, scale: float):
        ctx.scale = scale
        ctx.aux_meta = (aux.dtype, aux.device)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy):
        dtype, device = ctx.aux_meta
        return dy, torch.full((), ctx.scale, dtype=dtype, device=device), None


class Router(nn.Module):
    """z = x W_r^T in fp32 (the softmax and top-k are precision-sensitive)."""

    def __init__(self, d_model: int, num_experts: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, d_model).normal_(0.0, 0.02))

    def forward(self, x):
        return F.linear(x.float(), self.weight.float())


class Experts(nn.Module):
    """E MLPs stored as stacked weights; `forward(x, counts)` runs expert e on rows
    [sum(counts[:e]), sum(counts[:e+1])) of x (tokens sorted by expert).

    After parallelize the module holds this rank's experts and, under tensor parallelism, its
    slice of each (fc rows [gate_r | up_r], proj columns): the same code computes its share."""

    def __init__(self, config: ModelConfig, num_experts: int | None = None):
        super().__init__()
        E = config.moe_experts if num_experts is None else num_experts
        self.swiglu = config.activation == "swiglu"
        f, h = config.ffn_hidden, config.d_model
        # A standalone layer gets N(0, 0.02); inside a GPT, GPT.init_weights sets every weight.
        self.fc_weight = nn.Parameter(
            torch.empty(E, 2 * f if self.swiglu else f, h).normal_(0, 0.02)
        )
        self.proj_weight = nn.Parameter(torch.empty(E, h, f).normal_(0.0, 0.02))

    @property
    def num_experts(self) -> int:
        return self.fc_weight.shape[0]

    def forward(self, x, counts: list[int]):
        h = grouped_linear(x, self.fc_weight, counts)  # split backward: dW deferred to W
        if self.swiglu:
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh")
        return grouped_linear(h, self.proj_weight, counts)


def route(logits: torch.Tensor, top_k: int):
    """(probs [N, E], gates [N, k], experts [N, k]) from router logits (see the module doc)."""
    probs = logits.softmax(dim=-1)
    top, experts = probs.topk(top_k, dim=-1)
    gates = top / top.sum(dim=-1, keepdim=True) if top_k > 1 else top
    return probs, gates, experts


def capacity_keep(experts: torch.Tensor, num_experts: int, capacity: int | None):
    """[N, k] bool: which assignments fit their expert's capacity (all of them when None).
    Priority: every token's first choice, then every second choice, ..., in token order."""
    if capacity is None:
        return torch.ones_like(experts, dtype=torch.bool)
    slot_major = experts.t().reshape(-1)  # [k N]: choice j of token t at j N + t
    one_hot = F.one_hot(slot_major, num_experts)
    position = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1  # rank within its expert
    return (position < capacity).view(experts.shape[1], -1).t()


def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """E sum_e f_e P_e (Switch / GShard); f from the assignments before capacity dropping."""
    E = probs.shape[-1]
    counts = torch.bincount(experts.reshape(-1), minlength=E).to(probs.dtype)
    return E * (counts / experts.numel() * probs.mean(dim=0)).sum()


def z_loss(logits: torch.Tensor) -> torch.Tensor:
    return torch.logsumexp(logits, dim=-1).pow(2).mean()


class MoE(nn.Module):
    """The mixture-of-experts MLP (module doc). `forward(x)` [..., h] -> [..., h]."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.num_experts, self.top_k = config.moe_experts, config.moe_top_k
        self.capacity_factor = config.moe_capacity_factor
        self.aux_loss_coeff, self.z_loss_coeff = config.moe_aux_loss_coeff, config.moe_z_loss_coeff
        self.router = Router(config.d_model, config.moe_experts)
        self.experts = Experts(config)
        self.dropout = nn.Dropout(config.dropout)
        self.aux_loss_scale = 1.0
        self.stats: torch.Tensor | None = None  # STATS summed since the last moe_metrics

    def capacity(self, num_tokens: int) -> int | None:
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x):
        shape = x.shape
        h = x.reshape(-1, shape[-1])
        y = self.mix(h, h)
        return self.dropout(y.view(shape))

    def mix(self, router_in: torch.Tensor, expert_in: torch.Tensor) -> torch.Tensor:
        """sum_j g_j Expert_e_j(x) for tokens [N, h]; the router reads `router_in`, the experts
        `expert_in` (the same values; two tensors so a parallel subclass can route their
        gradients differently)."""
        N, k, E = expert_in.shape[0], self.top_k, self.num_experts
        logits = self.router(router_in)
        probs, gates, experts = route(logits, k)
        keep = capacity_keep(experts, E, self.capacity(N))
        aux = self._aux_loss(logits, probs, experts, keep)
        flat = experts.reshape(-1).masked_fill(~keep.reshape(-1), E)  # dropped: past the end
        kept = flat.numel() if self.capacity_factor is None else int(keep.sum())
        order = flat.argsort(stable=True)[:kept]  # assignments sorted by expert
        counts = torch.bincount(flat, minlength=E + 1)[:E]
        token = order // k
        out = self.run_experts(expert_in[token], counts)
        weights = self.combine_weights(gates).reshape(-1)[order, None].to(out.dtype)
        y = out.new_zeros(N, out.shape[-1]).index_add(0, token, out * weights)
        if aux is not None:
            y = AttachAuxLoss.apply(y, aux, self.aux_loss_scale)
        return y.to(expert_in.dtype)

    def run_experts(self, x_sorted: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """The experts on tokens sorted by expert (`counts[e]` rows for expert e)."""
        return self.experts(x_sorted, counts.tolist())

    def combine_weights(self, gates: torch.Tensor) -> torch.Tensor:
        return gates

    def _aux_loss(self, logits, probs, experts, keep):
        if not (self.training and torch.is_grad_enabled()):
            return None
        balance, zl = load_balancing_loss(probs, experts), z_loss(logits)
        with torch.no_grad():
            if self.stats is None or self.stats.device != logits.device:
                self.stats = torch.zeros(len(STATS), device=logits.device)
            dropped = (~keep).sum().float()
            self.stats += torch.stack([balance.detach(), zl.detach(), dropped,
                                       torch.full_like(dropped, keep.numel()),
                                       torch.ones_like(dropped)])  # fmt: skip
        return self.aux_loss_coeff * balance + self.z_loss_coeff * zl


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def set_aux_loss_scale(model: nn.Module, scale: float) -> None:
    """The gradient each MoE layer's aux loss receives (1 / micro-batches per step)."""
    for layer in moe_layers(model):
        layer.aux_loss_scale = scale


def moe_stat_totals(model: nn.Module) -> torch.Tensor | None:
    """The summed STATS of this rank's MoE layers since the last call, then reset (None before
    any training forward). One tensor on the device: no host sync."""
    stats = [layer.stats for layer in moe_layers(model) if layer.stats is not None]
    if not stats:
        return None
    total = torch.stack(stats).sum(dim=0)
    for t in stats:
        t.zero_()
    return total


def metrics_from_totals(total: torch.Tensor) -> dict[str, float]:
    """{moe_aux_loss, moe_z_loss (means per layer call), moe_dropped_fraction}."""
    aux, zl, dropped, assignments, calls = total.tolist()
    if not calls:
        return {}
    return {"moe_aux_loss": aux / calls, "moe_z_loss": zl / calls,
            "moe_dropped_fraction": dropped / max(assignments, 1.0)}  # fmt: skip


def moe_metrics(model: nn.Module) -> dict[str, float]:
    """This rank's MoE statistics since the last call (empty for a dense model); for a parallel
    run, `megatiny.parallel.experts.reduce_moe_metrics(model, ctx)` averages over all ranks."""
    total = moe_stat_totals(model)
    return {} if total is None else metrics_from_totals(total)
