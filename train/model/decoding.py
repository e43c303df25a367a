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
done, as in Hugging Face, so that sampling draws the same random numbers. The steps are in
train/model/sampling.py and train/model/beam.py.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from train.config.evaluation import GenerationConfig
from train.errors import ConfigError
from train.model.beam import beam_search
from train.model.gpt import GPT
from train.model.sampling import Generated, Rows, StopStrings, sample

log = logging.getLogger("neo.generate")


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
        batch_outputs = generate_ids(
            model, batch, config, eos_id=eos, device=device, generator=generator, stop=stop
        )
        for i, sequences in enumerate(batch_outputs):
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
