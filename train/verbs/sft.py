"""`neo sft`: supervised fine-tuning of a causal LM on instruction, completion or chat data, with
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

import hashlib
import logging
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from data_prep.tokenizers import LoadedTokenizer, load_tokenizer
from train.checkpoints.load import read_any
from train.checkpoints.model_format import TIED
from train.config import ConfigError, GenerationConfig, ModelConfig, SftConfig, TaskHead
from train.data.packing import (
    RowStream,
    SftBatches,
    collate,
    pack,
    pack_bins,
    padded_rows,
    padding_share,
)
from train.data.sft import CHAT_TEMPLATES, IGNORE, Example, read_examples
from train.data.tasks import (
    TaskBatches,
    TaskExample,
    collate_examples,
    head_of,
    read_task_examples,
    special_tokens,
)
from train.distributed.collectives import all_sum
from train.distributed.ranks import ranks_from_env
from train.errors import NotFound
from train.loop.fit import Trainer
from train.loop.optim import Schedule
from train.loop.run import (
    build_or_resume,
    checkpoint_meta,
    start_run,
    train_and_finish,
    trainer_fields,
    write_config,
)
from train.model import lora
from train.model.decoding import generate_ids
from train.verbs.info import count_parameters

log = logging.getLogger("neo.sft")
SAMPLES = Path(__file__).parents[1] / "data_prep" / "sample"
BUNDLED = SAMPLES / "sft_instructions.jsonl"
BUNDLED_CLASSIFICATION = SAMPLES / "sft_classification.jsonl"  # task=classification's default


def run(cfg: SftConfig) -> None:
    trainer = setup(cfg)
    train_and_finish(trainer, adapters_out(cfg) if cfg.lora.enabled else None)


def adapters_out(cfg: SftConfig):
    """At the end of a LoRA run: the adapters in peft's format (run_dir/adapter), and the
    merged model to save and export (None with lora.merge=false)."""
    base = cfg.base if Path(cfg.base).exists() else None  # None: a fresh model's

    def final(weights: dict) -> dict | None:
        if cfg.task.head:  # the head trained whole: the merged model is the whole result
            log.info("LoRA with a %s head: the merged model carries both", cfg.task.type)
            return lora.merge(weights, cfg.lora)
        directory = Path(cfg.run_dir) / "adapter"
        lora.save_adapter(directory, weights, cfg.lora, cfg.model, base=base)
        log.info(
            "LoRA adapters: %s (peft format, for %s)",
            directory,
            f"{base}'s Hugging Face export" if base else "the fresh base model (not saved)",
        )
        if not cfg.lora.merge:
            log.info("lora.merge=false: no merged model written")
            return None
        return lora.merge(weights, cfg.lora)

    return final


@dataclass
class Prepared:
    """The training data of a run, in the form the loop takes."""

    items: list  # packed or padded rows (lm), or task examples
    batches: type  # SftBatches or TaskBatches
    summary: str  # for the log
    validation: object | None  # the verb's validation (Trainer.extra_validation)
    head: TaskHead | None = None
    layout: str | None = None  # digest of the packing: a resume must find the same rows


def setup(cfg: SftConfig) -> Trainer:
    cfg.sft.validate()
    if not ranks_from_env().is_main:  # quiet before the data is read, as start_run makes it
        logging.getLogger().setLevel(logging.WARNING)
    weights, tokenizer, base_identity = read_base(cfg)
    if cfg.task.head:
        data, weights = prepare_task(cfg, tokenizer, weights)
    else:
        data = prepare_lm(cfg, tokenizer)
    if cfg.epochs is not None:
        cfg.max_steps = max(1, math.ceil(cfg.epochs * len(data.items) / cfg.global_batch_size))
    run = start_run(cfg)
    ranks = run.ranks
    log.info(
        "%s; %d steps of %d (%s epochs)",
        data.summary,
        cfg.max_steps,
        cfg.global_batch_size,
        f"{cfg.max_steps * cfg.global_batch_size / len(data.items):.2f}",
    )
    identity = {
        "model": {k: v for k, v in asdict(cfg.model).items() if k != "attention_backend"},
        "base": base_identity,
        "lora": asdict(cfg.lora) if cfg.lora.enabled else None,
        "task": asdict(cfg.task) if cfg.task.head else None,
        "data": {
            **data_identity(cfg, tokenizer),
            "global_batch_size": cfg.global_batch_size,
            "seq_len": cfg.seq_len,
            "rows": data.layout,
        },
    }
    if cfg.lora.enabled and weights is not None:
        weights = lora.base_names(weights, cfg.lora)
    engine, state, spec, resume = build_or_resume(
        cfg, run, identity, weights, cfg.lora if cfg.lora.enabled else None,
        head=data.head, lm_coef=cfg.task.lm_coef,
    )  # fmt: skip
    del weights
    if ranks.is_main:
        write_config("sft", cfg, run)
    log.info(
        "fine-tuning %s (%s parameters%s%s) from %s on %d x %s, ZeRO-%d, %s, accumulation %d; "
        "run dir %s%s",
        cfg.model.name,
        f"{count_parameters(cfg.model).total:,}",
        f"; LoRA r={cfg.lora.r} on {'/'.join(cfg.lora.target_modules)}: "
        f"{_trainable(engine):,} trainable"
        if cfg.lora.enabled
        else "",
        f"; {cfg.task.type} head, lm_coef {cfg.task.lm_coef}" if data.head else "",
        cfg.base if base_identity else "fresh weights",
        ranks.world_size,
        run.acc.kind,
        cfg.deepspeed.zero_stage,
        run.precision,
        run.accumulation,
        cfg.run_dir,
        f"; resumed at step {state.step}" if resume else "",
    )
    engine.train()
    stream = RowStream(data.items, cfg.sft.seed)
    batches = data.batches(stream, ranks.rank, ranks.world_size, cfg.micro_batch_size,
                           run.accumulation, tokenizer.eod_id)  # fmt: skip
    meta = checkpoint_meta(spec, identity, cfg.model, tokenizer)
    return Trainer(
        cfg=cfg,
        **trainer_fields(run),
        tokenizer=tokenizer,
        batches=batches,
        engine=engine,
        schedule=Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step),
        meta={
            **meta,
            "lora": identity["lora"],
            "head": asdict(data.head) if data.head else None,
        },  # fmt: skip
        state=state,
        extra_validation=data.validation,
    )


def prepare_lm(cfg: SftConfig, tokenizer) -> Prepared:
    train, validation = read_data(cfg, tokenizer)
    if cfg.sft.packing:
        bins = pack_bins([len(e) for e in train], cfg.seq_len)
        rows = pack(train, cfg.seq_len, tokenizer.eod_id, bins)
        padding, layout = padding_share(rows), hashlib.sha256(repr(bins).encode()).hexdigest()
    else:
        rows, layout = padded_rows(train), None
        padding = _padding_if_padded(rows, cfg)
    summary = (
        f"{len(train)} training examples in {len(rows)} rows "
        f"({'packed' if cfg.sft.packing else 'one per row'}, {100 * padding:.1f}% padding), "
        f"{len(validation)} validation examples"
    )
    check = SftValidation(cfg, validation, tokenizer) if validation else None
    return Prepared(rows, SftBatches, summary, check, layout=layout)


def prepare_task(cfg: SftConfig, tokenizer, weights: dict | None) -> tuple[Prepared, dict | None]:
    """GPT-1's task data: the special tokens (added to the vocabulary, or mapped), the
    examples and their labels, and the base weights with room for the added tokens."""
    task, s = cfg.task, cfg.sft
    ids = special_tokens(task, tokenizer)
    if tokenizer.vocab_size > cfg.model.vocab_size:
        cfg.model = replace(cfg.model, vocab_size=tokenizer.vocab_size)
    if weights is not None and task.special_tokens == "add":
        weights = with_new_rows(weights, cfg.model, list(ids.values()), cfg.seed)
    labels = None  # the training file's; the validation file must use them

    def read(path: str):
        nonlocal labels
        out, labels = read_task_examples(path, task, tokenizer, ids, cfg.seq_len, labels,
                                         strict=s.strict, split=s.split)  # fmt: skip
        return out

    train, validation = read_split(cfg, read)
    head = head_of(task, labels, ids)
    summary = (
        f"{len(train)} training and {len(validation)} validation examples ({task.type}"
        + (f": {len(labels)} labels, {', '.join(labels)}" if task.type != "multiple_choice"
           else f": {len(train[0].sequences)} choices")
        + f"; special tokens {'added' if task.special_tokens == 'add' else 'mapped'}, ids {ids})"
    )  # fmt: skip
    check = TaskValidation(cfg, validation, head, tokenizer.eod_id) if validation else None
    return Prepared(train, TaskBatches, summary, check, head), weights


def with_new_rows(weights: dict, model: ModelConfig, ids: list[int], seed: int) -> dict:
    """The embedding grown to model.vocab_size, the added tokens' rows drawn from
    N(0, initializer_range) as GPT-1 initialised its special tokens (seeded)."""
    wte = weights["transformer.wte.weight"]
    grown = torch.zeros(model.vocab_size, wte.shape[1], dtype=wte.dtype)
    grown[: wte.shape[0]] = wte
    generator = torch.Generator().manual_seed(seed)
    for i in sorted(ids):
        grown[i].normal_(0.0, model.initializer_range, generator=generator)
    return {**weights, "transformer.wte.weight": grown, TIED: grown}


def _split(examples: list, fraction: float, seed: int) -> tuple[list, list]:
    """A seeded `fraction` of the examples held out for validation (at least one left)."""
    order = np.random.default_rng(seed).permutation(len(examples))
    n = min(int(round(fraction * len(examples))), len(examples) - 1)
    validation = [examples[i] for i in sorted(order[:n])]
    return [examples[i] for i in sorted(order[n:])], validation


def _trainable(engine) -> int:
    """Trainable parameters (ZeRO-3 partitions them: ds_numel is the whole count)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in engine.module.parameters()
               if p.requires_grad)  # fmt: skip


def read_base(cfg: SftConfig) -> tuple[dict | None, LoadedTokenizer, dict | None]:
    """The base model's weights and tokenizer; cfg.model becomes its config. Without the demo
    model: fresh weights of cfg.model and the GPT-2 tokenizer, said so."""
    if not Path(cfg.base).exists():
        if cfg.base != "runs/demo":
            raise NotFound(f"base={cfg.base} does not exist")
        log.warning(
            "base=runs/demo does not exist (`make demo` makes it): fine-tuning a fresh %s model "
            "instead; pass base=PATH to start from a trained one",
            cfg.model.name,
        )
        return None, load_tokenizer("gpt2"), None
    config, state, tokenizer = read_any(cfg.base)
    if tokenizer is None:
        raise NotFound(f"base={cfg.base} has no tokenizer files (tokenizer.json or vocab+merges)")
    # The base decides the architecture; how attention is computed stays the user's choice.
    cfg.model = replace(config, attention_backend=cfg.model.attention_backend)
    # Identified by what it is, not where: a moved base still resumes (its weights are in the
    # checkpoints by then).
    return dict(state), tokenizer, {"name": config.name}


def read_data(cfg: SftConfig, tokenizer) -> tuple[list[Example], list[Example]]:
    """Training and validation examples (a file of its own, or a seeded fraction)."""
    s = cfg.sft
    template = CHAT_TEMPLATES.get(s.chat_template, s.chat_template)
    common = dict(fields=s.fields, train_on_prompt=s.train_on_prompt,
                  chat_template=template, strict=s.strict, split=s.split)  # fmt: skip
    return read_split(
        cfg, lambda path: read_examples(path, s.format, tokenizer, cfg.seq_len, **common)
    )


def read_split(cfg: SftConfig, read) -> tuple[list, list]:
    """Training and validation examples: `read(path)` of sft.path and of sft.validation_path,
    or a seeded sft.validation_fraction of sft.path held out."""
    s = cfg.sft
    path = default_path(cfg)
    examples = _reported(path, read(path)).examples
    if s.validation_path:
        train, validation = examples, _reported(s.validation_path, read(s.validation_path)).examples
    else:
        train, validation = _split(examples, s.validation_fraction, s.seed)
    if not train:
        raise ConfigError(f"{path}: no usable training example")
    return train, validation


def default_path(cfg: SftConfig) -> str:
    """sft.path, or the bundled sample for the task."""
    return cfg.sft.path or str(BUNDLED_CLASSIFICATION if cfg.task.head else BUNDLED)


def _reported(path: str, read):
    """`read` (examples of `path`), its skipped and truncated records logged."""
    if read.skipped.count:
        log.warning("%s: %d bad records skipped, first: %s", path, read.skipped.count,
                    read.skipped.examples[0])  # fmt: skip
    if read.truncated:  # prompts lose tokens from the left; task texts from their end
        log.warning("%s: %d examples longer than the context were truncated to fit",
                    path, read.truncated)  # fmt: skip
    return read


def _padding_if_padded(rows, cfg: SftConfig) -> float:
    """Padding share when each micro-batch pads to its longest row (rows in file order)."""
    m = cfg.micro_batch_size
    lengths = [len(r["input_ids"]) for r in rows]
    padded = sum(max(lengths[i : i + m]) * len(lengths[i : i + m]) for i in range(0, len(rows), m))
    return 1 - sum(lengths) / padded


def data_identity(cfg: SftConfig, tokenizer) -> dict:
    """What decides the rows and their order: the data files by content, and the settings."""
    files = {}
    for path in filter(None, [default_path(cfg), cfg.sft.validation_path]):
        if Path(path).is_file():
            files[Path(path).name] = hashlib.sha256(Path(path).read_bytes()).hexdigest()
        else:
            files[path] = None  # hf:NAME
    settings = asdict(cfg.sft)
    for key in ("path", "validation_path", "strict"):
        settings.pop(key)
    return {"files": files, **settings, "tokenizer": tokenizer.file_hashes()}


class SftValidation:
    """Loss on the validation examples' trained tokens (responses), and greedy answers to the
    first `samples` validation prompts. Under ZeRO 0-2 the ranks split the rows and rank 0
    answers; under ZeRO-3 every rank runs every forward, answers included (the weights are
    partitioned)."""

    def __init__(self, cfg: SftConfig, examples: list[Example], tokenizer):
        self.cfg, self.tokenizer = cfg, tokenizer
        pad = tokenizer.eod_id
        self.rows = pack(examples, cfg.seq_len, pad) if cfg.sft.packing else padded_rows(examples)
        self.prompts = [
            (e.input_ids[: e.prompt_length],
             tokenizer.decode([t for t in e.labels if t != IGNORE][:-1]))
            for e in examples[: cfg.samples]
        ]  # fmt: skip

    def __call__(self, t: Trainer) -> dict:
        split = self.cfg.deepspeed.zero_stage < 3
        rank, world = (t.ranks.rank, t.ranks.world_size) if split else (0, 1)
        model = t.engine.module
        model.eval()
        sums = torch.zeros(2, dtype=torch.float64, device=t.device)  # loss sum, targets
        m = self.cfg.micro_batch_size
        with torch.no_grad():
            chunks = range(0, len(self.rows), m)
            for first in list(chunks)[rank::world]:
                arrays = collate(self.rows[first : first + m], self.tokenizer.eod_id)
                batch = {k: torch.from_numpy(v).to(t.device) for k, v in arrays.items()}
                n = int((batch["targets"] != IGNORE).sum())
                sums += torch.tensor([float(model(**batch)) * n, n], device=t.device)
        if split:
            all_sum(sums)
        loss = float(sums[0] / sums[1])
        values: dict = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        # ZeRO-3: every rank decodes the same greedy answers in step (each forward gathers the
        # partitioned weights with collectives every rank must join); rank 0 reports them.
        if self.prompts and (t.ranks.is_main or not split):
            answers = self.answers(model, t.device)
            if t.ranks.is_main:
                values["samples"] = answers
        model.train()
        return values

    def answers(self, model, device) -> list[dict]:
        config = GenerationConfig(max_new_tokens=self.cfg.sample_max_new_tokens, truncate="left")
        outputs = generate_ids(model, [p for p, _ in self.prompts], config,
                               eos_id=self.tokenizer.eod_id, device=device)  # fmt: skip
        answers = []
        for (prompt, reference), (out,) in zip(self.prompts, outputs, strict=True):
            ids = out.token_ids[:-1] if out.finish_reason == "eos" else out.token_ids
            answers.append({
                "prompt": self.tokenizer.decode(prompt),
                "answer": self.tokenizer.decode(ids),
                "reference": reference,
            })  # fmt: skip
        return answers


class TaskValidation:
    """A task head's validation: the task loss, accuracy and macro-F1 (classes; multiple
    choice: accuracy over choices) on the validation examples, the ranks splitting them under
    ZeRO 0-2 (every rank runs them all under ZeRO-3)."""

    def __init__(self, cfg: SftConfig, examples: list[TaskExample], head: TaskHead, pad: int):
        self.cfg, self.examples, self.head, self.pad = cfg, examples, head, pad
        self.classes = len(examples[0].sequences) if head.type == "multiple_choice" else len(
            head.labels)  # fmt: skip

    def __call__(self, t: Trainer) -> dict:
        split = self.cfg.deepspeed.zero_stage < 3
        rank, world = (t.ranks.rank, t.ranks.world_size) if split else (0, 1)
        model = t.engine.module
        model.eval()
        # confusion[gold, predicted], and the summed task loss
        confusion = torch.zeros(self.classes, self.classes, dtype=torch.float64, device=t.device)
        loss = torch.zeros((), dtype=torch.float64, device=t.device)
        m = self.cfg.micro_batch_size
        with torch.no_grad():
            for first in list(range(0, len(self.examples), m))[rank::world]:
                arrays = collate_examples(self.examples[first : first + m], self.pad)
                batch = {k: torch.from_numpy(v).to(t.device) for k, v in arrays.items()}
                logits, _ = model.classify(batch["input_ids"], batch["classify_at"])
                gold = batch["targets"]
                loss += torch.nn.functional.cross_entropy(logits.float(), gold, reduction="sum")
                ones = torch.ones_like(gold, dtype=torch.float64)
                confusion.index_put_((gold, logits.argmax(-1)), ones, accumulate=True)
        if split:
            all_sum(confusion)
            all_sum(loss)
        model.train()
        return classification_metrics(confusion, float(loss), self.head.type != "multiple_choice")


def classification_metrics(confusion: torch.Tensor, loss_sum: float, f1: bool) -> dict:
    """Accuracy and macro-F1 (the mean over classes of 2PR/(P+R); a class never predicted and
    never gold is left out) from confusion[gold, predicted]."""
    total = float(confusion.sum())
    values = {"val/task_loss": loss_sum / total, "val/accuracy": float(confusion.trace()) / total}
    if f1:
        tp = confusion.diag()
        gold, predicted = confusion.sum(1), confusion.sum(0)
        present = (gold + predicted) > 0
        scores = 2 * tp[present] / (gold[present] + predicted[present])
        values["val/macro_f1"] = float(scores.mean())
    return values
