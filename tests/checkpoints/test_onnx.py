"""`neo export format=onnx`: ONNX Runtime gives our logits (padded batches, past the window),
greedy decoding with the past inputs gives `neo generate`'s tokens, and bad input is refused."""

import subprocess

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import NEO, tiny_config

from data_prep.tokenizers import load_tokenizer
from train.checkpoints.export import export_onnx_dir
from train.checkpoints.model_format import save_checkpoint
from train.config.evaluation import GenerationConfig
from train.config.resolve import resolve_plain
from train.config.tools import ExportConfig
from train.errors import ConfigError
from train.model.decoding import generate_ids
from train.model.gpt import GPT

VOCAB = 50257
LAYERS = [[["global", "local", "strided"], 1]]  # every kind; window 6, stride 4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    config = tiny_config(
        vocab_size=VOCAB,
        hidden_size=32,
        num_heads=2,
        num_layers=3,
        attention_types=LAYERS,
        window_size=6,
        sparse_stride=4,
    )
    model = GPT(config).init_weights(torch.Generator().manual_seed(0)).eval()
    save_checkpoint(root / "ckpt", config, model.state_dict(), load_tokenizer("gpt2"))
    export_onnx_dir(root / "ckpt", root / "onnx", with_past=True)
    return model, root


def session(root, name="model.onnx"):
    return ort.InferenceSession(str(root / "onnx" / name), providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("side", ["right", "left"])
def test_onnx_runtime_gives_our_logits_for_padded_batches(exported, side):
    model, root = exported
    s = session(root)
    generator = torch.Generator().manual_seed(1)
    for lengths in ([1], [7, 3], [25, 9, 16]):  # windows of 6: most rows run past it
        width = max(lengths)
        ids = torch.randint(0, VOCAB, (len(lengths), width), generator=generator)
        mask = torch.zeros_like(ids)
        for b, n in enumerate(lengths):
            if side == "right":
                mask[b, :n] = 1
            else:
                mask[b, width - n :] = 1
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = s.run(
            ["logits"],
            {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), "position_ids": pos.numpy()},
        )[0]
        with torch.no_grad():
            for b in range(len(lengths)):
                real = mask[b].bool()
                ours = model(ids[b, real][None])[0]
                got = torch.from_numpy(logits[b][real.numpy()])
                torch.testing.assert_close(got, ours, atol=1e-4, rtol=1e-4)


def test_greedy_decoding_with_the_past_inputs_equals_neo_generate(exported):
    model, root = exported
    prefill, step = session(root), session(root, "decoder_with_past.onnx")
    prompts = [[464, 3290, 286], [15496, 11, 314, 1101, 257, 3303, 2746, 11]]
    new = 12
    # eos_id outside the vocabulary: no end-of-text, all 12 tokens
    expected = generate_ids(model, prompts, GenerationConfig(max_new_tokens=new), eos_id=VOCAB + 1)
    width = max(map(len, prompts))
    ids = np.array([p + [0] * (width - len(p)) for p in prompts])
    mask = np.array([[1] * len(p) + [0] * (width - len(p)) for p in prompts])
    outputs = prefill.run(
        None,
        {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": np.maximum(mask.cumsum(-1) - 1, 0),
        },
    )
    names = [o.name.replace("present.", "past_key_values.") for o in prefill.get_outputs()][1:]
    last = mask.sum(-1) - 1
    tokens = outputs[0][np.arange(len(prompts)), last].argmax(-1)
    produced = [[int(t)] for t in tokens]
    past = dict(zip(names, outputs[1:], strict=True))
    positions = last + 1
    for _ in range(new - 1):
        mask = np.concatenate([mask, np.ones((len(prompts), 1), dtype=mask.dtype)], axis=1)
        outputs = step.run(
            None,
            {
                "input_ids": tokens[:, None],
                "attention_mask": mask,
                "position_ids": positions[:, None],
                **past,
            },
        )
        past = dict(zip(names, outputs[1:], strict=True))
        tokens = outputs[0][:, -1].argmax(-1)
        positions = positions + 1
        for row, t in zip(produced, tokens, strict=True):
            row.append(int(t))
    assert produced == [e[0].token_ids for e in expected]


def test_the_cli_exports_and_verify_checks_it(exported, tmp_path):
    _, root = exported
    done = subprocess.run(
        [
            NEO,
            "export",
            f"input={root / 'ckpt'}",
            f"output={tmp_path / 'o'}",
            "format=onnx",
            "with_past=false",
            "dtype=float16",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "o" / "decoder_with_past.onnx").exists()
    checked = subprocess.run([NEO, "verify", str(tmp_path / "o")], capture_output=True, text=True)
    assert checked.returncode == 0 and "probe in ONNX Runtime (model.onnx)" in checked.stdout
    card = (tmp_path / "o" / "README.md").read_text()
    assert "onnxruntime" in card and "MIGraphX" in card and "Not run by neotrain's tests" in card


def test_bad_input_is_refused_and_leaves_nothing(exported, tmp_path):
    _, root = exported
    # The settings' rules apply when neo export resolves its config, before anything is read.
    onnx = dict(input=str(root / "ckpt"), output=str(tmp_path / "a"), format="onnx")
    with pytest.raises(ConfigError, match="opset=12"):
        resolve_plain(ExportConfig(**onnx, opset=12))
    with pytest.raises(ConfigError, match="dtype=bfloat16"):
        resolve_plain(ExportConfig(**onnx, dtype="bfloat16"))
    with pytest.raises(ConfigError, match="max_shard_size=1GB is not read"):
        resolve_plain(ExportConfig(**onnx, max_shard_size="1GB"))
    done = subprocess.run(
        [NEO, "export", *(f"{k}={v}" for k, v in onnx.items()), "opset=12"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "opset=12" in done.stderr
    assert not (tmp_path / "a").exists()
    done = subprocess.run(
        [NEO, "export", f"input={root / 'ckpt'}", f"output={root / 'onnx'}", "format=onnx"],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2 and "overwrite=true" in done.stderr
