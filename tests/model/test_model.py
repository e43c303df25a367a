"""Our model against transformers.GPTNeoForCausalLM: names, logits, loss, gradients."""

import math
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config
from transformers import GPTNeoConfig, GPTNeoForCausalLM

from train.checkpoints.hf import state_dict_from_hf
from train.errors import ConfigError
from train.model.gpt import GPT, next_token_loss

PATTERNS = {
    "global": [[["global"], 2]],
    "local": [[["local"], 3]],
    "alternating": [[["global", "local"], 2]],
}


def hf_twin(config):
    """A randomly initialised HF GPT-Neo with the same shape as `config`."""
    hf_config = GPTNeoConfig(
        vocab_size=config.vocab_size,
        max_position_embeddings=config.max_position_embeddings,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        attention_types=config.attention_types,
        window_size=config.window_size,
        bos_token_id=0,
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return GPTNeoForCausalLM(hf_config).eval()


def config_for(pattern, **overrides):
    layers = sum(len(kinds) * n for kinds, n in PATTERNS[pattern])
    return tiny_config(attention_types=PATTERNS[pattern], num_layers=layers, **overrides)


@pytest.mark.parametrize("pattern", PATTERNS)
@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_logits_and_loss_equal_hugging_face(pattern, backend):
    config = config_for(pattern, attention_backend=backend)
    hf = hf_twin(config)
    model = GPT(config).eval()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), "hf"))
    ids = torch.randint(0, config.vocab_size, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(ids, labels=ids)
        logits = model(ids)
    assert logits.shape == (2, 77, config.vocab_size)
    torch.testing.assert_close(logits, ref.logits)
    torch.testing.assert_close(next_token_loss(logits[:, :-1], ids[:, 1:]), ref.loss)


def test_gradients_equal_hugging_face():
    config = config_for("alternating", attention_backend="blockwise")
    hf = hf_twin(config).train()
    model = GPT(config).train()
    model.load_state_dict(state_dict_from_hf(hf.state_dict(), "hf"))
    ids = torch.randint(0, config.vocab_size, (2, 50), generator=torch.Generator().manual_seed(2))
    hf(ids, labels=ids).loss.backward()
    next_token_loss(model(ids)[:, :-1], ids[:, 1:]).backward()
    hf_params = dict(hf.named_parameters())
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4, msg=name)


def test_state_dict_names_are_hugging_face_names():
    config = config_for("alternating")
    assert set(GPT(config).state_dict()) == set(hf_twin(config).state_dict())


def test_lm_head_is_tied_to_wte():
    model = GPT(tiny_config())
    assert model.lm_head.weight is model.transformer.wte.weight
    assert model.num_parameters() == sum(p.numel() for p in set(model.parameters()))


def test_build_on_meta_then_initialise():
    config = tiny_config()
    with torch.device("meta"):
        model = GPT(config)
    assert model.transformer.wte.weight.is_meta
    model.to_empty(device="cpu")
    model.init_weights(torch.Generator().manual_seed(0))
    assert model.lm_head.weight is model.transformer.wte.weight
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ids = torch.randint(0, config.vocab_size, (1, 20))
    assert torch.isfinite(model(ids)).all()


def test_initialisation_statistics():
    config = tiny_config(hidden_size=256, num_layers=8, attention_types=[[["global", "local"], 4]])
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    std = config.initializer_range
    block = model.transformer.h[3]
    assert block.attn.attention.q_proj.weight.std().item() == pytest.approx(std, rel=0.05)
    residual = std / math.sqrt(2 * config.num_layers)
    assert block.attn.attention.out_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.c_proj.weight.std().item() == pytest.approx(residual, rel=0.05)
    assert block.mlp.c_fc.bias.abs().max() == 0
    assert torch.equal(block.ln_1.weight, torch.ones(256))


def test_zero_residual_init_starts_every_block_as_the_identity():
    """model.residual_init=zero: out_proj and c_proj start at zero, so each block adds nothing
    and the logits are the embeddings' alone; every other weight is drawn as with the scaled
    init (the same generator draws), and the first step's gradients reach the zeroed
    projections."""
    zero = GPT(tiny_config(residual_init="zero")).init_weights(torch.Generator().manual_seed(3))
    scaled = GPT(tiny_config()).init_weights(torch.Generator().manual_seed(3))
    residual = {"attn.attention.out_proj.weight", "mlp.c_proj.weight"}
    for (name, z), s in zip(zero.state_dict().items(), scaled.state_dict().values(), strict=True):
        if name.split(".", 3)[-1] in residual:
            assert z.abs().max() == 0 and s.abs().max() > 0, name
        else:
            assert torch.equal(z, s), name
    ids = torch.randint(0, 1000, (2, 16))
    hidden = zero.transformer.wte(ids) + zero.transformer.wpe(torch.arange(16))
    alone = zero.transformer.ln_f(hidden) @ zero.transformer.wte.weight.T
    torch.testing.assert_close(zero(ids), alone)
    zero(ids, targets=ids).mean().backward()
    assert zero.transformer.h[0].mlp.c_proj.weight.grad.abs().max() > 0


def test_residual_init_is_checked_and_not_part_of_the_models_identity():
    from train.errors import ConfigError
    from train.loop.checkpointing import model_identity

    with pytest.raises(ConfigError, match="model.residual_init='small' is not one of scaled, zero"):
        tiny_config(residual_init="small")
    assert model_identity(tiny_config(residual_init="zero")) == model_identity(tiny_config())


def test_init_is_deterministic_for_a_seed():
    a = GPT(tiny_config()).init_weights(torch.Generator().manual_seed(3))
    b = GPT(tiny_config()).init_weights(torch.Generator().manual_seed(3))
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


def test_scaled_attention_is_scaled():
    """GPT-3 style scaling changes the outputs, and equals unscaled attention with q_proj
    multiplied by the scale (the identity export relies on)."""
    scaled = tiny_config(scale_attn_weights=True)
    model = GPT(scaled).init_weights(torch.Generator().manual_seed(0)).eval()
    plain = GPT(tiny_config()).eval()
    state = model.state_dict()
    for key in state:
        if key.endswith("q_proj.weight"):
            state[key] = state[key] * scaled.attention_scale
    plain.load_state_dict(state)
    ids = torch.randint(0, 1000, (2, 40))
    with torch.no_grad():
        torch.testing.assert_close(plain(ids), model(ids))
        unscaled = GPT(tiny_config()).eval()
        unscaled.load_state_dict(model.state_dict())
        assert not torch.allclose(unscaled(ids), model(ids))


def test_strided_model_runs_forward_and_backward():
    config = tiny_config(attention_types=[[["global", "strided"], 2]], sparse_stride=6)
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1000, (2, 70))
    loss = next_token_loss(model(ids)[:, :-1], ids[:, 1:])
    loss.backward()
    assert (
        torch.isfinite(loss)
        and model.transformer.h[1].attn.attention.q_proj.weight.grad is not None
    )


def test_sequence_longer_than_context_is_refused():
    model = GPT(tiny_config(max_position_embeddings=32))
    with pytest.raises(
        ConfigError, match="sequence length 33 is longer than model.max_position_embeddings=32"
    ):
        model(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("chunk", [7, 1 << 24])
def test_fused_loss_equals_logits_then_cross_entropy(monkeypatch, chunk):
    """model(ids, targets) computes the loss without the logits, in chunks of rows: same
    value and gradients as cross_entropy on model(ids), ignored targets included."""
    import train.model.ops.fused_loss

    monkeypatch.setattr(train.model.ops.fused_loss, "CHUNK_ELEMENTS", chunk * 1000)
    model = GPT(tiny_config()).init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1000, (3, 50), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[0, :9] = -100
    reference = next_token_loss(model(inputs), targets)
    expected = torch.autograd.grad(reference, list(model.parameters()))
    fused = model(inputs, targets).mean()
    got = torch.autograd.grad(fused, list(model.parameters()))
    torch.testing.assert_close(fused, reference)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(inputs, targets).mean(), reference)


@pytest.mark.parametrize("layout", ["_row_major", "_vocab_major"])
def test_both_layouts_of_the_fused_loss_equal_cross_entropy(monkeypatch, layout):
    """Each layout of the chunked loss (rows x vocab logits; vocab x rows, fp32 on a CPU)
    gives cross_entropy's sum and gradients, ignored targets included, with chunks of 64 rows
    (100 rows a chunk's worth, rounded down) and a shorter last one."""
    import train.model.ops.fused_loss as fused_loss

    monkeypatch.setattr(fused_loss, "CHUNK_ELEMENTS", 100 * 500)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(150, 16, generator=g, requires_grad=True)
    w = torch.randn(500, 16, generator=g, requires_grad=True)
    targets = torch.randint(0, 500, (150,), generator=g)
    targets[[3, 70, 149]] = -100
    assert fused_loss._chunk_rows(150, 500) == 64
    reference = F.cross_entropy(h @ w.T, targets, reduction="sum")
    expected = torch.autograd.grad(reference, [h, w])
    form = getattr(fused_loss, layout)
    total, count, grad_h, grad_w = form(h.detach(), w.detach(), targets, with_grad=True)
    assert count == 147
    torch.testing.assert_close(total, reference.detach())
    torch.testing.assert_close(grad_h, expected[0])
    torch.testing.assert_close(grad_w, expected[1])
    total, _, no_h, no_w = form(h.detach(), w.detach(), targets, with_grad=False)
    torch.testing.assert_close(total, reference.detach())
    assert no_h is None and no_w is None


def test_fused_loss_scales_its_gradients_in_place_once():
    """The backward scales the gradients made in the forward in place: a second backward
    through the same graph raises instead of scaling them twice; no rows give zero grads."""
    from train.model.ops.fused_loss import LinearCrossEntropy, chunked_cross_entropy

    g = torch.Generator().manual_seed(0)
    h = torch.randn(6, 8, generator=g, requires_grad=True)
    w = torch.randn(11, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 11, (6,), generator=g)
    total, _ = LinearCrossEntropy.apply(h, w, targets)
    (total * 3).backward(retain_graph=True)
    expected = torch.autograd.grad(F.cross_entropy(h @ w.T, targets, reduction="sum") * 3, [h, w])
    torch.testing.assert_close(h.grad, expected[0])
    torch.testing.assert_close(w.grad, expected[1])
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        total.backward()
    _, count, grad_h, grad_w = chunked_cross_entropy(h[:0], w.detach(), targets[:0], with_grad=True)
    assert count == 0 and grad_h.shape == (0, 8) and torch.equal(grad_w, torch.zeros(11, 8))


def test_fused_loss_in_bf16_is_as_accurate_as_the_unfused_bf16_loss(monkeypatch):
    """With bf16 weights (DeepSpeed's bf16 mode) the fused loss and gradients stay as close to
    the fp32 reference as the plain bf16 logits -> cross_entropy path does, with grad_w summed
    in bf16 over 16 chunks."""
    import train.model.ops.fused_loss

    monkeypatch.setattr(train.model.ops.fused_loss, "CHUNK_ELEMENTS", 16 * 1000)
    model = GPT(tiny_config()).init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 1000, (4, 65), generator=torch.Generator().manual_seed(1))
    inputs, targets = ids[:, :-1], ids[:, 1:].clone()
    targets[1, :5] = -100
    params = list(model.parameters())
    reference = next_token_loss(model(inputs), targets)
    expected = torch.autograd.grad(reference, params)
    model.bfloat16()
    plain = next_token_loss(model(inputs), targets)
    plain_grads = torch.autograd.grad(plain, params)
    fused = model(inputs, targets).mean()
    fused_grads = torch.autograd.grad(fused, params)

    def error(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b).norm() / b.norm())

    assert fused.dtype == torch.float32
    plain_error = abs(plain.item() - reference.item())
    assert abs(fused.item() - reference.item()) <= max(2 * plain_error, 1e-3)
    for name, f, p, e in zip(
        [n for n, _ in model.named_parameters()], fused_grads, plain_grads, expected, strict=True
    ):
        assert f.dtype == torch.bfloat16
        assert error(f, e) <= 1.5 * error(p, e) + 1e-3, name


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's allocator: mapped chunks fault")
def test_the_loss_chunks_are_not_mapped_afresh_every_step():
    """A training step of the tiny model (the demo's: 4 x 256 tokens, GPT-2's vocabulary) writes
    its four loss chunks into two buffers made once: with a fresh allocation per chunk, each of
    them over glibc's largest mmap threshold (32 MB), every chunk was mapped and faulted in
    again, over 100,000 page faults a step (measured 37,000 with the two buffers)."""
    import resource

    from train.config.model import ModelConfig

    config = ModelConfig(
        name="tiny",
        vocab_size=50257,
        max_position_embeddings=256,
        hidden_size=128,
        num_layers=4,
        num_heads=4,
        attention_types=[[["global", "local"], 2]],
        window_size=64,
    )
    model = GPT(config.validate()).init_weights(torch.Generator().manual_seed(0))
    ids = torch.randint(0, 50257, (4, 257), generator=torch.Generator().manual_seed(1))

    def step() -> None:
        model(ids[:, :-1], ids[:, 1:]).total.backward()

    step()  # warm-up: the allocator grows its heap and raises its mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):
        step()
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 3
    assert faults < 50_000, f"{faults:,.0f} page faults per step"
