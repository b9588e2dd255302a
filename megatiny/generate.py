"""Autoregressive sampling with a KV cache, single device or tensor-parallel.

    ids = generate(model, prompt_ids, max_new_tokens=50, temperature=0.8, top_k=50, top_p=0.95,
                   seed=0, eos_id=tok.eod_id)

Each step turns the last position's logits z into the next token:
    temperature == 0       argmax z (greedy)
    otherwise              sample from softmax(z / temperature) restricted to the top_k largest
                           logits and then to the smallest prefix of the sorted distribution whose
                           mass reaches top_p (nucleus); the most likely token always survives.

KV cache: the prompt is run once, then each new token attends to the cached keys/values of all
earlier positions (`use_cache=False` re-runs the whole sequence each step; same tokens).

Tensor parallelism: a parallelized model (without sequence parallelism: one new token cannot be
split over the sequence) returns the full gathered logits on every TP rank, and every rank
samples with the same seeded generator; the choice of TP rank 0 is then broadcast so all ranks
provably continue with the same tokens.

End of sequence: generation stops at any of `eos_id` (an id or a list: the tokenizer's
`stop_ids`, i.e. its configured eos and generation_config.json's eos ids), as transformers does.

CLI: `megatiny generate --checkpoint DIR --tokenizer TOKDIR --prompt "..."`; under
`torchrun --nproc-per-node N` the model is split over N tensor-parallel ranks. `--chat` wraps the
prompt in the tokenizer's chat template (a user turn + the assistant header, special tokens
encoded as such) and prints only the reply; `--interactive` (implies `--chat`) is a conversation
read from stdin, one line per turn, the history kept (rank 0 reads, the TP ranks receive it) and
trimmed to the model's context: the oldest turns go first (`fit_conversation`).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from megatiny.model import KVCache
from megatiny.parallel import collectives
from megatiny.parallel.parallelize import is_sequence_parallel, tp_group_of


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None):
    """Logits [b, V] with everything outside the top-k / nucleus set to -inf."""
    if top_k is not None and top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # Drop a token when the mass strictly before it already reaches top_p.
        drop_sorted = probs.cumsum(dim=-1) - probs >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_token(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """[b, V] logits -> [b] token ids (see module docstring)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits.float() / temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_args(temperature, top_k, top_p, max_new_tokens):
    if temperature < 0:
        raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy)")
    if top_k is not None and top_k < 0:
        raise ValueError(f"top_k={top_k} must be >= 0 (0 or None = no limit)")
    if top_p is not None and not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p={top_p} must be in (0, 1]")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")


@torch.no_grad()
def generate(
    model,
    prompt_ids,
    max_new_tokens: int = 50,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = 0,
    eos_id: int | Sequence[int] | None = None,
    use_cache: bool = True,
) -> torch.Tensor:
    """prompt [b, s] (or a list of ids) -> [b, s + n] with n <= max_new_tokens new tokens.
    Stops early once every row has produced an `eos_id` (one id or several; rows that finished
    keep emitting the first)."""
    _check_args(temperature, top_k, top_p, max_new_tokens)
    if is_sequence_parallel(model):
        raise ValueError(
            "generation needs a model parallelized with sequence_parallel=False (a single new "
            "token cannot be split over the sequence)"
        )
    device = next(model.parameters()).device
    ids = torch.as_tensor(prompt_ids, dtype=torch.long, device=device)
    ids = ids[None] if ids.dim() == 1 else ids
    if ids.shape[1] == 0:
        raise ValueError("the prompt is empty: give at least one token")
    lo, hi = int(ids.min()), int(ids.max())  # once per prompt, before any token is generated
    if lo < 0 or hi >= model.config.vocab_size:
        raise ValueError(
            f"prompt token id {hi if hi >= model.config.vocab_size else lo} is outside the "
            f"vocabulary 0..{model.config.vocab_size - 1}; was the prompt made with another "
            "tokenizer?"
        )
    limit = model.config.max_seq_len
    if ids.shape[1] + max_new_tokens > limit:
        raise ValueError(
            f"prompt ({ids.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) exceeds "
            f"max_seq_len={limit}; shorten the prompt or lower --max-new-tokens"
        )
    stops = None
    if eos_id is not None:
        stops = torch.as_tensor([eos_id] if isinstance(eos_id, int) else list(eos_id),
                                dtype=torch.long, device=device)  # fmt: skip
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)
    group = tp_group_of(model)
    src = dist.get_global_rank(group, 0) if group is not None else None
    was_training = model.training
    model.eval()
    cache = KVCache(len(model.blocks)) if use_cache else None
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    step_input = ids
    try:
        for _ in range(max_new_tokens):
            logits = model(step_input if use_cache else ids, kv_cache=cache)[:, -1]
            token = next_token(logits, temperature, top_k, top_p, generator)
            if group is not None and dist.get_world_size(group) > 1:
                collectives.broadcast(token, src, group)
            if stops is not None:
                token = token.masked_fill(finished, stops[0])
                finished |= torch.isin(token, stops)
            ids = torch.cat([ids, token[:, None]], dim=1)
            step_input = token[:, None]
            if stops is not None and bool(finished.all()):
                break
    finally:
        model.train(was_training)
    return ids


# --- CLI --------------------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = (
        "examples:\n  megatiny generate --checkpoint runs/tiny --tokenizer data/tok "
        '--prompt "Once upon a time" --max-new-tokens 40 --temperature 0.8 --top-k 50\n'
        "  megatiny generate --checkpoint smollm2 --chat --temperature 0 "
        '--prompt "What is the capital of France?"\n'
        "  megatiny generate --checkpoint smollm2 --interactive   (a conversation; empty line ends)\n"
        "  (tensor-parallel: torchrun --nproc-per-node 3 -m megatiny generate ...)"
    )
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--checkpoint", required=True,
        help="a model dir (model.safetensors + model_config.json) or a training run / checkpoint",
    )  # fmt: skip
    parser.add_argument("--tokenizer", help="tokenizer dir or tokenizer.json (default: the "
                        "--checkpoint dir when it holds a tokenizer, as `convert` writes)")  # fmt: skip
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="text to continue (needs a tokenizer); with --chat the "
                        "user's message")  # fmt: skip
    prompt.add_argument("--prompt-ids", help="comma-separated token ids (no tokenizer needed)")
    prompt.add_argument("--interactive", action="store_true",
                        help="a chat read from stdin, one message per line (implies --chat)")  # fmt: skip
    parser.add_argument("--chat", action="store_true", help="wrap --prompt in the tokenizer's "
                        "chat template and print only the reply")  # fmt: skip
    parser.add_argument("--system", help="--chat: a system message")
    parser.add_argument("--eos-token", help="end-of-sequence token spelling (overrides the "
                        "tokenizer's configuration), e.g. '<|im_end|>'")  # fmt: skip
    parser.add_argument("--max-new-tokens", type=int, default=50)
    parser.add_argument("--temperature", type=float, default=1.0, help="0 = greedy")
    parser.add_argument("--top-k", type=int, default=None)
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="recompute without a KV cache")
    parser.add_argument("--ignore-eos", action="store_true", help="do not stop at end-of-text")
    parser.add_argument("--device", default="auto",
                        help="auto (cuda when there is a GPU, else cpu), cpu, cuda or cuda:N; "
                        "under torchrun each rank uses its context's device")  # fmt: skip


def _has_tokenizer(directory: str) -> bool:
    from megatiny.data.tokenizer import TOKENIZER_FILES

    return os.path.isdir(directory) and any(
        os.path.isfile(os.path.join(directory, n)) for n in TOKENIZER_FILES
    )


def main(args) -> int:
    from megatiny.hf import load_any

    for flag, path in (("--checkpoint", args.checkpoint), ("--tokenizer", args.tokenizer)):
        if path and not os.path.exists(path):
            raise SystemExit(f"{flag} {path} does not exist; give a run directory, model "
                             "directory or checkpoint" if flag == "--checkpoint" else
                             f"{flag} {path} does not exist; give the tokenizer directory")  # fmt: skip
    args.chat = args.chat or args.interactive
    if args.chat and args.prompt_ids is not None:
        raise SystemExit("--chat takes --prompt (the user's message), not --prompt-ids")
    tokenizer = None
    tok_path = args.tokenizer
    if tok_path is None and args.prompt_ids is None and _has_tokenizer(args.checkpoint):
        tok_path = args.checkpoint  # text prompts: the tokenizer `convert` / `finetune` put there
    if tok_path:
        from megatiny.data.tokenizer import load_tokenizer

        try:
            tokenizer = load_tokenizer(tok_path, eos_token=args.eos_token)
        except (FileNotFoundError, ValueError) as e:
            raise SystemExit(f"--tokenizer: {e}") from None
    if tokenizer is None and (args.prompt is not None or args.chat):
        raise SystemExit(
            "--prompt needs --tokenizer TOKDIR (or a --checkpoint directory holding "
            "the tokenizer, as `convert` writes; or pass --prompt-ids 1,2,3)"
        )
    if args.chat and not tokenizer.chat_template:
        raise SystemExit(f"--chat: the tokenizer {tok_path} has no chat template "
                         "(tokenizer_config.json / chat_template.jinja); drop --chat")  # fmt: skip
    _check_args(args.temperature, args.top_k, args.top_p, args.max_new_tokens)
    ctx = None
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:  # under torchrun: all ranks form one tensor-parallel group
        from megatiny.parallel import ParallelContext
        from megatiny.parallel.parallelize import parallelize

        ctx = ParallelContext.from_env(tp=world)
    model = load_any(args.checkpoint).eval()
    if ctx is not None:
        model = parallelize(model, ctx)
    else:
        try:
            model = model.to(resolve_device(args.device))
        except ValueError as e:
            raise SystemExit(f"megatiny generate: error: {e}") from None
    rank0 = ctx is None or ctx.rank == 0
    eos = None if args.ignore_eos or tokenizer is None else tokenizer.stop_ids

    def run(prompt: list[int]) -> list[int]:
        return generate(
            model, prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
            top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_id=eos,
            use_cache=not args.no_cache,
        )[0].tolist()  # fmt: skip

    try:
        if args.chat:
            _chat(run, tokenizer, args, ctx, rank0, model.config.max_seq_len)
        else:
            if args.prompt is not None:
                prompt = tokenizer.encode(args.prompt, special=True)
            else:
                prompt = _parse_ids(args.prompt_ids)
            out = run(prompt)
            if rank0:
                print(tokenizer.decode(out) if tokenizer is not None
                      else ",".join(str(i) for i in out))  # fmt: skip
    except ValueError as e:  # bad prompt or arguments: one line, not a traceback
        print(f"megatiny generate: error: {e}", file=sys.stderr)
        return 2
    finally:
        if ctx is not None:
            ctx.destroy()
    return 0


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is cuda when torch sees a GPU, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: torch sees no CUDA GPU here; use --device cpu")
    return device


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        bad = next(x for x in text.split(",") if x.strip() and not x.strip().lstrip("-").isdigit())
        raise ValueError(
            f"--prompt-ids takes comma-separated integers, got {bad.strip()!r}"
        ) from None


def _chat(run, tokenizer, args, ctx, rank0: bool, context: int) -> None:
    """One reply to --prompt, or a conversation read line by line from stdin on rank 0. The
    prompt of each turn is the history that fits in `context` tokens with --max-new-tokens."""
    messages = [{"role": "system", "content": args.system}] if args.system else []
    interactive = args.interactive
    if interactive and rank0:
        print("chat: one message per line; an empty line or end of input ends", file=sys.stderr)
    while True:
        text = args.prompt
        if interactive:
            text = _read_line(ctx, rank0)
            if not text:
                return
        messages.append({"role": "user", "content": text})
        try:
            prompt, dropped = fit_conversation(messages, tokenizer, context, args.max_new_tokens)
        except ValueError as e:
            if not interactive:
                raise
            messages.pop()  # the conversation goes on without this message
            if rank0:
                print(f"megatiny generate: {e}", file=sys.stderr, flush=True)
            continue
        if dropped and rank0:
            turns = f"{dropped} oldest turns" if dropped > 1 else "oldest turn"
            print(f"(dropped the {turns} of the conversation to fit the model's {context}-token "
                  "context)", file=sys.stderr)  # fmt: skip
        out = run(prompt)
        reply_ids = [t for t in out[len(prompt) :] if t not in tokenizer.stop_ids]
        reply = tokenizer.decode(reply_ids, skip_special=True)
        if rank0:
            print(reply, flush=True)
        if not interactive:
            return
        messages.append({"role": "assistant", "content": reply})


def fit_conversation(messages: list[dict], tokenizer, context: int,
                     max_new_tokens: int) -> tuple[list[int], int]:  # fmt: skip
    """The chat prompt of `messages` (+ the assistant header) with room for `max_new_tokens` in
    `context` tokens: the oldest turns (a user message and the replies to it) are dropped from
    `messages` in place; a leading system message and the last message always stay. Returns
    (prompt ids, turns dropped). ValueError, `messages` untouched, when the system message and
    the last message alone do not fit."""

    def ids(msgs):
        return tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True)

    budget = context - max_new_tokens
    prompt = ids(messages)
    if len(prompt) <= budget:
        return prompt, 0
    start = 1 if messages and messages[0]["role"] == "system" else 0
    alone = len(ids(messages[:start] + messages[-1:]))
    if alone > budget:
        system = " and the system message" if start else ""
        raise ValueError(
            f"this message does not fit: with the chat template{system} it takes {alone} "
            f"tokens, and with --max-new-tokens {max_new_tokens} that exceeds the model's "
            f"context of {context} tokens (max_seq_len); shorten it or lower --max-new-tokens"
        )
    dropped = 0
    while len(prompt) > budget:
        del messages[start]  # the oldest user message, then the replies up to the next one
        while len(messages) - start > 1 and messages[start]["role"] != "user":
            del messages[start]
        dropped += 1
        prompt = ids(messages)
    return prompt, dropped


def _read_line(ctx, rank0: bool) -> str:
    """The next user line (rank 0 reads stdin; other TP ranks receive it)."""
    line = ""
    if rank0:
        print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline().strip()
    if ctx is None or ctx.world_size == 1:
        return line
    from megatiny.parallel import collectives

    data = torch.tensor(list(line.encode("utf-8")), dtype=torch.uint8, device=ctx.device)
    size = torch.tensor([data.numel()], dtype=torch.long, device=ctx.device)
    collectives.broadcast(size, 0, ctx.tp_group)
    if not rank0:
        data = torch.empty(int(size), dtype=torch.uint8, device=ctx.device)
    if int(size):
        collectives.broadcast(data, 0, ctx.tp_group)
    return bytes(data.cpu().tolist()).decode("utf-8")
