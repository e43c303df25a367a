"""One resolve per verb: every rule applied once, what the world decides filled in, the result
read-only, recorded in config.yaml, and refused by `neo launch` exactly as by the verb."""

import dataclasses
import json
import subprocess
import sys

import pytest
import yaml
from conftest import NEO

from train.config.model import ModelConfig
from train.config.resolve import World, resolve_sft, resolve_train
from train.config.sft import SftConfig
from train.config.train import TrainConfig
from train.errors import ConfigError

CPU = World(world_size=2, accelerator="cpu", native_bf16=False, bf16_reason="no bf16 here")


def test_a_resolved_config_is_read_only_and_the_given_one_untouched():
    given = TrainConfig()
    resolved = resolve_train(given, CPU)
    assert resolved.cfg.precision == "fp32" and resolved.precision_reason == "no bf16 here"
    assert resolved.accumulation == 1  # 8 = 4 x 2 ranks x 1
    assert given.precision == "auto"  # resolve works on its own copy
    for target, key in ((resolved.cfg, "max_steps"), (resolved.cfg.model, "hidden_size")):
        with pytest.raises(dataclasses.FrozenInstanceError):
            setattr(target, key, 1)
    given.max_steps = 3  # the user's object stays theirs


def test_muon_in_fp16_without_zero_is_refused():
    """DeepSpeed's ZeRO-0 fp16 optimizer flattens the parameters: Muon would see vectors and
    become SGD without a word. Under ZeRO (which gathers Muon's matrices) fp16 resolves."""
    gpu = World(world_size=1, accelerator="cuda", native_bf16=True)
    cfg = TrainConfig(precision="fp16")
    cfg.optim.name = "muon"
    with pytest.raises(ConfigError, match="optim.name=muon with precision=fp16 needs deepspeed="):
        resolve_train(cfg, gpu)
    cfg.deepspeed.zero_stage = 2
    assert resolve_train(cfg, gpu).cfg.precision == "fp16"


@pytest.mark.parametrize(
    ("accelerator", "native", "precision", "asked", "expected"),
    [
        ("cuda", True, "fp32", "auto", "bf16"),  # torch.optim.Muon's choice
        ("cpu", True, "bf16", "auto", "bf16"),
        ("cpu", True, "fp32", "auto", "bf16"),  # 0.27-0.32 s a step against 0.42-0.51 (README)
        ("cpu", False, "fp32", "auto", "fp32"),  # emulated bf16: slower than fp32
        ("cpu", None, "auto", "auto", "auto"),  # neo launch: the compute nodes decide
        ("cpu", True, "fp32", "bf16", "bf16"),
    ],
)
def test_muons_newton_schulz_precision_follows_the_device(
    accelerator, native, precision, asked, expected
):
    """optim.ns_precision=auto: bf16 where the device computes it natively, whatever the run's
    precision; fp32 where bf16 is emulated; left to the compute nodes where unknown (neo
    launch). An explicit choice is kept."""
    cfg = TrainConfig(precision=precision)
    cfg.optim.ns_precision = asked
    world = World(world_size=1, accelerator=accelerator, native_bf16=native)
    resolved = resolve_train(cfg, world).cfg
    assert resolved.optim.ns_precision == expected
    cfg.optim.ns_precision = "fp16"
    with pytest.raises(ConfigError, match="optim.ns_precision"):
        resolve_train(cfg, world)


def test_compile_under_zero3_is_refused():
    """DeepSpeed's zero.Init patches tensor construction, which torch.compile fails to trace
    (a TypeError at the first step, measured with two ranks); ZeRO-2 compiles and trains."""
    cfg = TrainConfig(compile=True)
    cfg.deepspeed.zero_stage = 3
    with pytest.raises(ConfigError, match="compile=true with deepspeed=zero3"):
        resolve_train(cfg, CPU)
    cfg.deepspeed.zero_stage = 2
    assert resolve_train(cfg, CPU).cfg.compile


class Sources:
    """What neo sft would read, counted."""

    def __init__(self, base=None, size=50257, rows=100):
        self.base, self.size, self.rows, self.asked = base, size, rows, []

    def base_model(self):
        self.asked.append("base")
        return self.base

    def tokenizer_size(self):
        return self.size

    def training_rows(self, cfg):
        self.asked.append(("rows", cfg.model.max_position_embeddings))
        return self.rows


def test_sft_takes_the_base_model_and_turns_epochs_into_steps():
    base = ModelConfig(
        name="base", max_position_embeddings=128, num_layers=2, attention_types=[[["global"], 2]]
    )
    cfg = SftConfig(epochs=2.5, global_batch_size=8)
    cfg.model.attention_backend = "dense"  # how attention is computed stays the user's
    sources = Sources(base=base, rows=100)
    resolved = resolve_sft(cfg, CPU, sources)
    assert resolved.cfg.model == dataclasses.replace(base, attention_backend="dense")
    assert resolved.cfg.max_steps == 32 and resolved.cfg.epochs == 2.5  # ceil(2.5 x 100 / 8)
    assert sources.asked == ["base", ("rows", 128)]  # rows made at the base's context
    # neither epochs nor max_steps: one epoch; max_steps alone: the data is not counted
    assert resolve_sft(SftConfig(), CPU, Sources(rows=20)).cfg.max_steps == 3
    alone = Sources(rows=20)
    assert resolve_sft(SftConfig(max_steps=7), CPU, alone).cfg.max_steps == 7
    assert ("rows", 256) not in alone.asked


def test_sft_makes_room_for_a_heads_new_tokens_only():
    head = SftConfig()
    head.head.type = "classification"
    assert resolve_sft(head, CPU, Sources(size=50260)).cfg.model.vocab_size == 50260
    with pytest.raises(ConfigError, match="the tokenizer has 50260 tokens, more than"):
        resolve_sft(SftConfig(), CPU, Sources(size=50260))
    with pytest.raises(ConfigError, match="epochs=1.0 and max_steps=5: give one of them"):
        resolve_sft(SftConfig(epochs=1.0, max_steps=5), CPU, Sources())


COUNTED = """
import json, sys
from collections import Counter
from dataclasses import asdict
from train.config import resolve
from train.config.model import ModelConfig
from train.config.run import RunConfig
from train.config.finetune import LoraConfig
from train.config.sft import HeadConfig, SftConfig
from train.config.train import TrainConfig
from train.cli import main

calls, resolved = Counter(), {}
OUT, ARGS = sys.argv[1], sys.argv[2:]  # the command rewrites sys.argv for Hydra

def counting(cls, name):
    real = getattr(cls, name)
    def wrapper(self, *args, **kwargs):
        calls[f"{cls.__name__}.{name}"] += 1
        if cls is ModelConfig and self is not resolved.get("model_object", self):
            calls["ModelConfig.validate of another model"] += 1
            calls["ModelConfig.validate"] -= 1
        return real(self, *args, **kwargs)
    setattr(cls, name, wrapper)

for cls, name in [(ModelConfig, "validate"), (RunConfig, "check_run"), (SftConfig, "check_sft"),
                  (TrainConfig, "check_train"), (LoraConfig, "validate"), (HeadConfig, "validate")]:
    counting(cls, name)

for verb in ("train", "sft"):
    real_resolve = getattr(resolve, f"resolve_{verb}")
    def keep(*args, _real=real_resolve):
        out = _real(*args)
        resolved["cfg"], resolved["model_object"] = asdict(out.cfg), out.cfg.model
        return out
    setattr(resolve, f"resolve_{verb}", keep)
    import importlib
    setattr(importlib.import_module(f"train.verbs.{verb}"), f"resolve_{verb}", keep)

try:
    main(ARGS)
finally:
    with open(OUT, "w") as f:
        json.dump({"calls": calls, "resolved": resolved.get("cfg")}, f)
"""


def run_counted(tmp_path, *args):
    out = tmp_path / "counted.json"
    proc = subprocess.run(
        [sys.executable, "-c", COUNTED, str(out), *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


SMALL = [
    "model.num_layers=2",
    "model.attention_types=[[[global,local],1]]",
    "model.hidden_size=64",
    "precision=fp32",
    "export_hf=false",
    "logger.wandb.mode=disabled",
]


@pytest.mark.slow
def test_sft_resolves_once_and_config_yaml_is_the_resolved_config(tmp_path):
    """A fresh tiny model on the bundled sample, a twentieth of an epoch: every rule ran once
    (the model's on the model the run uses), and config.yaml holds the steps epochs made."""
    run = tmp_path / "run"
    done = run_counted(tmp_path, "sft", f"run_dir={run}", "epochs=0.02", "eval_every=100", *SMALL)
    calls = done["calls"]
    for rule in (
        "ModelConfig.validate",
        "RunConfig.check_run",
        "SftConfig.check_sft",
        "LoraConfig.validate",
        "HeadConfig.validate",
    ):
        assert calls.get(rule) == 1, (rule, calls)
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written == done["resolved"]
    assert written["epochs"] == 0.02 and written["max_steps"] >= 1
    assert written["precision"] == "fp32"


@pytest.mark.slow
def test_train_resolves_once_and_config_yaml_is_the_resolved_config(tmp_path, corpus):
    run = tmp_path / "run"
    done = run_counted(
        tmp_path,
        "train",
        f"run_dir={run}",
        f"data.path={corpus}",
        "max_steps=1",
        "data.seq_len=64",
        *SMALL,
    )
    calls = done["calls"]
    for rule in ("ModelConfig.validate", "RunConfig.check_run", "TrainConfig.check_train"):
        assert calls.get(rule) == 1, (rule, calls)
    written = yaml.safe_load((run / "config.yaml").read_text())
    assert written == done["resolved"] and written["precision"] == "fp32"


# What the verbs refuse when resolving; neo launch must refuse each the same way.
REFUSED = [
    ("train", ["global_batch_size=7"], "global_batch_size=7 is not a multiple of"),
    ("train", ["deepspeed.zero_stage=5"], "deepspeed.zero_stage=5 must be 0, 1, 2 or 3"),
    ("train", ["precision=fp16"], "precision=fp16 needs a CUDA or Ascend device"),
    ("train", ["eval.tasks=[val]"], "eval.tasks names val"),
    ("train", ["data.seq_len=999"], "sequence length 999 is longer than"),
    ("train", ["model.num_heads=5"], "model.num_heads=5 does not divide"),
    ("sft", ["epochs=1", "max_steps=2"], "give one of them"),
    ("sft", ["lora.alpha=32"], "lora.alpha=32.0 is not read: LoRA is off"),
    ("sft", ["head=classification", "sft.packing=false"], "sft.packing=False is not read"),
    ("sft", ["lora.r=4", "lora.target_modules=[query]"], "lora.target_modules=['query']"),
    ("eval", ["tasks=[]"], "tasks=[] names no task"),
    ("eval", ["tasks=[nope]"], "unknown task 'nope'"),
    ("generate", ["num_beams=0"], "num_beams must be at least 1"),
    ("generate", ["top_p=2"], "top_p has to be a float > 0 and <= 1"),
]


@pytest.mark.parametrize(("verb", "args", "message"), REFUSED, ids=lambda v: str(v)[:30])
def test_launch_refuses_exactly_what_the_verb_refuses(tmp_path, verb, args, message):
    direct = subprocess.run([NEO, verb, *args], cwd=tmp_path, capture_output=True, text=True)
    launched = subprocess.run(
        [NEO, "launch", verb, *args, "launcher=local", "launch.dry_run=true"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert direct.returncode == launched.returncode == 2, direct.stderr + launched.stderr
    said = direct.stderr.strip().removeprefix(f"neo {verb}: error: ")
    assert message in said and said in launched.stderr, (said, launched.stderr)
