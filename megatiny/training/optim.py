"""AdamW with Megatron-style parameter groups and a warmup + cosine learning-rate schedule.

Parameter groups: weight decay applies to matrices (linear weights). Norm weights, biases and
embeddings (token and position) get no decay, as in Megatron and nanoGPT, unless
`decay_norms_and_biases` / `decay_embeddings` ask for it. A tied LM head *is* the token embedding,
so it follows the embedding rule.

Schedule (step s counts optimizer steps from 0):

    lr(s) = max_lr * (s + 1) / warmup                                   s <  warmup
    lr(s) = min_lr + (max_lr - min_lr) * (1 + cos(pi * p)) / 2          warmup <= s < decay_steps
            with p = (s - warmup) / (decay_steps - warmup)
    lr(s) = min_lr                                                      s >= decay_steps
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from megatiny.parallel import collectives
from megatiny.parallel.sharding import sharded_parameter_ids


def _is_embedding(module: nn.Module) -> bool:
    # Covers nn.Embedding and VocabParallelEmbedding without importing the parallel package.
    return isinstance(module, nn.Embedding) or "Embedding" in type(module).__name__


def param_groups(
    model: nn.Module,
    weight_decay: float,
    decay_norms_and_biases: bool = False,
    decay_embeddings: bool = False,
) -> list[dict]:
    """Split trainable parameters into a decayed and a non-decayed group (each parameter once)."""
    embedding_ids = set()
    for module in model.modules():
        if _is_embedding(module):
            embedding_ids.update(id(p) for p in module.parameters(recurse=False))
    decay, no_decay, seen = [], [], set()
    for _, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if id(p) in embedding_ids:
            (decay if decay_embeddings else no_decay).append(p)
        elif p.ndim < 2:  # norm weights and biases
            (decay if decay_norms_and_biases else no_decay).append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, train_config, zero1_ddp=None, overlap_param_gather=False):
    """AdamW over `param_groups(model, ...)` with the hyper-parameters of a TrainConfig; with
    `zero1_ddp` (the model's DistributedDataParallel wrapper) a ZeRO-1 optimizer that shards
    AdamW's state over the DP group (`overlap_param_gather`: see ZeroOptimizer)."""
    tc = train_config
    groups = param_groups(model, tc.weight_decay, tc.decay_norms_and_biases, tc.decay_embeddings)
    # foreach keeps the update a handful of kernels; fused AdamW is CUDA-only.
    kwargs = {"lr": tc.lr, "betas": (tc.beta1, tc.beta2), "eps": tc.adam_eps, "foreach": True}
    if zero1_ddp is not None:
        from megatiny.parallel.zero import ZeroOptimizer

        return ZeroOptimizer(zero1_ddp, groups, overlap_param_gather=overlap_param_gather,
                             **kwargs)  # fmt: skip
    if any(p.dtype != torch.float32 for g in groups for p in g["params"]):
        return MixedPrecisionAdamW(groups, **kwargs)
    return torch.optim.AdamW(groups, **kwargs)


def grad_of(p: torch.Tensor) -> torch.Tensor | None:
    """A parameter's gradient: its fp32 `main_grad` when it has one (bf16 parameters under
    DistributedDataParallel), else `.grad`."""
    main = getattr(p, "main_grad", None)
    return main if main is not None else p.grad


class MixedPrecisionAdamW:
    """AdamW on fp32 main copies of low-precision (bf16) parameters — Megatron's
    Float16OptimizerWithFloat16Params. The gradients are the fp32 `main_grad`s that
    DistributedDataParallel accumulates and reduces; after the update each main parameter is
    rounded back into its model parameter. `state[p]` (model parameter p) is the AdamW state of
    its main copy, with the main copy itself under "main_param", so checkpoints save and load the
    fp32 weights too (`state_keys`) and a resumed run continues exactly."""

    state_keys = ("exp_avg", "exp_avg_sq", "main_param")

    def __init__(self, groups, **kwargs):
        self.main_of, main_groups = {}, []
        for group in groups:
            mains = []
            for p in group["params"]:
                main = nn.Parameter(p.detach().float().clone())
                self.main_of[id(p)] = (p, main)
                mains.append(main)
            main_groups.append({**group, "params": mains})
        self.optimizer = torch.optim.AdamW(main_groups, **kwargs)
        self.state = _MainState(self)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, main in self.main_of.values():
            grad = grad_of(p)
            main.grad = None if grad is None else grad.float()
        self.optimizer.step()
        for p, main in self.main_of.values():
            p.copy_(main)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p, main in self.main_of.values():
            main.grad = None
            if set_to_none:
                p.grad = None


class _MainState:
    """`optimizer.state[model_param]` -> the state of its fp32 main copy (+ "main_param")."""

    def __init__(self, opt: MixedPrecisionAdamW):
        self.opt = opt

    def __getitem__(self, p) -> _MainView:
        _, main = self.opt.main_of[id(p)]
        return _MainView(self.opt.optimizer.state[main], main)

    def __contains__(self, p) -> bool:
        return id(p) in self.opt.main_of

    def values(self):
        return [self[p] for p, _ in self.opt.main_of.values()]


class _MainView(dict):
    """AdamW's state dict of a main parameter, with "main_param" readable (not stored in it, so
    AdamW still sees empty state before its first step)."""

    def __init__(self, state: dict, main: torch.Tensor):
        super().__init__()
        self.inner, self.main = state, main

    def __getitem__(self, key):
        return self.main.data if key == "main_param" else self.inner[key]

    def __setitem__(self, key, value):
        self.inner[key] = value

    def __len__(self) -> int:
        return len(self.inner)

    def __contains__(self, key) -> bool:
        return key == "main_param" or key in self.inner

    def __iter__(self):
        return iter(self.inner)


class WarmupCosine:
    """Sets `lr` of every param group of `optimizer` from the optimizer step count (see module doc).

    `step()` advances one optimizer step. The state is just the step count, so it round-trips
    through a checkpoint as a plain dict.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_lr: float,
        min_lr: float,
        warmup_steps: int,
        decay_steps: int,
    ):
        if min_lr > max_lr:
            raise ValueError(f"min_lr={min_lr} is larger than lr={max_lr}; set train.min_lr <= lr")
        self.optimizer = optimizer
        self.max_lr, self.min_lr = max_lr, min_lr
        self.warmup_steps, self.decay_steps = warmup_steps, max(decay_steps, warmup_steps)
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.max_lr * (step + 1) / self.warmup_steps
        if step >= self.decay_steps or self.decay_steps == self.warmup_steps:
            return self.min_lr
        progress = (step - self.warmup_steps) / (self.decay_steps - self.warmup_steps)
        return self.min_lr + (self.max_lr - self.min_lr) * 0.5 * (
            1.0 + math.cos(math.pi * progress)
        )

    @property
    def lr(self) -> float:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step}

    def load_state_dict(self, state: dict) -> None:
        self.last_step = int(state["last_step"])
        self._apply()


def build_scheduler(optimizer: torch.optim.Optimizer, train_config) -> WarmupCosine:
    tc = train_config
    decay = tc.lr_decay_steps if tc.lr_decay_steps is not None else tc.steps
    return WarmupCosine(optimizer, tc.lr, tc.min_lr, tc.warmup_steps, decay)


def unique_parameters(params: Iterable[torch.nn.Parameter]) -> list[torch.nn.Parameter]:
    """Parameters in order, each once (a tied weight appears under two names)."""
    seen, out = set(), []
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            out.append(p)
    return out


@torch.no_grad()
def global_grad_norm(
    model: nn.Module, ctx=None, skip_parameter_ids: set[int] | None = None
) -> torch.Tensor:
    """The L2 norm of the gradient of the *whole* model, identical on every rank.

        ||g||^2 = sum over TP-split params of sum over TP ranks of ||g_shard||^2
                + sum over replicated params of ||g||^2 (counted once: on tp_rank 0 only)

    (split or replicated as each parameter's module declares: megatiny/parallel/sharding.py),
    summed over the model-parallel group (TP x CP x PP), which holds every parameter exactly once
    per model replica. CP ranks hold identical (already reduced) gradients, so only cp_rank 0
    contributes. `skip_parameter_ids` drops parameters that another stage owns (a tied embedding
    held on both the first and the last pipeline stage). Gradients are assumed already averaged
    over DP, so the norm is the same on every DP replica.
    """
    import torch.distributed as dist

    params = unique_parameters(p for p in model.parameters() if grad_of(p) is not None)
    skip = skip_parameter_ids or set()
    distributed = ctx is not None and dist.is_initialized()
    sharded = sharded_parameter_ids(model, "tp") if distributed and ctx.tp_size > 1 else set()
    tp_rank = ctx.tp_rank if distributed else 0
    cp_rank = getattr(ctx, "cp_rank", 0) if distributed else 0
    # The context's device even when this rank holds no gradient: the total enters a collective.
    device = grad_of(params[0]).device if params else (ctx.device if distributed else "cpu")
    total = torch.zeros((), dtype=torch.float32, device=device)
    counted = [
        p
        for p in params
        if id(p) not in skip and cp_rank == 0 and (id(p) in sharded or tp_rank == 0)
    ]
    # Experts split over ep live on the other ranks of my ep group (dp ranks): summed over it.
    experts = (
        sharded_parameter_ids(model, "ep")
        if distributed and getattr(ctx, "ep_size", 1) > 1
        else set()
    )
    if experts:
        expert_total = total.clone()
        for p in counted:
            if id(p) in experts:
                expert_total += grad_of(p).detach().float().pow(2).sum()
        collectives.all_reduce(expert_total, ctx.ep_group)
        total = total + expert_total
    counted = [grad_of(p).detach() for p in counted if id(p) not in experts]
    if counted:
        norms = torch._foreach_norm(counted)  # one fused pass instead of a loop of reductions
        total = total + torch.stack(norms).float().pow(2).sum()
    if distributed and ctx.world_size > 1:
        collectives.all_reduce(total, ctx.mp_group)
    return total.sqrt()


@torch.no_grad()
def clip_grad_norm_(
    model: nn.Module, max_norm: float, ctx=None, skip_parameter_ids: set[int] | None = None
) -> torch.Tensor:
    """Scale all gradients by min(1, max_norm / (norm + 1e-6)); return the pre-clip global norm.

    Same semantics as `torch.nn.utils.clip_grad_norm_` on the single-device model.
    """
    norm = global_grad_norm(model, ctx, skip_parameter_ids)
    if max_norm > 0:
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        params = unique_parameters(model.parameters())
        grads = [grad_of(p) for p in params if grad_of(p) is not None]
        if grads:
            torch._foreach_mul_(grads, coef.to(grads[0].device))
    return norm
