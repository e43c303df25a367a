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
import sys
from dataclasses import asdict, replace
from pathlib import Path

import torch
from omegaconf import OmegaConf

from data_prep.config import PrepConfig
from data_prep.files import atomic_write_text
from data_prep.manifest import MANIFEST_FILE
from data_prep.prep import prepare
from train import accelerator as accel
from train import engine as ds_engine
from train import machine as hw
from train.checkpoint import save_checkpoint
from train.config import ConfigError, TrainConfig
from train.data.pretrain import TrainingData
from train.data.pretrain import load as load_data
from train.errors import CheckpointError
from train.evals.suite import PreparedTask, prepare_task, prepare_tasks, select_tasks
from train.evals.val import load_blend_val
from train.export import export_hf
from train.info import count_parameters
from train.loop.checkpoints import RunCheckpoints, run_identity
from train.loop.distributed import barrier
from train.loop.fit import Trainer, fit
from train.loop.metrics import plot_run
from train.loop.state import TrainState
from train.optim import Schedule

log = logging.getLogger("neo.train")


def run(cfg: TrainConfig) -> None:
    t = setup(cfg)
    if not fit(t):
        return  # stopped by a signal, after saving: the same command resumes
    weights = ds_engine.full_state_dict(t.engine)  # every rank takes part (ZeRO-3 gathers)
    if t.ranks.is_main:
        finish(Path(cfg.run_dir), cfg, t.data, weights)
    barrier()


def setup(cfg: TrainConfig) -> Trainer:
    """Check the config, start the process group, open the data, build (or resume) the engine.
    Every mistake a user can make surfaces here, before the first step; every rule of the
    config itself before the process group starts."""
    ranks = accel.ranks_from_env()
    accumulation = cfg.validate(ranks.world_size)
    if not ranks.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    acc = accel.select(cfg.accelerator)
    # eval.tasks: every file found before anything starts (val reads this run's data).
    benchmarks = select_tasks(cfg.eval, default_set=False, val_path=cfg.data.path)
    ckpts = RunCheckpoints(Path(cfg.run_dir), cfg.keep_last, ranks.rank, acc)
    if cfg.resume == "never" and ckpts.exist():
        raise ConfigError(
            f"resume=never, but {ckpts.directory} holds checkpoints; choose another run_dir"
        )
    machine = hw.describe(acc)
    precision, reason = hw.resolve_precision(cfg.precision, acc, machine)
    accel.prepare_environment(acc, ranks)
    acc.set_device(ranks.local_rank)
    device = acc.device(ranks.local_rank)
    ds_engine.init_distributed(acc)

    peak = None
    if ranks.is_main:
        prepare_default_data(cfg)
        if cfg.precision == "auto":
            log.info("precision auto -> %s: %s", precision, reason)
        elif precision == "bf16" and (warning := hw.bf16_slowdown_warning(acc, machine, device)):
            log.warning(warning)
        # Measured while the other ranks wait at the barrier below, so they do not compete.
        peak = cfg.peak_flops or hw.matmul_peak(hw.DTYPES[precision], acc, machine, device)
    barrier()
    data = load_data(cfg.data, cfg.seq_len, cache_dir=Path(cfg.run_dir) / "data_index")
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"{cfg.data.path}: the tokenizer has {data.vocab_size} tokens, more than "
            f"model.vocab_size={cfg.model.vocab_size}"
        )
    context = cfg.model.max_position_embeddings
    max_length = min(cfg.eval.max_length or context, context)
    prepared = prepare_tasks(cfg.eval, benchmarks, data.tokenizer, max_length)
    validation = validation_task(cfg, data, max_length)
    spec = ds_engine.EngineSpec(
        cfg.model,
        cfg.deepspeed,
        cfg.optim,
        precision,
        cfg.micro_batch_size,
        accumulation,
        ranks.world_size,
    )
    identity = run_identity(cfg, data.identity)
    resume = ckpts.plan_resume(identity, spec.layout)
    weights = None
    if resume and resume.mode == "consolidated":
        weights = ds_engine.consolidated_state_dict(resume.directory, resume.tag)
    # Dropout draws from the global generator: seeded per rank, checkpointed, restored.
    torch.manual_seed(cfg.seed + ranks.rank)
    engine = ds_engine.build_engine(
        spec,
        acc,
        device,
        cfg.seed,
        weights,
        load_universal=bool(resume and resume.mode == "universal"),
    )
    state = ckpts.resume(engine, resume, ranks.rank) if resume else TrainState()
    if ranks.is_main:
        Path(cfg.run_dir).mkdir(parents=True, exist_ok=True)
        write_config(Path(cfg.run_dir), cfg, precision, reason, machine)
    log.info(
        "training %s (%s parameters) on %d x %s, ZeRO-%d, %s, global batch %d x %d tokens, "
        "accumulation %d; run dir %s%s",
        cfg.model.name,
        f"{count_parameters(cfg.model).total:,}",
        ranks.world_size,
        acc.kind,
        cfg.deepspeed.zero_stage,
        precision,
        cfg.global_batch_size,
        cfg.seq_len,
        accumulation,
        cfg.run_dir,
        f"; resumed at step {state.step}" if resume else "",
    )
    engine.train()
    return Trainer(
        cfg=cfg,
        ranks=ranks,
        acc=acc,
        device=device,
        machine=machine,
        precision=precision,
        precision_reason=reason,
        peak_flops=peak,
        data=data,
        engine=engine,
        accumulation=accumulation,
        schedule=Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step),
        checkpoints=ckpts,
        meta={
            **asdict(spec.layout),  # world_size, zero_stage, precision
            "identity": identity,
            "model": asdict(cfg.model),
            "eod_token": data.tokenizer.eod_token,
            "tokenizer_name": data.tokenizer.name,
        },
        state=state,
        validation=validation,
        benchmarks=prepared,
    )


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


def finish(run_dir: Path, cfg: TrainConfig, data: TrainingData, weights: dict) -> None:
    """The final fp32 weights as run_dir/model, exported to run_dir/hf; the loss curve."""
    save_checkpoint(run_dir / "model", cfg.model, weights, data.tokenizer, overwrite=True)
    log.info("final weights: %s (neotrain checkpoint)", run_dir / "model")
    if cfg.export_hf:
        try:
            export_hf(run_dir / "model", run_dir / "hf", overwrite=True)
            log.info("exported %s (GPTNeoForCausalLM)", run_dir / "hf")
        except CheckpointError as e:  # strided layers have no GPT-Neo form
            log.warning("no Hugging Face export: %s", e)
    plot_run(run_dir)
    log.info("loss curve: %s", run_dir / "loss.png")


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


def write_config(
    run_dir: Path, cfg: TrainConfig, precision: str, reason: str, machine: hw.Machine
) -> None:
    """The config as it ran: `precision` is what it resolved to on this machine; the comments
    say how, and which machine it was."""
    text = OmegaConf.to_yaml(OmegaConf.structured(replace(cfg, precision=precision)))
    header = [
        f"# neo train {' '.join(sys.argv[1:])}",
        f"# precision: {cfg.precision} -> {precision} ({reason})",
        f"# machine: {machine.summary()} per rank",
    ]
    atomic_write_text(run_dir / "config.yaml", "\n".join(header) + "\n" + text)
