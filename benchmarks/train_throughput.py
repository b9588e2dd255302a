"""Training throughput of megatiny against a nanoGPT-style reference of the same size, same run.

    .venv/bin/python benchmarks/train_throughput.py                       # the demo config
    .venv/bin/python benchmarks/train_throughput.py --config launch/configs/gpt2-124m.yaml \
        train.micro_batch_size=4 --steps 5                                # any config + overrides

Measures tokens/s of full optimizer steps (forward, backward over the micro-batches of the
global batch, gradient clipping, AdamW) on synthetic token batches:
  * reference  benchmarks/nanogpt_ref.py, a plain single-file GPT-2 loop (1 process)
  * megatiny   `Trainer.train_step` of megatiny.training.loop at tp=1 (1 process)
  * megatiny   tp=2 on 2 gloo ranks (2 processes; tokens/s of the whole job)
Single-process runs use --threads intra-op threads (default 1, as each rank of the tp=2 run).
Reference and megatiny tp=1 alternate for --repeats rounds; the table shows the median, and the
ratio megatiny / reference (goal >= 1.0 at tp=1).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from nanogpt_ref import RefConfig, RefGPT  # noqa: E402

from megatiny.config import Config  # noqa: E402


class SyntheticTokens:
    """ds[i] -> a causal-LM sample of random tokens (input_ids, labels, loss_mask)."""

    def __init__(self, vocab: int, seq: int, size: int = 256, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(0, vocab, (size, seq + 1), generator=g)
        self.seq = seq

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, i):
        t = self.tokens[i]
        return {"input_ids": t[:-1], "labels": t[1:], "loss_mask": torch.ones(self.seq)}


def load_config(path: str, overrides: list[str], vocab: int) -> Config:
    extra = [f"model.vocab_size={vocab}"] if _has_auto_vocab(path, overrides) else []
    cfg = Config.from_yaml(path, [*extra, *overrides])
    cfg.train.progress_bar = False
    return cfg


def _has_auto_vocab(path: str, overrides: list[str]) -> bool:
    import yaml

    with open(path) as f:
        raw = yaml.safe_load(f)
    explicit = any(o.startswith("model.vocab_size=") for o in overrides)
    return raw.get("model", {}).get("vocab_size") == "auto" and not explicit


def _init_single(port: int) -> None:
    if not dist.is_initialized():
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def timed_tokens_per_second(trainer, steps: int, warmup: int, after_step=None) -> float:
    """Tokens/s of the whole job over `steps` optimizer steps of `trainer`, after `warmup` steps
    and a barrier (when distributed); `after_step(trainer)` runs after each timed step."""
    for _ in range(warmup):
        trainer.train_step()
    if dist.is_initialized():
        dist.barrier()
    t0 = time.perf_counter()
    for _ in range(steps):
        trainer.train_step()
        if after_step is not None:
            after_step(trainer)
    elapsed = time.perf_counter() - t0
    cfg = trainer.cfg
    return (
        steps * cfg.train.global_batch_size_for(trainer.ctx.dp_size) * cfg.data.seq_length / elapsed
    )


def megatiny_tokens_per_second(cfg: Config, tp: int, steps: int, warmup: int) -> float:
    """Run on an initialized default group of tp ranks; returns tokens/s of the whole job."""
    from megatiny.parallel import ParallelContext
    from megatiny.training.optim import build_optimizer, build_scheduler
    from megatiny.training.step import Trainer, build_model

    ctx = ParallelContext.initialize(tp=tp)
    try:
        model = build_model(cfg, ctx)
        optimizer = build_optimizer(model, cfg.train)
        scheduler = build_scheduler(optimizer, cfg.train)
        data = SyntheticTokens(cfg.model.vocab_size, cfg.data.seq_length)
        acc = cfg.train.accumulation_steps(ctx.dp_size)
        trainer = Trainer(cfg, ctx, model, optimizer, scheduler, data, data, accumulation=acc)
        return timed_tokens_per_second(trainer, steps, warmup)
    finally:
        ctx.destroy()


def reference_tokens_per_second(cfg: Config, steps: int, warmup: int) -> float:
    m, t = cfg.model, cfg.train
    if (m.norm, m.activation, m.position, m.tie_embeddings) != (
        "layernorm",
        "gelu",
        "learned",
        True,
    ):
        raise SystemExit(
            "the nanoGPT reference is GPT-2 style: use a layernorm/gelu/learned/tied config"
        )
    torch.manual_seed(t.seed)
    ref = RefGPT(RefConfig(m.vocab_size, m.max_seq_len, m.n_layers, m.n_heads, m.d_model, m.bias))
    opt = ref.configure_optimizer(t.weight_decay, t.lr, (t.beta1, t.beta2))
    data = SyntheticTokens(m.vocab_size, cfg.data.seq_length)
    micro, acc = t.micro_batch_size, t.accumulation_steps(1)
    consumed = 0

    def step():
        nonlocal consumed
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for _ in range(acc):
            batch = [data[(consumed + i) % len(data)] for i in range(micro)]
            consumed += micro
            ids = torch.stack([b["input_ids"] for b in batch])
            labels = torch.stack([b["labels"] for b in batch])
            loss = ref(ids, labels)
            (loss / acc).backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(ref.parameters(), t.grad_clip)
        opt.step()
        return total / acc

    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * t.global_batch_size_for(1) * cfg.data.seq_length / (time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_worker(rank, world, port, cfg, steps, warmup, queue):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)  # fmt: skip
    try:
        value = megatiny_tokens_per_second(cfg, world, steps, warmup)
        if rank == 0:
            queue.put(value)
    finally:
        dist.destroy_process_group()


def tp_job_tokens_per_second(cfg: Config, tp: int, steps: int, warmup: int) -> float:
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_worker, args=(r, tp, port, cfg, steps, warmup, queue))
             for r in range(tp)]  # fmt: skip
    for p in procs:
        p.start()
    value = queue.get(timeout=1800)
    for p in procs:
        p.join()
    return value


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--config", default="launch/configs/tiny-cpu.yaml")
    ap.add_argument("--vocab-size", type=int, default=4096, help="when the config says auto")
    ap.add_argument("--steps", type=int, default=10, help="timed optimizer steps per round")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-tp2", action="store_true", help="skip the 2-rank tp=2 run")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value")
    args = ap.parse_args(argv)

    cfg = load_config(args.config, args.overrides, args.vocab_size)
    cfg.parallel.tp = 1
    cfg.parallel.sequence_parallel = False
    torch.set_num_threads(args.threads)
    m = cfg.model
    print(f"model: d_model={m.d_model} n_layers={m.n_layers} n_heads={m.n_heads} "
          f"vocab={m.vocab_size} params={m.num_parameters() / 1e6:.2f}M | seq={cfg.data.seq_length} "
          f"micro={cfg.train.micro_batch_size} global={cfg.train.global_batch_size_for(1)} "
          f"| threads={args.threads} | torch {torch.__version__}")  # fmt: skip
    _init_single(_free_port())
    ref, mt = [], []
    for _ in range(args.repeats):
        ref.append(reference_tokens_per_second(cfg, args.steps, args.warmup))
        mt.append(megatiny_tokens_per_second(cfg, 1, args.steps, args.warmup))
    dist.destroy_process_group()
    ref_tps, mt_tps = statistics.median(ref), statistics.median(mt)
    rows = [("nanoGPT-style reference", 1, ref_tps), ("megatiny tp=1", 1, mt_tps)]
    if not args.no_tp2:
        cfg.parallel.tp = 2
        rows.append(
            (
                "megatiny tp=2 (2 gloo ranks)",
                2,
                tp_job_tokens_per_second(cfg, 2, args.steps, args.warmup),
            )
        )
    print(f"\n{'run':<30} {'procs':>5} {'tokens/s':>12} {'vs reference':>13}")
    for name, procs, tps in rows:
        print(f"{name:<30} {procs:>5} {tps:>12,.0f} {tps / ref_tps:>12.2f}x")
    print(
        f"\nrounds (tokens/s): reference {[round(x) for x in ref]}, megatiny tp=1 {[round(x) for x in mt]}"
    )
    print(f"ratio megatiny tp=1 / reference = {mt_tps / ref_tps:.2f} (goal >= 1.0)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
