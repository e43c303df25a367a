"""Log-likelihoods of continuations given contexts, computed as lm-evaluation-harness (v0.4)
computes them, in fewer and cheaper forwards.

What is computed (the harness's HFLM, causal models):
- a (context, continuation) text pair is tokenized at the boundary: trailing spaces of the
  context move onto the continuation, context + continuation is encoded whole and the
  continuation is the tail after the context's own tokens; an empty context becomes the
  end-of-text token (`encode_pair`);
- the model reads (context + continuation)[-(max_length + 1):][:-1] (inputs longer than the
  context are cut from the left) and the score is the sum of the log-probabilities of the
  continuation tokens, with `greedy` true when each of them is the argmax;
- a whole text is scored in non-overlapping windows of max_length tokens, the first one
  conditioned on the end-of-text token, the last one on as much preceding text as fits
  (`rolling_requests`, the harness's get_rolling_token_windows with context_len=1).

How it is made cheaper (exactly the same numbers):
- a request whose input is a prefix of another's reads that forward's outputs (a causal model's
  outputs at positions < n depend only on the first n inputs): the choices of a multiple-choice
  item with one-token continuations, or sharing a context, cost one forward;
- forwards run longest first in batches bounded by a token budget, so padding is small;
- only the positions that are scored go through the vocabulary projection, in chunks (for a
  LAMBADA item that is 1-3 of ~80 positions: the projection is a third of a small model's
  FLOPs per token).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from train.errors import ConfigError

log = logging.getLogger("neo.eval")

# Logits per projection chunk: 16 MB in fp32, as in train/model/ops/fused_loss.py (reused
# from the heap, not mapped afresh for every chunk).
CHUNK_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class Request:
    """Token ids: the continuation is scored given the context (both non-empty)."""

    context: tuple[int, ...]
    continuation: tuple[int, ...]


@dataclass(frozen=True)
class Score:
    logprob: float  # sum of the continuation tokens' log-probabilities (natural log)
    greedy: bool  # every continuation token is the model's argmax
    tokens: int  # continuation tokens


def encode_pair(
    encode: Callable[[str], list[int]], context: str, continuation: str, prefix_id: int
) -> Request:
    """A Request from text, tokenized at the boundary as the harness does it."""
    if context == "":
        cont = encode(continuation)
        if not cont:
            raise ConfigError(f"empty continuation {continuation!r} after an empty context")
        # The harness: the end-of-text token as context, unless the continuation starts with it.
        if cont[0] != prefix_id:
            return Request((prefix_id,), tuple(cont))
        return Request(tuple(cont[:1]), tuple(cont[1:]))
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    ctx = encode(context)
    return Request(tuple(ctx), tuple(whole[len(ctx) :]))


def rolling_requests(tokens: Sequence[int], prefix_id: int, max_length: int) -> list[Request]:
    """A whole token sequence as disjoint windows: every token scored exactly once."""
    tokens = list(tokens)
    out: list[Request] = []
    if not tokens:
        return out
    first = min(max_length, len(tokens))
    out.append(Request((prefix_id,), tuple(tokens[:first])))
    done = first
    while done < len(tokens):
        n = min(len(tokens) - done, max_length)
        end = done + n
        # The model reads max_length tokens ending just before the last scored one.
        context = tokens[max(0, end - max_length - 1) : done]
        out.append(Request(tuple(context), tuple(tokens[done:end])))
        done = end
    return out


@dataclass
class _Forward:
    tokens: tuple[int, ...]
    # (request index, first scored position, target tokens) of each request it serves
    served: list[tuple[int, int, tuple[int, ...]]]


class Scorer:
    """Scores Requests with a model that has `hidden_states(ids)` and `lm_head`
    (train/model/gpt.py).

    batch_size: at most this many sequences per forward (None: as many as batch_tokens allow);
    batch_tokens: at most this many (padded) tokens per forward.
    rank / world_size: under torchrun each rank runs every world_size-th batch; `score` returns
    only this rank's scores; the caller merges them over ranks
    (train/distributed/collectives.merged)."""

    def __init__(
        self,
        model,
        device: torch.device | str,
        max_length: int,
        batch_size: int | None = None,
        batch_tokens: int = 16384,
        rank: int = 0,
        world_size: int = 1,
        pad_id: int = 0,
    ):
        self.model, self.device, self.max_length = model, torch.device(device), max_length
        self.batch_size, self.batch_tokens = batch_size, batch_tokens
        self.rank, self.world_size, self.pad_id = rank, world_size, pad_id
        self.forwards_run = 0  # counters, for the benchmark and the log
        self.tokens_run = 0

    def plan(self, requests: Sequence[Request]) -> list[_Forward]:
        """The forwards that serve every request, longest first."""
        inputs: dict[tuple[int, ...], list[tuple[int, int, tuple[int, ...]]]] = {}
        for i, r in enumerate(requests):
            n = len(r.continuation)
            if n == 0 or not r.context:
                raise ValueError(f"request {i}: context and continuation must be non-empty")
            if n > self.max_length:
                raise ConfigError(
                    f"a continuation of {n} tokens is longer than the model's context "
                    f"({self.max_length} tokens)"
                )
            seq = (r.context + r.continuation)[-(self.max_length + 1) :]
            inp = seq[:-1]
            inputs.setdefault(inp, []).append((i, len(inp) - n, r.continuation))
        # An input that is a prefix of another is served by that one's forward. In sorted order
        # a sequence that has prefixes follows them directly, so one backward pass finds, for
        # each input, the longest input it is a prefix of.
        ordered = sorted(inputs)
        host = list(range(len(ordered)))
        for j in range(len(ordered) - 2, -1, -1):
            a, b = ordered[j], ordered[host[j + 1]]
            if len(a) <= len(b) and b[: len(a)] == a:
                host[j] = host[j + 1]
        forwards: dict[int, _Forward] = {}
        for j, inp in enumerate(ordered):
            h = host[j]
            forwards.setdefault(h, _Forward(ordered[h], [])).served.extend(inputs[inp])
        return sorted(forwards.values(), key=lambda f: (-len(f.tokens), f.tokens))

    def batches(self, forwards: list[_Forward]) -> list[list[_Forward]]:
        out: list[list[_Forward]] = []
        for f in forwards:  # longest first: a batch's first row sets its padded length
            batch = out[-1] if out else None
            if (
                batch is not None
                and (self.batch_size is None or len(batch) < self.batch_size)
                and (len(batch) + 1) * len(batch[0].tokens) <= self.batch_tokens
            ):
                batch.append(f)
            else:
                out.append([f])
        return out

    @torch.no_grad()
    def score(
        self, requests: Sequence[Request], progress: Callable[[int, int], None] | None = None
    ) -> dict[int, Score]:
        """request index -> Score, for the requests of this rank's batches."""
        batches = self.batches(self.plan(requests))
        mine = batches[self.rank :: self.world_size]
        out: dict[int, Score] = {}
        for done, batch in enumerate(mine, start=1):
            out.update(self._run(batch))
            if progress:
                progress(done, len(mine))
        return out

    def _run(self, batch: list[_Forward]) -> dict[int, Score]:
        length = len(batch[0].tokens)
        ids = torch.full((len(batch), length), self.pad_id, dtype=torch.long)
        for row, f in enumerate(batch):
            ids[row, : len(f.tokens)] = torch.tensor(f.tokens)
        hidden = self.model.hidden_states(ids.to(self.device))  # (B, T, C)
        self.forwards_run += 1
        self.tokens_run += ids.numel()
        # Every scored position: (row, position, target), and the request it belongs to.
        rows, positions, targets, owner = [], [], [], []
        for row, f in enumerate(batch):
            for request, start, cont in f.served:
                rows.extend([row] * len(cont))
                positions.extend(range(start, start + len(cont)))
                targets.extend(cont)
                owner.extend([request] * len(cont))
        h = hidden[torch.tensor(rows), torch.tensor(positions)]  # (N, C)
        target = torch.tensor(targets)
        logprob = torch.empty(len(targets), dtype=torch.float64)
        greedy = torch.empty(len(targets), dtype=torch.bool)
        # Called as a module, so that accelerate's hooks (device_map=auto) place its weight.
        head = self.model.lm_head
        step = max(1, CHUNK_ELEMENTS // head.out_features)
        for s in range(0, len(targets), step):
            lp = torch.log_softmax(head(h[s : s + step]).float(), dim=-1)
            t = target[s : s + step].to(lp.device)
            logprob[s : s + step] = lp.gather(1, t[:, None]).squeeze(1).double().cpu()
            greedy[s : s + step] = (lp.argmax(dim=-1) == t).cpu()
        scores: dict[int, list] = {}
        for request, lp, g in zip(owner, logprob.tolist(), greedy.tolist(), strict=True):
            entry = scores.setdefault(request, [0.0, True, 0])
            entry[0] += lp
            entry[1] = entry[1] and g
            entry[2] += 1
        return {r: Score(lp, g, n) for r, (lp, g, n) in scores.items()}


class Progress:
    """`label: done/total batches, rate, ETA`, at most every `every` seconds (rank 0 only)."""

    def __init__(self, label: str, enabled: bool, every: float = 10.0):
        self.label, self.enabled, self.every = label, enabled, every
        self.start = self.last = time.perf_counter()

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if not self.enabled or (now - self.last < self.every and done < total):
            return
        self.last = now
        rate = done / max(now - self.start, 1e-9)
        eta = (total - done) / rate if rate else float("inf")
        log.info("%s: %d/%d batches, %.1f batches/s, ETA %.0fs", self.label, done, total, rate, eta)
