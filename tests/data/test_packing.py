"""Packed rows (several examples in one sequence, positions restarting, attention blocked at
example boundaries) against the examples run one by one."""

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_config

from train.config.model import expand_attention_types
from train.model.attention import attend, attention_mask
from train.model.gpt import GPT

KINDS = ("global", "local", "strided")
BACKENDS = ["dense", "blockwise", pytest.param("flex", marks=pytest.mark.slow)]
LENGTHS = [
    (37, 5, 70, 1),
    (100, 28),
]  # examples per row; a row is padded to 130 with a doc of its own


def packed_documents(rows, T):
    documents = torch.full((len(rows), T), -1)
    for b, lengths in enumerate(rows):
        start = 0
        for d, n in enumerate(lengths):
            documents[b, start : start + n] = d
            start += n
    return documents


def test_attention_mask_blocks_other_documents():
    documents = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = attention_mask("global", 6, 4, 2, documents=documents)[0, 0]
    assert mask[1].tolist() == [True, True, False, False, False, False]
    assert mask[4].tolist() == [False, False, True, True, True, False]
    assert mask[5].tolist() == [False] * 5 + [True]  # padding sees only itself


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_attention_equals_each_example_alone_forward_and_backward(kind, backend):
    """Windows of 16 and strides of 8 against examples of 1 to 100 tokens: the band and the
    strided columns both cross example boundaries and must not see through them. (flex: the
    forward only; its backward does not run on CPU.)"""
    T, H, D = 130, 2, 16
    grad = backend != "flex"
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, H, T, D, generator=g, requires_grad=grad) for _ in range(3))
    documents = packed_documents(LENGTHS, T)
    common = dict(kind=kind, window=16, stride=8, scale=D**-0.5, backend=backend)
    out = attend(q, k, v, documents=documents, **common)
    weight = torch.randn(out.shape, generator=g)
    if grad:
        (out * weight).sum().backward()
    for b, lengths in enumerate(LENGTHS):
        start = 0
        for n in lengths:
            part = slice(start, start + n)
            qs, ks, vs = (x.detach()[b : b + 1, :, part].requires_grad_(grad) for x in (q, k, v))
            alone = attend(qs, ks, vs, **common)
            torch.testing.assert_close(out[b : b + 1, :, part], alone, atol=1e-5, rtol=1e-5)
            if not grad:
                start += n
                continue
            (alone * weight[b : b + 1, :, part]).sum().backward()
            for packed, single in ((q, qs), (k, ks), (v, vs)):
                torch.testing.assert_close(
                    packed.grad[b : b + 1, :, part], single.grad, atol=1e-5, rtol=1e-5
                )
            start += n


@pytest.mark.parametrize("backend", ["dense", "blockwise"])
def test_packed_model_gives_each_examples_loss_and_the_same_gradients(backend):
    """Every attention kind in one model; positions restart at each example."""
    types = [[list(KINDS), 1]]
    config = tiny_config(
        vocab_size=97,
        max_position_embeddings=160,
        attention_types=types,
        num_layers=len(expand_attention_types(types)),
        window_size=16,
        sparse_stride=8,
        attention_backend=backend,
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(1)
    T = 130
    examples = [[torch.randint(0, 97, (n,), generator=g) for n in row] for row in LENGTHS]
    ids = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    positions = torch.zeros(len(LENGTHS), T, dtype=torch.long)
    for b, row in enumerate(examples):
        start = 0
        for x in row:
            ids[b, start : start + len(x)] = x
            positions[b, start : start + len(x)] = torch.arange(len(x))
            start += len(x)
    documents = packed_documents(LENGTHS, T)

    logits = model(ids, positions=positions, documents=documents)
    packed_losses, total = [], 0.0
    for b, row in enumerate(examples):
        start = 0
        for x in row:
            if len(x) > 1:
                loss = F.cross_entropy(
                    logits[b, start : start + len(x) - 1], x[1:], reduction="sum"
                )
                packed_losses.append(loss)
                total = total + loss
            start += len(x)
    total.backward()
    packed_grads = {n: p.grad.clone() for n, p in model.named_parameters()}

    model.zero_grad()
    alone_losses, total = [], 0.0
    for row in examples:
        for x in row:
            if len(x) > 1:
                out = model(x[None])[0]
                loss = F.cross_entropy(out[:-1], x[1:], reduction="sum")
                alone_losses.append(loss)
                total = total + loss
    total.backward()
    torch.testing.assert_close(torch.stack(packed_losses), torch.stack(alone_losses))
    for name, p in model.named_parameters():
        torch.testing.assert_close(packed_grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
