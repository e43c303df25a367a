"""The trainer's parts, one at a time: schedule, optimizer groups, DeepSpeed config,
accelerator selection, the data order."""

import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_config

from data_prep.shards import IndexedDataset, write_indexed_dataset
from train.config.resolve import World, resolve_train
from train.config.rules import batch_layout
from train.config.run import DeepSpeedConfig, OptimConfig
from train.config.train import BlendComponent, TrainConfig
from train.data.pretrain import Blend, Documents, SampleStream, micro_batch
from train.distributed import devices as accel
from train.distributed import process_group
from train.distributed.ranks import Ranks, ranks_from_env
from train.errors import ConfigError
from train.loop.deepspeed_config import deepspeed_config
from train.loop.optim import Schedule, parameter_groups
from train.model.gpt import GPT
from train.model.ops import npu

# --------------------------------------------------------------------------------------------
# learning-rate schedule


def schedule_config(**optim) -> TrainConfig:
    cfg = TrainConfig(max_steps=1000, global_batch_size=8)
    cfg.data.seq_len = 128
    for key, value in {"lr": 1e-3, "warmup": 100, "min_lr_ratio": 0.1, **optim}.items():
        setattr(cfg.optim, key, value)
    return cfg


def lr_at(cfg: TrainConfig, step: int, tokens: int) -> float:
    return Schedule(cfg.optim, cfg.max_steps, cfg.tokens_per_step).lr(step, tokens)


def test_warmup_then_cosine_to_ten_percent():
    cfg = schedule_config()
    assert lr_at(cfg, 0, 0) == pytest.approx(1e-5)
    assert lr_at(cfg, 49, 0) == pytest.approx(5e-4)
    assert lr_at(cfg, 99, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 100, 0) == pytest.approx(1e-3)
    assert lr_at(cfg, 550, 0) == pytest.approx(1e-4 + 0.9e-3 * 0.5)  # half way: the mean
    assert lr_at(cfg, 1000, 0) == pytest.approx(1e-4)
    assert lr_at(cfg, 5000, 0) == pytest.approx(1e-4)  # stays at the floor
    steps = [lr_at(cfg, s, 0) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(steps, steps[1:], strict=False))


def test_schedule_by_tokens_follows_tokens_not_steps():
    # GPT-3 style: warmup 375M tokens; here warmup 10,240 tokens = 10 steps of 8 x 128.
    cfg = schedule_config(unit="tokens", warmup=10_240, decay=102_400)
    assert lr_at(cfg, 0, 5_120) == pytest.approx(1e-3 * 5_121 / 10_240)
    assert lr_at(cfg, 999, 102_400) == pytest.approx(1e-4)
    assert lr_at(cfg, 3, 56_320) == pytest.approx(1e-4 + 0.9e-3 * 0.5)


# --------------------------------------------------------------------------------------------
# optimizer groups and DeepSpeed config


def test_weight_decay_only_on_linear_matrices():
    model = GPT(tiny_config())
    decay, no_decay = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(n.endswith(("proj.weight", "c_fc.weight", "c_proj.weight")) for n in decayed)
    assert "transformer.h.0.attn.attention.q_proj.weight" in decayed
    undecayed = {names[id(p)] for p in no_decay["params"]}
    assert {
        "transformer.wte.weight",
        "transformer.wpe.weight",
        "transformer.ln_f.weight",
        "transformer.h.0.mlp.c_fc.bias",
    } <= undecayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_batch_layout_names_the_numbers():
    assert batch_layout(512, 4, 8) == 16
    with pytest.raises(
        ConfigError,
        match=r"global_batch_size=100 is not a multiple of micro_batch_size=4 x world size 8 = 32",
    ):
        batch_layout(100, 4, 8)


def test_deepspeed_config_from_typed_config():
    ds = DeepSpeedConfig(
        zero_stage=3,
        offload_optimizer=True,
        offload_param=True,
        extra={"zero_optimization": {"overlap_comm": True}, "wall_clock_breakdown": True},
    )
    config = deepspeed_config(
        ds, "fp16", OptimConfig(grad_clip=0.5), micro_batch=2, accumulation=4, world_size=8
    )
    assert config["train_batch_size"] == 64 and config["gradient_accumulation_steps"] == 4
    assert config["gradient_clipping"] == 0.5
    assert (
        config["fp16"]["enabled"]
        and config["fp16"]["loss_scale"] == 0
        and not config["bf16"]["enabled"]
    )
    zero = config["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_param"]["device"] == "cpu"
    assert zero["overlap_comm"] is True and zero["contiguous_gradients"] is True  # extra merged in
    assert config["wall_clock_breakdown"] is True


@pytest.mark.parametrize(
    ("ds", "precision", "message"),
    [
        (DeepSpeedConfig(zero_stage=4), "bf16", "deepspeed.zero_stage=4 must be 0, 1, 2 or 3"),
        (
            DeepSpeedConfig(zero_stage=1, offload_param=True),
            "bf16",
            "offload_param=true needs deepspeed.zero_stage=3",
        ),
        (
            DeepSpeedConfig(zero_stage=0, offload_optimizer=True),
            "bf16",
            "offload_optimizer=true needs",
        ),
        (DeepSpeedConfig(), "int8", "precision='int8' is not one of auto, bf16, fp16, fp32"),
    ],
)
def test_impossible_deepspeed_settings_are_refused_when_the_config_resolves(ds, precision, message):
    """DeepSpeed's config is built from a resolved config only (train/loop/engine.py): these
    are refused by resolve, before anything starts."""
    cfg = TrainConfig(deepspeed=ds, precision=precision, micro_batch_size=1, global_batch_size=1)
    with pytest.raises(ConfigError, match=message):
        resolve_train(cfg, World(1, "cuda", native_bf16=True))


# --------------------------------------------------------------------------------------------
# accelerator


def test_cpu_is_selected_here_with_gloo():
    acc = accel.select("auto")
    assert (acc.kind, acc.backend, acc.device(3)) == ("cpu", "gloo", torch.device("cpu"))


def test_cuda_selected_when_available(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    acc = accel.select("auto")
    assert (acc.kind, acc.backend, acc.visible_devices_env) == (
        "cuda",
        "nccl",
        "CUDA_VISIBLE_DEVICES",
    )
    assert acc.device(3) == torch.device("cuda", 3)


def test_npu_selected_first_when_torch_npu_sees_a_device(monkeypatch):
    fake = types.ModuleType("torch_npu")
    monkeypatch.setitem(sys.modules, "torch_npu", fake)
    monkeypatch.setattr(npu, "installed", lambda: True)
    monkeypatch.setattr(
        torch, "npu", types.SimpleNamespace(is_available=lambda: True), raising=False
    )
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    acc = accel.select("auto")
    assert (acc.kind, acc.backend, acc.visible_devices_env) == (
        "npu",
        "hccl",
        "ASCEND_RT_VISIBLE_DEVICES",
    )
    assert acc.device_string(1) == "npu:1"


def test_explicit_accelerator_that_is_missing_fails_clearly():
    with pytest.raises(RuntimeError, match="torch_npu is not installed"):
        accel.select("npu")
    with pytest.raises(RuntimeError, match="no CUDA device"):
        accel.select("cuda")
    with pytest.raises(ConfigError, match="accelerator='tpu' is not one of"):
        resolve_train(TrainConfig(accelerator="tpu"), World())


def test_ranks_from_torchrun_slurm_or_nothing():
    assert ranks_from_env({"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "8"}) == Ranks(3, 1, 8)
    slurm = {"SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NTASKS": "16"}
    assert ranks_from_env(slurm) == Ranks(5, 1, 16)
    assert ranks_from_env({}) == Ranks(0, 0, 1)


def test_multi_rank_without_rendezvous_is_an_error(monkeypatch):
    # prepare_environment sets these before it fails: monkeypatch must restore their absence
    # (setenv first: a bare delenv of an unset variable records nothing), or later tests'
    # subprocesses would inherit WORLD_SIZE=4.
    for name in ("LOCAL_RANK", "WORLD_SIZE", "DS_ACCELERATOR"):
        monkeypatch.setenv(name, "unset")
        monkeypatch.delenv(name)
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    monkeypatch.delenv("MASTER_PORT", raising=False)
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(RuntimeError, match="rank 1 of 4: MASTER_ADDR and MASTER_PORT must be set"):
        process_group.prepare_environment(accel.ACCELERATORS["cpu"], Ranks(1, 1, 4))


def test_deepspeed_launcher_local_rank_argument_is_accepted(monkeypatch):
    from train.cli import _without_local_rank

    # setenv first, so that monkeypatch restores the variable's absence after the test (the
    # function under test sets it; a bare delenv of an unset variable records nothing).
    monkeypatch.setenv("LOCAL_RANK", "unset")
    monkeypatch.delenv("LOCAL_RANK")
    assert _without_local_rank(["train", "--local_rank=3", "max_steps=2"]) == [
        "train",
        "max_steps=2",
    ]
    assert os.environ["LOCAL_RANK"] == "3"


# --------------------------------------------------------------------------------------------
# data order


@pytest.fixture
def shard(tmp_path) -> IndexedDataset:
    """20 documents of known content: document d holds d*1000 + (0, 1, ..., len-1)."""
    rng = np.random.default_rng(0)
    docs = [d * 1000 + np.arange(rng.integers(3, 40)) for d in range(20)]
    write_indexed_dataset(tmp_path / "s", docs, np.int32)
    return IndexedDataset(tmp_path / "s")


def documents(shard) -> Documents:
    n = len(shard)
    return Documents([shard], np.zeros(n, np.int32), np.arange(n), shard.sizes.astype(np.int64))


def test_samples_pack_documents_in_order_without_gaps(shard):
    stream = SampleStream(documents(shard), seq_len=16, seed=0, shuffle=False)
    text = np.concatenate([shard[i] for i in range(len(shard))])
    assert stream.samples_per_epoch == (len(text) - 1) // 16
    for j in range(stream.samples_per_epoch):
        np.testing.assert_array_equal(stream[j], text[j * 16 : j * 16 + 17])


def test_shuffled_epoch_is_a_permutation_of_whole_documents(shard):
    stream = SampleStream(documents(shard), seq_len=16, seed=3)
    n = stream.samples_per_epoch
    tokens = np.concatenate([stream[j][:-1] for j in range(n)])
    covered = set(tokens.tolist())
    everything = set(np.concatenate([shard[i] for i in range(len(shard))]).tolist())
    assert len(covered) >= len(everything) - 16  # all but the epoch's last partial sample
    first_doc = [int(t) // 1000 for t in stream[0]]
    runs = [first_doc[0]] + [b for a, b in zip(first_doc, first_doc[1:], strict=False) if a != b]
    assert len(runs) == len(set(runs)), "a document is contiguous within a sample"
    assert not np.array_equal(stream[n], stream[0]), "epoch 2 has its own order"


def test_order_is_a_function_of_seed_and_index_only(shard):
    a = SampleStream(documents(shard), seq_len=8, seed=11)
    b = SampleStream(documents(shard), seq_len=8, seed=11)
    for k in (50, 3, 0, 171, 3):  # any order of access, across epochs
        np.testing.assert_array_equal(a[k], b[k])
    c = SampleStream(documents(shard), seq_len=8, seed=12)
    assert any(not np.array_equal(a[k], c[k]) for k in range(5))


def test_step_slices_are_the_same_samples_for_any_world_size(shard):
    blend = Blend([SampleStream(documents(shard), seq_len=8, seed=1)], [1.0], seed=1)

    def step_samples(world, micro, accum):
        rows = [
            micro_batch(blend, 5, a, r, world, micro, accum)
            for a in range(accum)
            for r in range(world)
        ]
        return sorted(map(tuple, np.concatenate(rows).tolist()))

    assert step_samples(1, 2, 4) == step_samples(2, 2, 2) == step_samples(4, 1, 2)


def test_blend_follows_weights(tmp_path, shard):
    write_indexed_dataset(tmp_path / "other", [np.full(30, 7) for _ in range(10)], np.int32)
    other = IndexedDataset(tmp_path / "other")
    streams = [SampleStream(documents(shard), 8, 0), SampleStream(documents(other), 8, 0)]
    blend = Blend(streams, [3.0, 1.0], seed=5)
    from_other = sum(bool((blend[k][:-1] == 7).all()) for k in range(4000))
    assert math.isclose(from_other / 4000, 0.25, abs_tol=0.03)
    again = Blend(streams, [3.0, 1.0], seed=5)
    assert all(np.array_equal(blend[k], again[k]) for k in (0, 4095, 4096, 9000))
    cfg = TrainConfig()
    cfg.data.blend = [BlendComponent(path="a", weight=1.0), BlendComponent(path="b", weight=0.0)]
    with pytest.raises(ConfigError, match="weights must be positive"):
        resolve_train(cfg, World())


def test_epoch_order_is_cached_on_disk_and_memory_mapped(tmp_path, shard):
    plain = SampleStream(documents(shard), seq_len=8, seed=2)
    cached = SampleStream(documents(shard), seq_len=8, seed=2, cache_dir=tmp_path / "index")
    again = SampleStream(documents(shard), seq_len=8, seed=2, cache_dir=tmp_path / "index")
    for k in (0, 17, plain.samples_per_epoch + 3):
        np.testing.assert_array_equal(cached[k], plain[k])
        np.testing.assert_array_equal(again[k], plain[k])
    assert len(list((tmp_path / "index").glob("epoch-*.npy"))) == 6  # 2 epochs x 3 arrays
    assert isinstance(again._epoch(0)[0], np.memmap)


def test_interrupted_universal_conversion_leaves_no_half_checkpoint(tmp_path, monkeypatch):
    """A crash or Ctrl-C while DeepSpeed converts a checkpoint to its universal form must not
    leave a <tag>_universal folder that the next resume would load as finished."""
    import deepspeed.checkpoint.ds_to_universal as ds_universal
    import torch.distributed as dist

    from train.loop.engine import convert_to_universal

    def interrupted(args):
        (Path(args.output_folder) / "zero").mkdir()
        raise KeyboardInterrupt

    monkeypatch.setattr(ds_universal, "main", interrupted)
    store = f"file://{tmp_path / 'store'}"
    dist.init_process_group("gloo", init_method=store, rank=0, world_size=1)
    try:
        with pytest.raises(KeyboardInterrupt):
            convert_to_universal(tmp_path / "checkpoints", "step_00000004")
    finally:
        dist.destroy_process_group()
    assert list((tmp_path / "checkpoints").iterdir()) == []
