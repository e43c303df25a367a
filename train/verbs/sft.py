"""`neo sft`: supervised fine-tuning of a causal LM on instruction, completion or chat data (or
GPT-1's task head on task records, or a reward model on preference pairs: head=reward), with
`neo train`'s machinery (DeepSpeed ZeRO 0-3, precision, accumulation, schedule, exact resume,
SIGTERM/SIGUSR1 save, metrics, export).

    neo sft                                   # the demo model on the bundled instruction sample
    neo sft base=runs/demo sft.path=train.jsonl sft.format=alpaca epochs=3
    torchrun --nproc_per_node 2 -m train.cli sft base=~/models/gpt-neo-125M deepspeed=zero2 \\
        sft.path=chats.jsonl sft.format=chat

Records become ids and labels (train/data/sft.py: the loss on responses only, or on assistant
turns), packed several to a row (train/data/packing.py; positions restart and attention is
blocked at each example, so a packed row trains each example as if it were alone) or padded.
Validation reports the loss on responses and greedy answers to a few validation prompts.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.checkpoints.adapters import save_adapter
from train.checkpoints.load import read_any
from train.config.dpo import DpoConfig
from train.config.model import ModelConfig
from train.config.resolve import Resolved, resolve_sft
from train.config.sft import SftConfig
from train.data.finetune import FineTuneData, data_identity, read_lm, read_reward, read_task
from train.data.packing import RowStream
from train.data.tasks import special_tokens
from train.distributed.machine import Host, host
from train.errors import NotFound
from train.loop.checkpointing import model_identity
from train.loop.evaluators import Answers, Evaluator, ResponseLoss, RewardMetrics, TaskMetrics
from train.loop.finish import Finished, Hook, standard_hooks, train_and_finish
from train.loop.fit import Trainer
from train.loop.optim import Schedule
from train.loop.run import checkpoint_meta, open_engine, start_run
from train.model import lora, reward
from train.model.factory import ModelFactory
from train.model.heads import with_new_rows

log = logging.getLogger("neo.sft")
DEMO = "runs/demo"


def main(cfg: SftConfig) -> None:
    where = host(cfg.accelerator)
    sources = Sources(cfg)
    resolved = resolve_sft(cfg, where.world, sources)
    trainer = setup(resolved, where, sources)
    hooks = standard_hooks(resolved.cfg.export_hf)
    if resolved.cfg.lora.enabled:
        hooks.insert(0, lora_hook(resolved.cfg))
    train_and_finish(trainer, hooks, head=sources.data.head)


class Sources:
    """What neo sft reads to resolve its config (train/config/resolve.py SftSources): the base
    checkpoint, its tokenizer (with a task head's tokens) and the training data, each read
    when resolve first asks (after the config's own rules) and kept for the run."""

    def __init__(self, cfg: SftConfig):
        self.cfg = cfg
        self.weights: dict | None = None
        self.tokenizer: LoadedTokenizer | None = None
        self.base: ModelConfig | None = None
        self.ids: dict[str, int] | None = None  # a task head's special tokens
        self.data: FineTuneData | None = None

    def base_model(self) -> ModelConfig | None:
        self.weights, self.tokenizer, self.base = read_base(self.cfg)
        if self.cfg.head.gpt1:
            self.ids = special_tokens(self.cfg.head, self.tokenizer)
        return self.base

    def tokenizer_size(self) -> int:
        return self.tokenizer.vocab_size

    def training_rows(self, cfg: SftConfig) -> int:
        return len(self.read_data(cfg).items)

    def read_data(self, cfg: SftConfig) -> FineTuneData:
        """The data made for cfg's model (its context), read once."""
        if self.data is None:
            if cfg.head.type == "reward":
                self.data = read_reward(cfg, self.tokenizer)
            elif cfg.head.enabled:
                self.data = read_task(cfg, self.tokenizer, self.ids)
            else:
                self.data = read_lm(cfg, self.tokenizer)
        return self.data


def read_base(cfg: SftConfig) -> tuple[dict | None, LoadedTokenizer, ModelConfig | None]:
    """The base model's weights, tokenizer and config. Without the demo model: no weights (a
    fresh cfg.model), the GPT-2 tokenizer, said so."""
    if not Path(cfg.base).exists():
        if cfg.base != DEMO:
            raise NotFound(f"base={cfg.base} does not exist")
        log.warning(
            "base=%s does not exist (`make demo` makes it): fine-tuning a fresh %s model "
            "instead; pass base=PATH to start from a trained one",
            DEMO,
            cfg.model.name,
        )
        return None, load_tokenizer("gpt2"), None
    config, state, tokenizer = read_any(cfg.base)
    if tokenizer is None:
        raise NotFound(f"base={cfg.base} has no tokenizer files (tokenizer.json or vocab+merges)")
    return dict(state), tokenizer, config


def setup(resolved: Resolved[SftConfig], where: Host, sources: Sources) -> Trainer:
    cfg = resolved.cfg
    data = sources.read_data(cfg)
    weights, tokenizer = sources.weights, sources.tokenizer
    if weights is not None and cfg.head.gpt1 and cfg.head.special_tokens == "add":
        weights = with_new_rows(weights, cfg.model, list(sources.ids.values()), cfg.seed)
    if weights is not None and cfg.lora.enabled:
        weights = lora.base_names(weights, cfg.lora)
    sources.weights = None  # the engine holds the weights from here on
    run = start_run(resolved, where)
    ranks = run.ranks
    epochs = cfg.max_steps * cfg.global_batch_size / len(data.items)
    log.info(
        "%s; %d steps of %d (%.2f epochs)",
        data.summary,
        cfg.max_steps,
        cfg.global_batch_size,
        epochs,
    )
    identity = {
        "model": model_identity(cfg.model),
        "base": {"name": sources.base.name} if sources.base else None,
        "lora": asdict(cfg.lora) if cfg.lora.enabled else None,
        "task": asdict(cfg.head) if cfg.head.enabled else None,
        "data": {
            **data_identity(cfg, tokenizer),
            "global_batch_size": cfg.global_batch_size,
            "seq_len": cfg.seq_len,
            "rows": data.layout,
        },
    }
    factory = ModelFactory(
        cfg.model,
        head=data.head,
        lm_coef=cfg.head.lm_coef,
        lora=cfg.lora if cfg.lora.enabled else None,
        center_rewards=cfg.head.center_rewards_coefficient,
        compile=cfg.compile,
    )
    engine, state, _ = open_engine(
        "sft",
        resolved,
        run,
        identity,
        factory,
        weights,
        doing="fine-tuning",
        details=head_summary(cfg) if data.head else "",
        origin=cfg.base if sources.base else "fresh weights",
    )
    del weights
    stream = RowStream(data.items, cfg.sft.seed)
    batches = data.batches(
        stream,
        ranks.rank,
        ranks.world_size,
        cfg.micro_batch_size,
        run.accumulation,
        tokenizer.eod_id,
    )
    meta = checkpoint_meta(engine.spec.layout, identity, cfg.model, tokenizer)
    meta |= {"lora": identity["lora"], "head": asdict(data.head) if data.head else None}
    return Trainer(
        cfg=cfg,
        run=run,
        tokenizer=tokenizer,
        batches=batches,
        engine=engine,
        schedule=Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step),
        meta=meta,
        state=state,
        evaluators=evaluators(cfg, data, tokenizer),
        step_metrics=reward.METRICS if cfg.head.type == "reward" else (),
    )


def head_summary(cfg: SftConfig) -> str:
    h = cfg.head
    if h.type != "reward":
        return f"; {h.type} head, lm_coef {h.lm_coef}"
    center = h.center_rewards_coefficient
    return "; reward head, Bradley-Terry loss" + (f", centering {center}" if center else "")


def evaluators(cfg: SftConfig, data: FineTuneData, tokenizer) -> list[Evaluator]:
    """What every validation measures: the loss on responses and sample answers (lm), the
    task head's loss, accuracy and F1, or a reward model's loss, accuracy and margin."""
    if not data.validation:
        return []
    pad = tokenizer.eod_id
    if data.head is not None and data.head.type == "reward":
        return [RewardMetrics(data.validation, cfg.micro_batch_size, pad)]
    if data.head is not None:
        return [TaskMetrics(data.validation, data.head, cfg.micro_batch_size, pad)]
    return [
        ResponseLoss(data.validation_rows, cfg.micro_batch_size, pad),
        Answers(data.validation[: cfg.samples], tokenizer, cfg.sample_max_new_tokens),
    ]


def lora_hook(cfg: SftConfig | DpoConfig) -> Hook:
    """At the end of a LoRA run: the adapters in peft's format (run_dir/adapter), and the
    merged model for the hooks after it (none with lora.merge=false)."""
    base = cfg.base if Path(cfg.base).exists() else None  # None: a fresh model's

    def finish(f: Finished) -> None:
        if f.head is not None:  # the head trained whole: the merged model is the whole result
            log.info("LoRA with a %s head: the merged model carries both", f.head.type)
            f.weights = lora.merge(f.weights, cfg.lora)
            return
        directory = f.run_dir / "adapter"
        save_adapter(directory, f.weights, cfg.lora, cfg.model, base=base)
        log.info(
            "LoRA adapters: %s (peft format, for %s)",
            directory,
            f"{base}'s Hugging Face export" if base else "the fresh base model (not saved)",
        )
        if not cfg.lora.merge:
            log.info("lora.merge=false: no merged model written")
            f.weights = None
            return
        f.weights = lora.merge(f.weights, cfg.lora)

    return finish
