"""Train terse's reference model: a small Llama on the synthetic doc-QA world, within a time budget.

    PYTHONPATH=. python3 bench/train_reference.py --out DIR --train-seconds 420

Data is generated on CPU worker processes while the GPU trains (train-split worlds only); the loss is
on assistant tokens (plain-text examples: all tokens), averaged per example. The learning rate follows
a warmup then a cosine decay over the wall-clock budget, so the schedule ends when the time does. At
the end: greedy exact match on the validation split, then model + tokenizer + model card are saved.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import multiprocessing as mp
import os
import random
import sys
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
import torch.nn.functional as F

from bench.refmodel_data import (
    ANSWER_WEIGHT,
    LM_WEIGHT,
    Tokenized,
    _init_worker,
    batches,
    build_tokenizer,
    copy_example,
    tokenize_example,
    tokenized_world,
)
from bench.refmodel_eval import evaluate
from terse.synth.dataset import SplitConfig, build_split
from terse.synth.examples import world_examples

SIZES: dict[str, dict[str, Any]] = {
    # ~7.6M parameters, 14.5 MiB in bf16 (tied embeddings); head_dim 64 suits attention kernels.
    "reference": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=2, head_dim=64),
    # ~3.7M parameters: what two CPU cores can train in tens of minutes.
    "small": dict(hidden_size=256, intermediate_size=640, num_hidden_layers=4, num_attention_heads=8,
                  num_key_value_heads=2, head_dim=32),
    # ~1.3M parameters: the CPU fallback when no GPU time is left.
    "cpu": dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, head_dim=32),
    # For a CPU check of the whole script in seconds.
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16),
}


def build_model(size: str, tok: Any) -> Any:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tok),
        max_position_embeddings=32768,
        rope_theta=500000.0,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        **SIZES[size],
    )
    return LlamaForCausalLM(config)


class Curriculum:
    """What each new world's examples look like at the current point of training.

    The doc-QA context cap grows log-linearly from `start_tokens` to `end_tokens` over the first
    `fraction` of the time budget; recall and copy examples are added per world throughout. Short
    contexts first give many answers per batch (the lookup is learned on them), long ones later.
    """

    def __init__(self, args: argparse.Namespace) -> None:
        self.start_tokens, self.end_tokens = args.start_context, args.max_context
        self.fraction = args.curriculum
        self.seconds = args.train_seconds
        self.num_recall, self.num_copy = args.recall, args.copy
        self.started = time.perf_counter()

    def max_context_tokens(self) -> int:
        if self.fraction <= 0:
            return self.end_tokens
        progress = min(1.0, (time.perf_counter() - self.started) / (self.fraction * self.seconds))
        return round(self.start_tokens * (self.end_tokens / self.start_tokens) ** progress)

    def world_args(self, max_len: int) -> dict[str, int]:
        return dict(max_len=max_len, max_context_tokens=self.max_context_tokens(),
                    num_recall=self.num_recall, num_copy=self.num_copy)


def example_stream(
    tokenizer_dir: str, num_workers: int, first_world: int, max_len: int, curriculum: Curriculum
) -> Iterator[list[Tokenized]]:
    """Tokenized examples of train worlds first_world, first_world + 1, ... from a bounded worker pool.

    The pool is forked here, before the caller touches CUDA (a forked child must not inherit it).
    """
    if num_workers == 0:
        _init_worker(tokenizer_dir)
        return (tokenized_world(w, **curriculum.world_args(max_len)) for w in itertools.count(first_world))
    pool = mp.get_context("fork").Pool(num_workers, initializer=_init_worker, initargs=(tokenizer_dir,))
    return _pooled(pool, num_workers, first_world, max_len, curriculum)


def _pooled(
    pool: Any, num_workers: int, first_world: int, max_len: int, curriculum: Curriculum
) -> Iterator[list[Tokenized]]:
    pending: deque[Any] = deque()
    next_world = first_world
    while True:
        while len(pending) < 4 * num_workers:  # bounded read-ahead: memory stays flat
            pending.append(pool.apply_async(tokenized_world, (next_world,), curriculum.world_args(max_len)))
            next_world += 1
        yield pending.popleft().get()


PROBE_KINDS = ("qa-single", "qa-multi", "needle", "recall", "copy")


def probe_sets(tok: Any, num_worlds: int = 2, per_set: int = 48) -> dict[str, list[Tokenized]]:
    """Fixed validation-world examples by kind and length (short < 600 <= mid < 1500 <= long tokens)."""
    sets: dict[str, list[Tokenized]] = {}
    rng = random.Random("probe")
    for i in range(num_worlds):
        examples = world_examples(1_000_000 + i, split="validation", max_context_tokens=2500, num_recall=12)
        tokenized = [tokenize_example(tok, e) for e in examples if e.kind in PROBE_KINDS]
        tokenized += [copy_example(tok, rng, 300) for _ in range(12)]
        for t in tokenized:
            n = len(t.token_ids)
            key = f"{t.kind}-{'short' if n < 600 else 'mid' if n < 1500 else 'long'}"
            if len(sets.setdefault(key, [])) < per_set:
                sets[key].append(t)
    return dict(sorted(sets.items()))


@torch.no_grad()
def probe(model: Any, sets: dict[str, list[Tokenized]], device: torch.device) -> dict[str, float]:
    """Teacher-forced answer exact match per probe set: every answer token is the argmax."""
    model.eval()
    out = {}
    for key, items in sets.items():
        length = max(len(t.token_ids) for t in items)
        ids = torch.zeros((len(items), length), dtype=torch.long)
        answer = torch.zeros((len(items), length), dtype=torch.bool)
        for row, t in enumerate(items):
            ids[row, : len(t.token_ids)] = torch.from_numpy(t.token_ids.astype("int64"))
            answer[row, : len(t.token_ids)] = torch.from_numpy(t.loss_weights == ANSWER_WEIGHT)
        ids, answer = ids.to(device), answer.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            pred = model(input_ids=ids).logits.argmax(-1)  # [B, L]
        right = (pred[:, :-1] == ids[:, 1:]) | ~answer[:, 1:]
        out[key] = round(right.all(dim=1).float().mean().item(), 3)
    model.train()
    return out


def loss_fn(model: Any, ids: torch.Tensor, weights: torch.Tensor, lm_weight: float) -> torch.Tensor:
    """Answer loss (mean per example, then over examples) + lm_weight x token-mean LM loss on prompts.

    ids, weights: [B, L]; weights tag answer tokens ANSWER_WEIGHT and prompt / plain-text tokens
    LM_WEIGHT (0 = padding). Right padding needs no attention mask under causal attention (real tokens
    never see later pads), so SDPA runs its fused causal path. The LM term matters: names repeat inside
    documents, and predicting those repeats is what teaches the copying that answering needs; answer
    tokens alone are ~0.5% of a batch, too sparse a signal.
    """
    hidden = model.model(input_ids=ids).last_hidden_state  # [B, L, H]
    w = weights[:, 1:]  # tag of predicting token t+1 from position t: [B, L-1]
    targets = ids[:, 1:]  # [B, L-1]
    trained = w > 0
    nll = torch.zeros_like(w)
    logits = model.lm_head(hidden[:, :-1][trained]).float()  # [N, V]
    nll[trained] = F.cross_entropy(logits, targets[trained], reduction="none")
    answer = (w > (ANSWER_WEIGHT + LM_WEIGHT) / 2).float()  # [B, L-1]
    rows = answer.sum(dim=1)  # answer tokens per example: [B]
    has_answer = rows > 0
    answer_loss = ((nll * answer).sum(dim=1)[has_answer] / rows[has_answer]).mean() if has_answer.any() else nll.sum() * 0
    lm = trained.float() - answer
    lm_loss = (nll * lm).sum() / lm.sum().clamp_min(1.0)
    return answer_loss + lm_weight * lm_loss


class LossModule(torch.nn.Module):
    """`loss_fn` as a module, so DistributedDataParallel sees (and synchronises) the whole forward."""

    def __init__(self, model: Any, lm_weight: float) -> None:
        super().__init__()
        self.model, self.lm_weight = model, lm_weight

    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return loss_fn(self.model, ids, weights, self.lm_weight)


def _distributed() -> tuple[int, int]:
    """(rank, world size) of a torchrun launch, after joining its process group; (0, 1) otherwise."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return 0, 1
    import torch.distributed as dist

    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    return dist.get_rank(), world_size


def lr_at(progress: float, step: int, peak: float, warmup_steps: int) -> float:
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    return peak * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def train(
    args: argparse.Namespace, model: Any, device: torch.device, examples: Iterator[list[Tokenized]],
    curriculum: Curriculum, probes: dict[str, list[Tokenized]], rank: int = 0, world_size: int = 1,
) -> list[dict[str, Any]]:
    """Train until the time budget is spent. Under torchrun every rank trains on its own worlds, gradients
    are averaged by DistributedDataParallel, and rank 0 decides when time is up, logs and probes."""
    step_loss: torch.nn.Module = LossModule(model, args.lm_weight)
    if world_size > 1:
        import torch.distributed as dist
        from torch.nn.parallel import DistributedDataParallel

        step_loss = DistributedDataParallel(step_loss, device_ids=[device.index] if device.type == "cuda" else None)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95), fused=device.type == "cuda",
    )
    stream = batches(
        examples,
        max_batch_tokens=args.batch_tokens, buffer_size=args.buffer, seed=0,
    )
    log: list[dict[str, Any]] = []
    start = time.perf_counter()
    num_tokens, step, next_probe = 0, 0, args.probe_every
    while True:
        elapsed = time.perf_counter() - start
        if world_size > 1:  # rank 0's clock rules, so every rank runs the same steps and schedule
            clock = torch.tensor([elapsed], dtype=torch.float64, device=device)
            dist.broadcast(clock, src=0)
            elapsed = clock.item()
        if elapsed >= args.train_seconds or (args.max_steps and step >= args.max_steps):
            break
        ids_np, w_np = next(stream)
        ids = torch.from_numpy(ids_np).to(device, non_blocking=True)
        weights = torch.from_numpy(w_np).to(device, non_blocking=True)
        for group in opt.param_groups:
            group["lr"] = lr_at(elapsed / args.train_seconds, step, args.lr, args.warmup)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = step_loss(ids, weights)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        num_tokens += int(ids_np.size) * world_size
        step += 1
        if step % args.log_every == 0 and rank == 0:
            seconds = time.perf_counter() - start
            entry: dict[str, Any] = {
                "step": step, "seconds": round(seconds, 1), "loss": round(loss.item(), 4), "tokens": num_tokens,
                "tokens_per_s": round(num_tokens / seconds), "lr": opt.param_groups[0]["lr"],
                "max_context": curriculum.max_context_tokens(),
            }
            if seconds >= next_probe:
                entry["probe"] = probe(model, probes, device)
                next_probe += args.probe_every
            log.append(entry)
            print(json.dumps(entry), flush=True)
    return log


def model_card(args: argparse.Namespace, model: Any, log: list[dict[str, float]], metrics: dict[str, Any]) -> str:
    num_params = sum(p.numel() for p in model.parameters())
    c = model.config
    last = log[-1] if log else {"step": 0, "tokens": 0, "seconds": 0, "loss": float("nan")}
    em = "\n".join(f"| {k} | {v:.3f} | {metrics['num_questions'][k]} |" for k, v in metrics["exact_match"].items())
    return f"""# terse reference model

A small model trained on synthetic data for offline demos and benchmarks. It is **not** a general
language model: it knows nothing about the real world and only reads documents of the synthetic
doc-QA world that `terse.synth` generates (people, companies, cities, products with invented names),
answering in terse's shared prompt formats (`terse.organize.formats`).

- Architecture: LlamaForCausalLM, {num_params / 1e6:.2f}M parameters, {c.num_hidden_layers} layers, hidden
  {c.hidden_size}, {c.num_attention_heads} query heads / {c.num_key_value_heads} key-value heads of dim {c.head_dim},
  MLP {c.intermediate_size}, tied embeddings, RoPE base {c.rope_parameters["rope_theta"] if hasattr(c, "rope_parameters") else c.rope_theta:g},
  weights in bfloat16 (safetensors).
- Tokenizer: byte-level BPE, {c.vocab_size} tokens, trained on train-split text only; BOS `<|begin|>` is
  prepended to every encode, EOS is `<|end|>`, pad `<|pad|>`; chat template
  `<|role|>\\ncontent<|end|>\\n` per message, generation prompt `<|assistant|>\\n`.
- Training context: examples of up to 4096 tokens; `max_position_embeddings` is 32768 so longer inputs
  are accepted, but quality beyond 4096 tokens was not trained or measured.
- Data: generated on the fly from train-split worlds {args.first_world}.. (entity names disjoint from the
  validation and test splits by construction): document QA over gold documents among distractors
  (~250-3000 tokens), the same over retrieved-chunk contexts and over contexts with 20-70% of words
  dropped, two-hop questions, passcode needles in filler at 128-4000 tokens, Skeleton-of-Thought
  skeletons and point expansions for list questions, DAG plans, sub-question answers and syntheses
  for two-hop questions, and plain document text. Loss on assistant tokens, averaged per example.
- Training: {last['step']} steps, {last['tokens'] / 1e6:.0f}M tokens (padding included), {last['seconds']:.0f} s on
  {args.hardware}, AdamW (peak lr {args.lr}, betas 0.9/0.95, weight decay 0.1), warmup then cosine decay,
  bf16 autocast; final training loss {last['loss']:.3f}.
- Command: `PYTHONPATH=. python3 bench/train_reference.py {' '.join(sys.argv[1:])}`.

## Validation exact match (greedy, full context: gold documents among distractors, ~2K tokens)

| kind | exact match | questions |
|---|---|---|
{em}

List answers count as correct when the set of items matches; needles are listed by haystack length
in tokens. Test-split numbers through terse's layers are in the project's docs/benchmarks.md.
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--tokenizer", default="new",
                   help="directory of a trained tokenizer, or 'new' to train one into --out first")
    p.add_argument("--size", choices=sorted(SIZES), default="reference")
    p.add_argument("--init", default="", help="continue training the model saved in this directory (ignores --size)")
    p.add_argument("--train-seconds", type=float, default=420.0)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: time only)")
    p.add_argument("--batch-tokens", type=int, default=98304)
    p.add_argument("--buffer", type=int, default=3000, help="examples sorted together into batches")
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=150)
    p.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 2))
    p.add_argument("--first-world", type=int, default=0)
    p.add_argument("--eval-worlds", type=int, default=4)
    p.add_argument("--log-every", type=int, default=25)
    p.add_argument("--lm-weight", type=float, default=0.5, help="weight of the LM loss on prompt tokens")
    p.add_argument("--max-len", type=int, default=4096, help="longest training example in tokens")
    p.add_argument("--merged-spaces", action="store_true",
                   help="new tokenizer: GPT-2-style 'Ġword' tokens instead of every space its own token")
    p.add_argument("--curriculum", type=float, default=0.5,
                   help="fraction of the time over which the context cap grows (0: full length from the start)")
    p.add_argument("--start-context", type=int, default=256, help="context cap in tokens at the start")
    p.add_argument("--max-context", type=int, default=3000, help="context cap in tokens at the end")
    p.add_argument("--recall", type=int, default=8, help="directory-recall examples per world")
    p.add_argument("--copy", type=int, default=4, help="random-token copy examples per world")
    p.add_argument("--probe-every", type=float, default=60.0, help="seconds between validation probes")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    args = p.parse_args(argv)

    from transformers import AutoTokenizer

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.tokenizer == "new":
        build_tokenizer(args.out, isolate_spaces=not args.merged_spaces)
        args.tokenizer = str(args.out)
    rank, world_size = _distributed()
    curriculum = Curriculum(args)
    # Each rank trains on its own worlds: rank r starts 10 million worlds after rank r - 1.
    examples = example_stream(args.tokenizer, args.workers, args.first_world + rank * 10_000_000, args.max_len, curriculum)
    device = torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.tokenizer)
    if args.init:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.init, dtype=torch.float32).to(device)
    else:
        model = build_model(args.size, tok).to(device)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M device={device}", flush=True)
    probes = probe_sets(tok)
    curriculum.started = time.perf_counter()
    log = train(args, model, device, examples, curriculum, probes, rank, world_size)
    if world_size > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    if rank != 0:
        return 0
    args.hardware = (
        f"{world_size} x {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{world_size} x CPU"
    )
    if device.type == "cuda":
        print(f"peak GPU memory: {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB", flush=True)
    model.eval()
    # Save before evaluating, so a run cut short during evaluation still leaves its weights.
    args.out.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    tok.padding_side = "right"
    tok.save_pretrained(args.out)
    t0 = time.perf_counter()
    metrics = evaluate(model, tok, build_split("validation", SplitConfig(num_worlds=args.eval_worlds)))
    metrics["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(metrics["exact_match"]), flush=True)
    (args.out / "README.md").write_text(model_card(args, model, log, metrics))
    (args.out / "train_log.json").write_text(json.dumps({"log": log, "validation": metrics}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
