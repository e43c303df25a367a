"""`neo train`: causal-LM pretraining with DeepSpeed, resumable exactly.

    neo train                                    # tiny model, bundled sample, CPU, one process
    torchrun --nproc_per_node 2 -m train.cli train deepspeed=zero2
    neo train model=gpt_neo_1.3b data.path=/data/pile deepspeed=zero2 optim.lr=2e-4

The run directory holds the resolved config, metrics.jsonl, loss.png, checkpoints/ (DeepSpeed
shards + trainer_state.json per step, `latest`), and at the end model/ (consolidated neotrain
checkpoint) and hf/ (GPTNeoForCausalLM). Rerunning the same command resumes from `latest`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data_prep.config import PrepConfig
from data_prep.manifest import MANIFEST_FILE
from data_prep.prep import prepare
from train.config.resolve import Resolved, resolve_train
from train.config.train import TrainConfig
from train.data.pretrain import PretrainBatches, TrainingData
from train.data.pretrain import load as load_data
from train.distributed.machine import Host, host
from train.errors import ConfigError
from train.evals.evaluator import TaskEvaluator
from train.evals.suite import PreparedTask, prepare_task, prepare_tasks, select_tasks
from train.evals.val import load_blend_val
from train.loop.checkpointing import model_identity
from train.loop.finish import standard_hooks, train_and_finish
from train.loop.fit import Trainer
from train.loop.optim import Schedule
from train.loop.run import checkpoint_meta, open_engine, start_run
from train.model.factory import ModelFactory

log = logging.getLogger("neo.train")


def main(cfg: TrainConfig) -> None:
    where = host(cfg.accelerator)
    resolved = resolve_train(cfg, where.world)
    train_and_finish(setup(resolved, where), standard_hooks(resolved.cfg.export_hf))


def setup(resolved: Resolved[TrainConfig], where: Host) -> Trainer:
    """Start the process group, open the data, build (or resume) the engine. Every mistake a
    user can make surfaces here, before the first step; every rule of the config itself was
    applied by resolve, before the process group starts."""
    cfg = resolved.cfg
    # eval.tasks: every file found before anything starts.
    benchmarks = select_tasks(cfg.eval, default_set=False)
    run = start_run(resolved, where, on_main=lambda: prepare_default_data(cfg))
    ranks = run.ranks
    data = load_data(cfg.data, cfg.seq_len, cache_dir=Path(cfg.run_dir) / "data_index")
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{cfg.data.path}: the tokenizer has {data.vocab_size} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    context = cfg.model.max_position_embeddings
    max_length = min(cfg.eval.max_length or context, context)
    tasks = [validation_task(cfg, data, max_length)] + prepare_tasks(
        cfg.eval, benchmarks, data.tokenizer, max_length
    )
    evaluators = [
        TaskEvaluator(task, max_length, cfg.eval.batch_tokens, data.tokenizer.eod_id)
        for task in tasks
        if task is not None
    ]
    identity = run_identity(cfg, data.identity)
    factory = ModelFactory(cfg.model, compile=cfg.compile)
    engine, state, _ = open_engine("train", resolved, run, identity, factory, doing="training")
    batches = PretrainBatches(
        data.train,
        ranks.rank,
        ranks.world_size,
        cfg.micro_batch_size,
        run.accumulation,
        cfg.seq_len,
    )
    return Trainer(
        cfg=cfg,
        run=run,
        tokenizer=data.tokenizer,
        batches=batches,
        engine=engine,
        schedule=Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step),
        meta=checkpoint_meta(engine.spec.layout, identity, cfg.model, data.tokenizer),
        state=state,
        evaluators=evaluators,
    )


def run_identity(cfg: TrainConfig, data_identity: dict) -> dict:
    """What a checkpoint must match to continue this run: the model, and what decides the
    sample order (prepared data by content, not by path)."""
    return {
        "model": model_identity(cfg.model),
        "data": {**data_identity, "global_batch_size": cfg.global_batch_size},
    }


def validation_task(cfg: TrainConfig, data: TrainingData, max_length: int) -> PreparedTask | None:
    """The data's validation documents (each component's, within its source), every one up to
    eval_tokens, else a sample seeded by data.seed: the same at every validation and resume."""
    components = [(c.path, c.source) for c in cfg.data.blend] or [(cfg.data.path, None)]
    task = load_blend_val(components, data.tokenizer, cfg.eval_tokens, cfg.data.seed)
    if task is None:
        log.info("no validation documents in %s: no validation", cfg.data.path)
        return None
    tokens = sum(len(i.tokens) for i in task.items)
    whole = tokens == task.split_tokens
    log.info(
        "validation: %d of %d documents, %s of %s tokens (%s), per source: %s",
        len(task.items),
        task.split_documents,
        f"{tokens:,}",
        f"{task.split_tokens:,}",
        "the whole split" if whole else f"a seeded sample, eval_tokens={cfg.eval_tokens:,}",
        ", ".join(sorted({i.source for i in task.items})),
    )
    return prepare_task(task, data.tokenizer, max_length, 0, cfg.data.seed)


def prepare_default_data(cfg: TrainConfig) -> None:
    """`neo train` with no arguments: tokenize the bundled sample on first use."""
    default = PrepConfig()
    if (
        cfg.data.blend
        or cfg.data.path != default.output
        or (Path(default.output) / MANIFEST_FILE).exists()
    ):
        return
    log.info(
        "%s is not prepared yet: running neo prep on the bundled sample corpus", default.output
    )
    prepare(default)
