"""Text generation over the model's KV cache: greedy, sampling and beam search, with Hugging
Face `generate`'s semantics (its logits processors, in its order, and its vectorised beam
search), so that the same weights give the same tokens.

    from train.model.decoding import generate
    outputs = generate(model, tokenizer, ["Hello, I'm a language model,"], GenerationConfig(
        do_sample=True, top_p=0.9, max_new_tokens=30, num_return_sequences=5, seed=0))
    outputs[0][0].text

Rows are decoded without padding: a batch's prompts are right-padded once for the prefill
(causal attention keeps pads out of every real token's view) and each row then advances at its
own positions (train/model/kv_cache.py). Finished rows stay in the batch until every row is
done,
as in Hugging Face, so that sampling draws the same random numbers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from train.config import ConfigError, GenerationConfig
from train.model.gpt import GPT

log = logging.getLogger("neo.generate")


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


@dataclass
class Generation(Generated):
    prompt: str = ""
    text: str = ""  # the continuation, without the end-of-text token
    prompt_ids: list[int] = field(default_factory=list)


def generate(
    model: GPT,
    tokenizer,
    prompts: str | Sequence[str],
    config: GenerationConfig,
    *,
    batch_size: int = 8,
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
    show_progress: bool = False,
) -> list[list[Generation]]:
    """`config.num_return_sequences` continuations of every prompt (a list per prompt).

    An empty prompt starts from the end-of-text token (GPT-2's unconditional samples). With
    `config.seed`, sampling is reproducible; `generator` overrides it."""
    config.validate()
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if generator is None:
        generator = make_generator(config.seed, device)
    eos = tokenizer.eod_id
    encoded = [tokenizer.encode(p) or [eos] for p in prompts]
    stop = StopStrings(tokenizer, config.stop_strings) if config.stop_strings else None
    outputs: list[list[Generation]] = []
    start, new_tokens = time.perf_counter(), 0
    for first in range(0, len(prompts), batch_size):
        batch = encoded[first : first + batch_size]
        for i, sequences in enumerate(
            generate_ids(model, batch, config, eos_id=eos, device=device, generator=generator,
                         stop=stop)
        ):  # fmt: skip
            prompt_ids = batch[i]
            outputs.append(
                [
                    Generation(
                        **vars(s),
                        prompt=prompts[first + i],
                        text=tokenizer.decode(_without_eos(s)),
                        prompt_ids=prompt_ids,
                    )
                    for s in sequences
                ]
            )
            new_tokens += sum(len(s.token_ids) for s in sequences)
        if show_progress:
            done, seconds = len(outputs), time.perf_counter() - start
            log.info(
                "%d/%d prompts, %.1f new tokens/s, ETA %.0fs",
                done,
                len(prompts),
                new_tokens / seconds,
                seconds / done * (len(prompts) - done),
            )
    return outputs


def _without_eos(s: Generated) -> list[int]:
    return s.token_ids[:-1] if s.finish_reason == "eos" else s.token_ids


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    return generator


def generate_ids(
    model: GPT,
    prompts: list[list[int]],
    config: GenerationConfig,
    *,
    eos_id: int,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
    stop: StopStrings | None = None,
) -> list[list[Generated]]:
    """Token-level generation for one batch of prompts (lists of ids)."""
    config.validate()
    if any(not p for p in prompts):
        raise ConfigError("every prompt needs at least one token")
    longest = max(len(p) for p in prompts)
    if config.max_new_tokens is not None:
        max_new = config.max_new_tokens
    else:
        max_new = config.max_length - longest
        if max_new <= 0:
            raise ConfigError(
                f"max_length={config.max_length} leaves no room after the longest prompt "
                f"({longest} tokens): raise max_length or set max_new_tokens"
            )
    copies = config.num_beams if config.num_beams > 1 else config.num_return_sequences
    rows = Rows(model, [p for p in prompts for _ in range(copies)], max_new, config, device)
    training = model.training
    model.eval()  # no dropout (SFT samples in the middle of training)
    try:
        with torch.inference_mode():  # cheaper than no_grad for the many small decoding ops
            if config.num_beams > 1:
                return beam_search(rows, config, max_new, eos_id, generator, stop, len(prompts))
            flat = sample(rows, config, max_new, eos_id, generator, stop)
    finally:
        model.train(training)
    n = config.num_return_sequences
    return [flat[i * n : (i + 1) * n] for i in range(len(prompts))]


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


# --------------------------------------------------------------------------------------------
# beam search (Hugging Face's vectorised _beam_search, step for step)

NEG = -1.0e9


def beam_search(
    rows: Rows, config, max_new, eos_id, generator, stop, batch
) -> list[list[Generated]]:
    nb = config.num_beams
    keep = 2 * nb  # max(2, 1 + number of eos tokens) * num_beams: one eos token here
    processors = Processors(config, min_tokens_to_keep=2)
    dev = rows.device
    lp, early = config.length_penalty, config.early_stopping
    top_mask = torch.arange(keep, device=dev) < nb

    def take(t: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        while index.dim() < t.dim():
            index = index.unsqueeze(-1)
        return torch.take_along_dim(t, index, dim=1)

    run_seq = torch.full((batch, nb, max_new), eos_id, dtype=torch.long, device=dev)
    run_logp = torch.zeros(batch, nb, max_new, device=dev)  # raw log-probabilities
    run_scores = torch.zeros(batch, nb, device=dev)
    run_scores[:, 1:] = NEG
    fin_seq, fin_logp = run_seq.clone(), run_logp.clone()
    fin_scores = torch.full((batch, nb), NEG, device=dev)
    fin_done = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
    fin_len = torch.zeros(batch, nb, dtype=torch.long, device=dev)
    fin_stop = torch.zeros(batch, nb, dtype=torch.bool, device=dev)
    improvable = torch.ones(batch, 1, dtype=torch.bool, device=dev)

    logits = rows.start()
    vocab = logits.shape[-1]
    seen = _seen(rows, vocab) if processors.needs_seen else None
    for step in range(max_new):
        raw = F.log_softmax(logits.float(), dim=-1)
        scores = processors(raw, seen).view(batch, nb, vocab) + run_scores[:, :, None]
        flat = scores.view(batch, nb * vocab)
        if config.do_sample:
            index = torch.multinomial(F.softmax(flat, dim=-1), keep, generator=generator)
            values = flat.gather(1, index)
            values, order = values.sort(dim=-1, descending=True)
            index = index.gather(1, order)
        else:
            values, index = torch.topk(flat, keep)
        beam, token = index // vocab, index % vocab
        cand_seq = take(run_seq, beam)
        cand_seq[:, :, step] = token
        cand_logp = take(run_logp, beam)
        cand_logp[:, :, step] = raw.view(batch, nb * vocab).gather(1, index)
        hits = (token == eos_id) | (step + 1 >= max_new)
        stopped = torch.zeros_like(hits)
        if stop is not None:
            for b in range(batch):
                for k in range(keep):
                    ids = rows.ids(b * nb + int(beam[b, k])) + [int(token[b, k])]
                    stopped[b, k] = token[b, k] != eos_id and stop.hit(ids)
            hits |= stopped

        # the best `nb` continuations that did not finish go on
        run_values = values + hits.float() * NEG
        chosen = torch.topk(run_values, nb).indices
        run_seq, run_logp = take(cand_seq, chosen), take(cand_logp, chosen)
        run_scores = take(run_values, chosen)
        source = take(beam, chosen) + torch.arange(batch, device=dev)[:, None] * nb

        # finished candidates among the top `nb` join the finished hypotheses if they are better
        just = hits & top_mask[None, :]
        final = values / ((step + 1) ** lp)
        full = fin_done.all(dim=-1, keepdim=True) & (early is True)
        final = final + full.float() * NEG + (~improvable).float() * NEG + (~just).float() * NEG
        merged = torch.topk(torch.cat((fin_scores, final), dim=1), nb).indices
        fin_seq = take(torch.cat((fin_seq, cand_seq), dim=1), merged)
        fin_logp = take(torch.cat((fin_logp, cand_logp), dim=1), merged)
        fin_scores = take(torch.cat((fin_scores, final), dim=1), merged)
        fin_done = take(torch.cat((fin_done, just), dim=1), merged)
        new_len = torch.full_like(token, step + 1)
        fin_len = take(torch.cat((fin_len, new_len), dim=1), merged)
        fin_stop = take(torch.cat((fin_stop, stopped), dim=1), merged)

        # can the running beams still beat the worst finished one?
        best_length = max_new if early == "never" and lp > 0.0 else step + 1
        best_possible = run_scores[:, :1] / (best_length**lp)
        worst = torch.where(fin_done, fin_scores.min(dim=1, keepdim=True).values, NEG)
        improvable = improvable & (best_possible > worst).any(dim=-1, keepdim=True)
        if not (
            bool(improvable.any())
            and not (bool(fin_done.all()) and early is True)
            and not bool(hits.all())
        ):
            break
        order = source.flatten()
        rows.reorder(order)
        if seen is not None:
            seen = seen.index_select(0, order)
            seen[torch.arange(len(rows), device=dev), run_seq[:, :, step].flatten()] = True
        logits = rows.step(run_seq[:, :, step].flatten())

    results = []
    for b in range(batch):
        best = []
        for i in range(config.num_return_sequences):
            n = int(fin_len[b, i])
            ids = fin_seq[b, i, :n].tolist()
            reason = "eos" if ids and ids[-1] == eos_id else "stop" if fin_stop[b, i] else "length"
            best.append(
                Generated(ids, fin_logp[b, i, :n].tolist(), reason, float(fin_scores[b, i]))
            )
        results.append(best)
    return results
