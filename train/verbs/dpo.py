"""`neo dpo`: direct preference optimization (Rafailov et al. 2023) of a causal LM on pairs of
a preferred and a rejected response, with TRL's losses and metric names and `neo sft`'s
machinery (DeepSpeed ZeRO, precision, accumulation, schedule, exact resume, SIGTERM/SIGUSR1
save, metrics, export).

    neo dpo                                   # the demo's SFT model on the bundled pairs
    neo dpo base=runs/demo-sft dpo.path=pairs.jsonl dpo.beta=0.1 deepspeed=zero2

The reference is the base model itself: its log-probabilities of every training and
validation pair are computed once, before the engine is built, and stored in
run_dir/reference_logps.safetensors (train/loop/reference.py); the reference model is freed
before training starts, so one model's weights are resident while it trains, and a resume reads
the file instead of scoring the reference again. Each micro-batch holds its pairs' chosen
sequences then their rejected ones, packed into rows of the context (dpo.packing) or one per
row, padded (train/data/preference.py); the reference is scored in the same layout. Training
steps log TRL's `rewards/chosen`, `rewards/rejected`, `rewards/accuracies`, `rewards/margins`,
`logps/chosen`, `logps/rejected`; validations the same on the validation pairs as `val/...`
(this project's name for a run's own validation data), with `val/loss`, greedy answers to a
few prompts, and whether the greedy answers to the held-out prompts are closer to the chosen
responses than to the rejected ones (`val/answers/...`, train/loop/style.py). A fresh run
validates the base first, as step 0: the starting point of each of those numbers.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from pathlib import Path

import torch

from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.checkpoints.load import read_any
from train.checkpoints.run_format import latest_tag
from train.config.dpo import DpoConfig
from train.config.model import ModelConfig
from train.config.resolve import Resolved, resolve_dpo
from train.data.dpo import (
    PairBatches,
    PreferenceData,
    answer_examples,
    data_identity,
    read_preference,
)
from train.data.packing import RowStream
from train.distributed import machine as hw
from train.distributed.collectives import all_sum, barrier
from train.distributed.machine import Host, host
from train.errors import NotFound
from train.loop import reference
from train.loop.checkpointing import model_identity
from train.loop.evaluators import Answers, AnswerStyle, PreferenceMetrics
from train.loop.finish import standard_hooks, train_and_finish
from train.loop.fit import Trainer
from train.loop.optim import Schedule
from train.loop.run import RunStart, checkpoint_meta, open_engine, start_run
from train.model import lora
from train.model.factory import ModelFactory
from train.model.gpt import GPT
from train.model.preference import METRICS, DpoLoss
from train.verbs.sft import lora_hook

log = logging.getLogger("neo.dpo")
DEMO_SFT, DEMO = "runs/demo-sft", "runs/demo"


def main(cfg: DpoConfig) -> None:
    where = host(cfg.accelerator)
    sources = Sources(cfg)
    resolved = resolve_dpo(cfg, where.world, sources)
    trainer = setup(resolved, where, sources)
    hooks = standard_hooks(resolved.cfg.export_hf)
    if resolved.cfg.lora.enabled:
        hooks.insert(0, lora_hook(resolved.cfg))
    train_and_finish(trainer, hooks)


class Sources:
    """What neo dpo reads to resolve its config (train/config/resolve.py SftSources): the
    base checkpoint (the policy's start and the reference), its tokenizer and the pairs."""

    def __init__(self, cfg: DpoConfig):
        self.cfg = cfg
        self.weights: dict | None = None
        self.tokenizer: LoadedTokenizer | None = None
        self.base: ModelConfig | None = None
        self.used_base: str | None = None  # the directory read (None: fresh weights)
        self.data: PreferenceData | None = None

    def base_model(self) -> ModelConfig | None:
        self.used_base = find_base(self.cfg.base)
        if self.used_base is None:
            self.tokenizer = load_tokenizer("gpt2")
            return None
        config, state, self.tokenizer = read_any(self.used_base)
        if self.tokenizer is None:
            raise NotFound(f"base={self.used_base} has no tokenizer files")
        self.weights, self.base = dict(state), config
        return config

    def tokenizer_size(self) -> int:
        return self.tokenizer.vocab_size

    def training_rows(self, cfg: DpoConfig) -> int:
        return len(self.read_data(cfg).train)

    def read_data(self, cfg: DpoConfig) -> PreferenceData:
        if self.data is None:
            self.data = read_preference(cfg, self.tokenizer)
        return self.data


def find_base(base: str) -> str | None:
    """`base`, or for the default (the demo's SFT model) when `make demo` has not made it: the
    demo's pretrained model, else None (fresh weights); each fallback said."""
    if Path(base).exists():
        return base
    if base != DEMO_SFT:
        raise NotFound(f"base={base} does not exist")
    if Path(DEMO).exists():
        log.warning("base=%s does not exist (`make demo` makes it): tuning %s instead", base, DEMO)
        return DEMO
    log.warning(
        "base=%s does not exist (`make demo` makes it), nor %s: tuning a fresh model (its own "
        "reference); pass base=PATH to start from a trained one",
        base,
        DEMO,
    )
    return None


def setup(resolved: Resolved[DpoConfig], where: Host, sources: Sources) -> Trainer:
    cfg = resolved.cfg
    data = sources.read_data(cfg)
    tokenizer = sources.tokenizer
    weights = sources.weights if sources.weights is not None else fresh_weights(cfg)
    sources.weights = None  # the engine holds the weights from here on
    run = start_run(resolved, where)
    ranks = run.ranks
    log.info(
        "%s; %d steps of %d pairs (%.2f epochs); %s loss, beta %g",
        data.summary,
        cfg.max_steps,
        cfg.global_batch_size,
        cfg.max_steps * cfg.global_batch_size / len(data.train),
        cfg.dpo.loss_type,
        cfg.dpo.beta,
    )
    reference_logps(cfg, run, data, weights, tokenizer.eod_id)  # the base: adapters off
    if cfg.lora.enabled:
        weights = lora.base_names(weights, cfg.lora)
    identity = {
        "model": model_identity(cfg.model),
        "base": {"name": sources.base.name} if sources.base else None,
        "loss": asdict(DpoLoss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)),
        "lora": asdict(cfg.lora) if cfg.lora.enabled else None,
        "data": {
            **data_identity(cfg, tokenizer),
            "global_batch_size": cfg.global_batch_size,
            "seq_len": cfg.seq_len,
        },
    }
    loss = DpoLoss(cfg.dpo.beta, cfg.dpo.loss_type, cfg.dpo.label_smoothing)
    adapters = cfg.lora if cfg.lora.enabled else None
    factory = ModelFactory(cfg.model, lora=adapters, dpo=loss, compile=cfg.compile)
    engine, state, _ = open_engine(
        "dpo",
        resolved,
        run,
        identity,
        factory,
        weights,
        doing="preference-tuning",
        origin=sources.used_base or "fresh weights",
    )
    del weights
    pad = tokenizer.eod_id
    batches = PairBatches(
        data.train,
        cfg.dpo.seed,
        ranks.rank,
        ranks.world_size,
        cfg.micro_batch_size,
        run.accumulation,
        pad,
        packed_len(cfg),
    )
    meta = checkpoint_meta(engine.spec.layout, identity, cfg.model, tokenizer)
    meta |= {"lora": identity["lora"], "head": None}
    evaluators = []
    if data.validation:
        examples = answer_examples(data.validation, cfg.samples)
        evaluators = [
            PreferenceMetrics(data.validation, cfg.micro_batch_size, pad, packed_len(cfg)),
            Answers(examples, tokenizer, cfg.sample_max_new_tokens),
        ]
        if cfg.dpo.style_prompts:
            style = AnswerStyle(
                data.validation, tokenizer, cfg.sample_max_new_tokens, cfg.dpo.style_prompts
            )
            evaluators.append(style)
    return Trainer(
        cfg=cfg,
        run=run,
        tokenizer=tokenizer,
        batches=batches,
        engine=engine,
        schedule=Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step),
        meta=meta,
        state=state,
        evaluators=evaluators,
        step_metrics=METRICS,
        validate_at_start=True,
    )


def packed_len(cfg: DpoConfig) -> int | None:
    """The rows' length when dpo.packing packs the sequences (the context), else None."""
    return cfg.seq_len if cfg.dpo.packing else None


def fresh_weights(cfg: DpoConfig) -> dict[str, torch.Tensor]:
    """Without a base: a model initialised from cfg.seed, the policy's start and the
    reference both (the engine is given these weights, so they are the same)."""
    model = GPT(cfg.model).init_weights(torch.Generator().manual_seed(cfg.seed))
    return dict(model.state_dict())


def reference_logps(
    cfg: DpoConfig, run: RunStart, data: PreferenceData, weights: dict, pad_id: int
) -> None:
    """Attach the reference's log-probabilities to every pair: those stored with the run when
    it resumes from a checkpoint (never computed again), else computed now from the base
    weights, each rank scoring its share (reference.score), and stored by rank 0."""
    run_dir = Path(cfg.run_dir)
    splits = {"train": data.train, "validation": data.validation}
    if latest_tag(run.checkpoints.directory) is not None:
        logps = reference.load(run_dir, splits)
        log.info("reference log-probabilities: read from %s", run_dir / reference.REFERENCE_FILE)
    else:
        ranks = run.ranks
        logps = {}
        # training pairs in the micro-batches of the first epoch (PairBatches), validation
        # pairs in file order (PreferenceMetrics): each as the policy will first score it
        orders = {"train": RowStream(data.train, cfg.dpo.seed).order(0), "validation": None}
        for name, pairs in splits.items():
            share = reference.score(
                cfg.model,
                weights,
                pairs,
                run.device,
                hw.DTYPES[cfg.precision],
                cfg.micro_batch_size,
                pad_id,
                ranks.rank,
                ranks.world_size,
                packed_len(cfg),
                orders[name],
            )
            logps[name] = all_sum(share.to(run.device)).cpu() if ranks.world_size > 1 else share
        if ranks.is_main:
            file = reference.save(run_dir, splits, logps)
            log.info(
                "reference log-probabilities of %d pairs computed from the base on %d rank%s, "
                "stored in %s; the reference model is freed",
                sum(map(len, splits.values())),
                ranks.world_size,
                "s" if ranks.world_size > 1 else "",
                file,
            )
        barrier()  # the file is in place before any rank can save a checkpoint that needs it
    reference.attach(splits, logps)
