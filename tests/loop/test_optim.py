"""The optimizers and the schedule against their references: MuonAdamW's Muon half is
torch.optim.Muon and its AdamW half torch.optim.AdamW, step for step; the schedules' shapes."""

import io
import math

import pytest
import torch
from torch import nn

from train.config.run import OptimConfig
from train.loop.optim import MuonAdamW, Schedule, muon_parameter_groups, orthogonalize


def gradients(params, step: int) -> None:
    g = torch.Generator().manual_seed(step)
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)


def clones(shapes, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [nn.Parameter(torch.randn(s, generator=g)) for s in shapes]


def assert_same_steps(mine, ours, reference, theirs, steps: int = 5) -> None:
    """Both optimizers step on the same gradients; the parameters stay equal, bit for bit."""
    for step in range(steps):
        gradients(ours, step)
        gradients(theirs, step)
        mine.step()
        reference.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)


def test_the_muon_half_is_torch_muon():
    """In bfloat16, as torch computes it: the same parameters after five steps, bit for bit
    (lr, weight decay, Nesterov momentum, the shape scaling of a tall and a wide matrix)."""
    shapes = [(48, 16), (16, 48), (24, 24)]
    ours, theirs = clones(shapes), clones(shapes)
    mine = MuonAdamW(
        [{"params": ours, "muon": True, "weight_decay": 0.1, "momentum": 0.9}],
        lr=0.02,
        betas=(0.9, 0.95),
        eps=1e-8,
        ns_dtype=torch.bfloat16,
        ns_method="standard",
    )
    reference = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, momentum=0.9, nesterov=True)
    assert_same_steps(mine, ours, reference, theirs)


@pytest.mark.parametrize("fused", [False, True])
def test_the_adamw_half_is_torch_adamw(fused):
    """Its multi-tensor kernel and its one-pass fused one (what runs on CPUs and GPUs)."""
    shapes = [(8, 4), (4,), (3, 5)]
    ours, theirs = clones(shapes), clones(shapes)
    groups = (
        lambda ps: [  # noqa: E731
            {"params": ps[:2], "weight_decay": 0.1},
            {"params": ps[2:], "weight_decay": 0.0},
        ]
    )
    mine = MuonAdamW(groups(ours), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, fused=fused)
    kernel = dict(fused=True) if fused else dict(foreach=True)
    reference = torch.optim.AdamW(groups(theirs), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, **kernel)
    assert_same_steps(mine, ours, reference, theirs)


def test_orthogonalize_in_fp32_is_near_orthogonal():
    """Newton-Schulz gives U S' V^T with S' in about [0.5, 1.5] (torch's docstring): fp32 and
    bf16 agree to bf16's precision, and the singular values are in that band."""
    g = torch.randn(64, 32, generator=torch.Generator().manual_seed(0))
    fp32, bf16 = orthogonalize(g, torch.float32), orthogonalize(g, torch.bfloat16)
    assert fp32.dtype == torch.float32 and fp32.shape == g.shape
    torch.testing.assert_close(fp32, bf16.float(), atol=0.03, rtol=0.05)
    s = torch.linalg.svdvals(fp32)
    assert s.min() > 0.5 and s.max() < 1.5
    assert torch.equal(g, torch.randn(64, 32, generator=torch.Generator().manual_seed(0)))


@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (40, 64)])
def test_gram_newton_schulz_is_the_standard_iteration(shape):
    """The Gram form (what MuonAdamW runs by default, as DeepSpeed's Muon does) is the same
    iteration reordered: in fp32 it lands as close to the fp64 standard result as the fp32
    standard one does. A matrix less than twice as wide as tall takes the standard form."""
    g = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    exact = orthogonalize(g, torch.float64, "standard")
    standard = orthogonalize(g, torch.float32, "standard")
    gram = orthogonalize(g, torch.float32, "gram")
    assert gram.shape == g.shape and gram.dtype == torch.float32
    error = (gram.double() - exact).norm() / exact.norm()
    assert error < 1e-5 and error < 3 * (standard.double() - exact).norm() / exact.norm()
    if max(shape) < 2 * min(shape):
        assert torch.equal(gram, standard)


def test_muon_takes_the_block_matrices_only():
    from train.config.model import ModelConfig
    from train.model.gpt import GPT

    model = GPT(
        ModelConfig(
            num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=16, vocab_size=64
        )
    )
    optim = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    groups = muon_parameter_groups(model, optim)
    names = {id(p): n for n, p in model.named_parameters()}
    muon = sorted(names[id(p)] for g in groups if g.get("muon") for p in g["params"])
    assert len(muon) == 6 * len(model.transformer.h)  # q, k, v, out, c_fc, c_proj
    assert all(".h." in n and n.endswith("weight") for n in muon)
    others = [names[id(p)] for g in groups if not g.get("muon") for p in g["params"]]
    assert "transformer.wte.weight" in others and "transformer.wpe.weight" in others
    assert len(muon) + len(others) == len(names)
    muon_group = next(g for g in groups if g.get("muon"))
    assert muon_group["lr_scale"] == pytest.approx(20)
    # the matrices shrink by lr * weight_decay a step, as under AdamW
    assert optim.muon_lr * muon_group["weight_decay"] == pytest.approx(
        optim.lr * optim.weight_decay
    )


def test_a_non_finite_gradient_skips_the_step():
    p = clones([(4, 4)])
    opt = MuonAdamW(
        [{"params": p, "muon": True}], lr=0.02, betas=(0.9, 0.95), eps=1e-8, max_grad_norm=1.0
    )
    before = p[0].detach().clone()
    p[0].grad = torch.full((4, 4), math.inf)
    opt.step()
    assert opt.overflow and torch.equal(p[0], before) and not opt.state[p[0]]


def test_state_dict_round_trip_resumes_exactly():
    shapes = [(12, 8), (8,)]
    a, b = clones(shapes), clones(shapes)

    def make(ps):
        return MuonAdamW(
            [{"params": ps[:1], "muon": True}, {"params": ps[1:]}],
            lr=1e-2,
            betas=(0.9, 0.95),
            eps=1e-8,
        )

    first = make(a)
    for step in range(3):
        gradients(a, step)
        first.step()
    with torch.no_grad():
        for x, y in zip(a, b, strict=True):
            y.copy_(x)
    second = make(b)
    saved = io.BytesIO()  # as a checkpoint does: the state dict through a file
    torch.save(first.state_dict(), saved)
    saved.seek(0)
    second.load_state_dict(torch.load(saved, weights_only=True))
    for step in range(3, 5):
        gradients(a, step)
        gradients(b, step)
        first.step()
        second.step()
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


@pytest.mark.parametrize("schedule", ["cosine", "wsd"])
def test_schedules(schedule):
    optim = OptimConfig(lr=1.0, warmup=10, min_lr_ratio=0.1, schedule=schedule, cooldown=0.2)
    lrs = [Schedule(optim, 100, 1).lr(s, 0) for s in range(101)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # warmup
    assert lrs[100] == pytest.approx(0.1) and min(lrs[10:]) == pytest.approx(0.1)
    assert all(x >= y for x, y in zip(lrs[10:], lrs[11:], strict=False))  # never rises
    if schedule == "wsd":
        assert lrs[10:81] == [1.0] * 71  # stable until the last 20 steps
        assert lrs[90] == pytest.approx(1 - 0.9 * 0.5)  # linear halfway down
    else:
        assert lrs[55] == pytest.approx(0.1 + 0.9 * 0.5)  # cosine halfway down


def test_with_lora_muon_takes_the_adapters_and_nothing_frozen():
    """`neo sft optim.name=muon lora.r=8`: the frozen base matrices are in no group; Muon
    takes the adapters' matrices (lora_A, lora_B) inside the blocks; AdamW what else trains."""
    from train.config.finetune import LoraConfig
    from train.config.model import ModelConfig
    from train.model import lora
    from train.model.gpt import GPT

    model = GPT(
        ModelConfig(
            num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=16, vocab_size=64
        )
    )
    lora.inject(model, LoraConfig(r=4))
    optim = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, weight_decay=0.1)
    groups = muon_parameter_groups(model, optim)
    names = {id(p): n for n, p in model.named_parameters()}
    grouped = [names[id(p)] for g in groups for p in g["params"]]
    assert sorted(grouped) == sorted(n for n, p in model.named_parameters() if p.requires_grad)
    muon = [names[id(p)] for g in groups if g.get("muon") for p in g["params"]]
    assert muon and all("lora_A" in n or "lora_B" in n for n in muon)
    mine = MuonAdamW(groups, lr=1e-3, betas=(0.9, 0.95), eps=1e-8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).mean().backward()
    mine.step()
    model.zero_grad()
    model(torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))).mean().backward()
    mine.step()  # lora_A moves from the second step on (lora_B starts at zero)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("zero_stage", "precision", "ns_precision", "method", "dtype"),
    [
        (0, "bf16", "bf16", "standard", torch.bfloat16),  # DeepSpeed's bf16 optimizer
        (2, "fp32", "fp32", "gram", torch.float32),
        (2, "fp32", "bf16", "standard", torch.bfloat16),
        (0, "fp32", "bf16", "standard", torch.bfloat16),  # ours: MuonAdamW
        (0, "fp32", "fp32", "gram", torch.float32),
    ],
)
def test_muon_orthogonalizes_in_optim_ns_precision(
    zero_stage, precision, ns_precision, method, dtype
):
    """optim.ns_precision picks what Newton-Schulz computes in, whatever the run's precision:
    bf16 is torch.optim.Muon's form ("standard"), which DeepSpeed's Muon computes in bf16; fp32
    the Gram form, which DeepSpeed computes in fp16, else fp32 (CPUs have no fp16 kernels)."""
    from deepspeed.runtime.zero.muon.original_muon import ns_compute_dtype

    from train.config.model import ModelConfig
    from train.config.run import DeepSpeedConfig
    from train.distributed import devices
    from train.loop.engine import build_optimizer
    from train.model.gpt import GPT

    model = GPT(
        ModelConfig(
            num_layers=2, hidden_size=32, num_heads=4, max_position_embeddings=16, vocab_size=64
        )
    )
    optim = OptimConfig(name="muon", lr=1e-3, muon_lr=0.02, ns_precision=ns_precision)
    groups = muon_parameter_groups(model, optim)
    ds = DeepSpeedConfig(zero_stage=zero_stage)
    optimizer = build_optimizer(groups, optim, devices.select("cpu"), ds, precision)
    if isinstance(optimizer, MuonAdamW):
        assert (optimizer.ns_method, optimizer.ns_dtype) == (method, dtype)
        assert zero_stage == 0 and precision == "fp32"
        assert optimizer.fused  # AdamW's one-pass kernel: 5x faster than foreach on a CPU
        return
    assert optimizer.aux_optimizer.defaults["fused"]
    muon = [g for g in optimizer.param_groups if g["use_muon"]]
    assert muon and all(g["ns_method"] == method for g in muon)
    assert ns_compute_dtype(method) == dtype


@pytest.mark.parametrize(("zero_stage", "precision"), [(0, "fp32"), (0, "bf16"), (2, "fp32")])
def test_adamw_runs_its_fused_kernel_on_a_cpu(zero_stage, precision):
    """optim.name=adamw: torch's one-pass AdamW kernel, not the multi-tensor one (on 2 AVX-512
    cores 8-13 ms against 49-68 for a 6 x 384 model's 20M AdamW parameters)."""
    from train.config.run import DeepSpeedConfig
    from train.distributed import devices
    from train.loop.engine import build_optimizer

    params = clones([(8, 4), (4,)])
    optim = OptimConfig(name="adamw", lr=1e-3)
    ds = DeepSpeedConfig(zero_stage=zero_stage)
    groups = [{"params": params, "weight_decay": 0.1}]
    optimizer = build_optimizer(groups, optim, devices.select("cpu"), ds, precision)
    assert optimizer.defaults["fused"]
