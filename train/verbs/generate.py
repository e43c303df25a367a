"""`neo generate`: continue prompts with any checkpoint (train/model/decoding.py does the decoding).

    neo generate                                      # the demo run's model, the card's prompt
    neo generate checkpoint=runs/demo prompt="Hello, I'm a language model," max_new_tokens=30 \\
        do_sample=true num_return_sequences=5 seed=0
    neo generate checkpoint=DIR prompts_file=prompts.txt num_beams=4 format=jsonl output=out.jsonl

Text goes to standard output (or `output`): each sequence as prompt + continuation. format=jsonl
writes one record per sequence with the token ids and per-token log-probabilities.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path

import torch

from data_prep.files import atomic_write_text, check_apart, check_output_free
from train.checkpoints.load import (
    model_from_state,
    read_any,
    require_checkpoint,
    source_tokenizer,
)
from train.config.evaluation import GenerateConfig
from train.config.resolve import Resolved, resolve_generate
from train.distributed.machine import Host, host
from train.distributed.placement import place
from train.errors import ConfigError, NotFound
from train.model.decoding import Generation, generate, make_generator

log = logging.getLogger("neo.generate")


def main(cfg: GenerateConfig) -> None:
    where = host(cfg.accelerator)
    run(resolve_generate(cfg, where.world), where)


def run(resolved: Resolved[GenerateConfig], where: Host) -> None:
    cfg, acc = resolved.cfg, where.acc
    if cfg.output:
        inputs = {"checkpoint": cfg.checkpoint, "prompts_file": cfg.prompts_file}
        for key, given in inputs.items():
            if given:
                check_apart(cfg.output, [given], "output", key)
        check_output_free(Path(cfg.output), cfg.overwrite)
    require_checkpoint(cfg.checkpoint, "checkpoint")
    prompts = read_prompts(cfg)  # before the model loads
    config, state, tokenizer = read_any(cfg.checkpoint)
    tokenizer = source_tokenizer(cfg, config, tokenizer)
    model = model_from_state(config, state, dtype=getattr(torch, cfg.dtype)).eval()
    model = place(model, acc, 0, cfg.device_map)
    del state
    device = acc.device(0)
    generator = make_generator(cfg.seed, device)
    if cfg.do_sample and cfg.seed is None:
        log.info("sampling with seed=%d (pass seed=%d to repeat)", *[generator.initial_seed()] * 2)
    start = time.perf_counter()
    outputs = generate(
        model,
        tokenizer,
        prompts,
        cfg,
        batch_size=cfg.batch_size,
        device=device,
        generator=generator,
        show_progress=len(prompts) > cfg.batch_size,
    )
    seconds = time.perf_counter() - start
    text = render(outputs, cfg.format)
    if cfg.output:
        Path(cfg.output).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(cfg.output, text)
    else:
        sys.stdout.write(text)
        sys.stdout.flush()
    sequences = [s for per_prompt in outputs for s in per_prompt]
    new_tokens = sum(len(s.token_ids) for s in sequences)
    log.info(
        "generated %d sequences for %d prompts with %s (%s): %d new tokens in %.1fs, "
        "%.1f tokens/s%s",
        len(sequences),
        len(prompts),
        cfg.checkpoint,
        "beam search" if cfg.num_beams > 1 else "sampling" if cfg.do_sample else "greedy",
        new_tokens,
        seconds,
        new_tokens / seconds,
        f"; wrote {cfg.output}" if cfg.output else "",
    )


def read_prompts(cfg: GenerateConfig) -> list[str]:
    """`prompts_file` (one prompt per line; JSONL: a "prompt" field or a string per line), else
    `prompt`."""
    if cfg.prompts_file is None:
        return [cfg.prompt]
    path = Path(cfg.prompts_file)
    if not path.is_file():
        raise NotFound(f"prompts_file={path} does not exist")
    lines = path.read_text(encoding="utf-8").splitlines()
    if path.suffix not in (".jsonl", ".json"):
        prompts = [line for line in lines if line.strip()]
    else:
        prompts = []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ConfigError(f"{path}:{number}: not JSON ({e.msg})") from None
            prompt = record.get("prompt") if isinstance(record, dict) else record
            if not isinstance(prompt, str):
                raise ConfigError(
                    f'{path}:{number}: expected a string or an object with a "prompt" string'
                )
            prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"prompts_file={path} holds no prompt")
    return prompts


def render(outputs: list[list[Generation]], format: str) -> str:
    if format == "jsonl":
        return "".join(
            json.dumps(
                {
                    "prompt_index": p,
                    "sequence_index": i,
                    "prompt": s.prompt,
                    "text": s.text,
                    "finish_reason": s.finish_reason,
                    "score": s.score,
                    "prompt_ids": s.prompt_ids,
                    "token_ids": s.token_ids,
                    "logprobs": s.logprobs,
                }
            )
            + "\n"
            for p, per_prompt in enumerate(outputs)
            for i, s in enumerate(per_prompt)
        )
    blocks = []
    for p, per_prompt in enumerate(outputs):
        for i, s in enumerate(per_prompt):
            header = f"--- prompt {p + 1}/{len(outputs)}, sequence {i + 1}/{len(per_prompt)}"
            blocks.append(f"{header} ({s.finish_reason}) ---\n{s.prompt}{s.text}\n")
    return "\n".join(blocks)
