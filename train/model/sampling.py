"""The state of rows decoded together and the steps of greedy decoding and sampling, as
Hugging Face's `generate` takes them: its logits processors in its order, stop strings, and
finished rows kept in the batch until every row is done (so sampling draws the same random
numbers). `train/model/decoding.py` is the entry point."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from train.config.evaluation import GenerationConfig
from train.errors import ConfigError
from train.model.gpt import GPT


@dataclass
class Generated:
    """One generated sequence: the new tokens only."""

    token_ids: list[int]
    # log p(token | everything before it) under the model: the raw logits' log-softmax, before
    # any processor (temperature, top-k, penalties) changed them.
    logprobs: list[float]
    finish_reason: str  # eos | stop | length
    # Beam search: the hypothesis' score, sum of processed log-probabilities / length **
    # length_penalty (Hugging Face's `sequences_scores`).
    score: float | None = None


class Rows:
    """The token ids of the rows being decoded and the model's cache over them.

    Every row may hold up to `max_position_embeddings` tokens. With truncate=left a row that
    would pass it keeps its last positions: the cache is rebuilt from each row's last tokens
    (a full forward per new token from then on, as a model with a fixed context must do)."""

    def __init__(self, model: GPT, prompts: list[list[int]], max_new: int, config, device):
        self.model, self.device = model, device
        self.context = model.config.max_position_embeddings
        self.truncate = config.truncate
        longest = max(len(p) for p in prompts)
        if longest + max_new > self.context and self.truncate == "error":
            raise ConfigError(
                f"a prompt of {longest} tokens + max_new_tokens={max_new} needs "
                f"{longest + max_new} positions, more than the model's "
                f"max_position_embeddings={self.context}: shorten the prompt, lower "
                "max_new_tokens, or set truncate=left to keep the last positions"
            )
        self.capacity = min(longest + max_new, self.context)
        self.tokens = torch.zeros(len(prompts), longest + max_new, dtype=torch.long, device=device)
        for i, p in enumerate(prompts):
            self.tokens[i, : len(p)] = torch.tensor(p)
        self.lengths = torch.tensor([len(p) for p in prompts], device=device)
        self.cache = None

    def __len__(self) -> int:
        return len(self.lengths)

    def start(self) -> torch.Tensor:
        """Logits (rows, vocab) after each row's prompt."""
        lengths = self.lengths.clamp(max=self.capacity)
        if bool((lengths < self.lengths).any()):  # truncate=left
            offset = self.lengths - lengths
            window = torch.arange(int(lengths.max()), device=self.device)[None, :] + offset[:, None]
            ids = self.tokens.gather(1, window.clamp(max=self.tokens.shape[1] - 1))
        else:
            ids = self.tokens[:, : int(lengths.max())]
        logits, self.cache = self.model.prefill(ids, lengths, self.capacity)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Append one token to every row; logits after it."""
        self.tokens[torch.arange(len(self), device=self.device), self.lengths] = tokens
        self.lengths += 1
        if self.cache.last_index + 1 >= self.capacity:
            self.capacity = self.context  # only reachable with truncate=left
            return self.start()
        return self.model.decode(tokens, self.cache)

    def reorder(self, order: torch.Tensor) -> None:
        self.tokens = self.tokens.index_select(0, order)
        self.lengths = self.lengths.index_select(0, order)
        self.cache.reorder(order)

    def ids(self, row: int) -> list[int]:
        return self.tokens[row, : int(self.lengths[row])].tolist()


# --------------------------------------------------------------------------------------------
# logits processors: Hugging Face's, in the order its generate applies them


class Processors:
    """repetition penalty (greedy too), then, when sampling: temperature, top-k, top-p."""

    def __init__(self, config: GenerationConfig, min_tokens_to_keep: int = 1):
        self.config = config
        self.min_keep = min_tokens_to_keep

    @property
    def needs_seen(self) -> bool:
        return self.config.repetition_penalty != 1.0

    def __call__(self, scores: torch.Tensor, seen: torch.Tensor | None) -> torch.Tensor:
        """scores (rows, vocab) fp32; seen (rows, vocab) True for tokens already in the row."""
        c = self.config
        if c.repetition_penalty != 1.0:
            penalised = torch.where(
                scores < 0, scores * c.repetition_penalty, scores / c.repetition_penalty
            )
            scores = torch.where(seen, penalised, scores)
        if not c.do_sample:
            return scores
        if c.temperature != 1.0:
            scores = scores / c.temperature
        if c.top_k:
            k = min(max(c.top_k, self.min_keep), scores.shape[-1])
            kth = torch.topk(scores, k).values[..., -1:]
            scores = scores.masked_fill(scores < kth, -float("inf"))
        if c.top_p < 1.0:
            sorted_scores, order = torch.sort(scores, descending=False)
            cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
            remove = cumulative <= (1 - c.top_p)
            remove[..., -self.min_keep :] = False
            scores = scores.masked_fill(remove.scatter(1, order, remove), -float("inf"))
        return scores


class StopStrings:
    """A row stops when one of the strings ends inside its newest token (Hugging Face's
    stop_strings rule: the text may run on past it within that token)."""

    def __init__(self, tokenizer, stops: list[str]):
        self.tokenizer, self.stops = tokenizer, stops
        # Every token is at least one byte: this many tokens hold the longest string.
        self.tail = max(len(s.encode("utf-8")) for s in stops) + 1

    def hit(self, ids: list[int]) -> bool:
        tail = ids[-self.tail :]
        before = len(self.tokenizer.decode(tail[:-1]))
        text = self.tokenizer.decode(tail)
        for s in self.stops:
            at = text.find(s, max(0, before - len(s) + 1))
            if at >= 0 and at + len(s) > before:
                return True
        return False


def _seen(rows: Rows, vocab: int) -> torch.Tensor:
    seen = torch.zeros(len(rows), vocab, dtype=torch.bool, device=rows.device)
    positions = torch.arange(rows.tokens.shape[1], device=rows.device)[None, :]
    in_row = positions < rows.lengths[:, None]
    seen.scatter_(1, torch.where(in_row, rows.tokens, rows.tokens[:, :1]), True)
    return seen


# --------------------------------------------------------------------------------------------
# greedy and sampling (Hugging Face's _sample)


def sample(rows: Rows, config, max_new, eos_id, generator, stop) -> list[Generated]:
    processors = Processors(config)
    n = len(rows)
    out = [Generated([], [], "length") for _ in range(n)]
    running = torch.ones(n, dtype=torch.bool, device=rows.device)
    logits = rows.start()
    seen = _seen(rows, logits.shape[-1]) if processors.needs_seen else None
    every = torch.arange(n, device=rows.device)
    open_rows = list(range(n))
    for step in range(max_new):
        logits = logits.float()
        scores = processors(logits, seen)
        if config.do_sample:
            probs = F.softmax(scores, dim=-1)
            tokens = torch.multinomial(probs, 1, generator=generator).squeeze(1)
        else:  # max(dim).indices: argmax's first-maximum rule, at a third of its cost on CPU
            tokens = scores.max(dim=-1).indices
        logprobs = F.log_softmax(logits, dim=-1)[every, tokens]
        tokens = torch.where(running, tokens, eos_id)  # finished rows are padded
        if seen is not None:
            seen[every, tokens] = True
        token_list, logprob_list = tokens.tolist(), logprobs.tolist()
        for i in open_rows:
            row = out[i]
            row.token_ids.append(token_list[i])
            row.logprobs.append(logprob_list[i])
            if token_list[i] == eos_id:
                row.finish_reason = "eos"
            elif stop is not None and stop.hit(rows.ids(i) + [token_list[i]]):
                row.finish_reason = "stop"
        finished = [i for i in open_rows if out[i].finish_reason != "length"]
        if finished:
            running[finished] = False
            open_rows = [i for i in open_rows if i not in finished]
        if step == max_new - 1 or not open_rows:
            break
        logits = rows.step(tokens)
    return out
