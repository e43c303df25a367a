"""What makes an exported directory verifiable without asking us: `checksums.sha256` over every
file, and `probe.json`, a fixed prompt's token ids with the model's top logits at export time.

`verify(dir)` (`neo verify DIR`, and the exporter on what it wrote before renaming it into
place) checks every checksum, loads the directory with transformers offline, recomputes the
probe and compares, and runs the card's own usage through `pipeline`. Every failure is named.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from train.checkpoints.checksums import CHECKSUMS, VerifyError, check_checksums
from train.checkpoints.load import model_from_state
from train.config.model import ModelConfig
from train.model.heads import TaskGPT, TaskHead

log = logging.getLogger("neo.verify")

PROBE = "probe.json"
PROMPT = "Hello, I'm a language model,"
TOP = 10
# |our logit - transformers' logit| allowed, by the weights' dtype (bf16 keeps 8 bits).
TOLERANCE = {"float32": 1e-3, "float16": 5e-2, "bfloat16": 2.5e-1}


def probe_ids(tokenizer, head: TaskHead | None, vocab_size: int) -> list[int]:
    ids = tokenizer.encode(PROMPT) if tokenizer is not None else list(range(min(8, vocab_size)))
    if head is not None and head.token_ids:  # GPT-1's tokens (a reward model has none)
        ids = [head.token_ids["start"], *ids, head.token_ids["classify"]]
    return ids


def probe(
    config: ModelConfig,
    state: dict[str, torch.Tensor],
    tokenizer,
    head: TaskHead | None,
    dtype: torch.dtype,
    kind: str | None = None,
) -> dict:
    """Our model's logits (in `dtype`) on the probe ids: the top TOP of the causal LM's last
    position, or a task head's logits."""
    ids = probe_ids(tokenizer, head, config.vocab_size)
    weights = {k: v.to(dtype) for k, v in state.items()}  # no copy when already in dtype
    with torch.no_grad():
        if head is None:
            logits = model_from_state(config, weights).eval()(torch.tensor([ids]))[0, -1]
        else:
            with torch.device("meta"):
                model = TaskGPT(config, head)
            model.load_state_dict(weights, assign=True)
            model.tie_weights()
            at = torch.tensor([[len(ids) - 1]])
            logits = model.eval().classify(torch.tensor([[ids]]), at)[0][0]
    del weights
    logits = logits.float()
    top = torch.topk(logits, min(TOP, logits.numel()))
    return {
        "prompt": PROMPT if tokenizer is not None else None,
        "input_ids": ids,
        "dtype": str(dtype).removeprefix("torch."),
        "kind": kind or ("causal_lm" if head is None else "sequence_classification"),
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.tolist(),
    }


def write_probe(directory: Path, record: dict) -> None:
    (directory / PROBE).write_text(json.dumps(record, indent=1) + "\n")


def verify(directory: str | Path, usage: bool = True) -> list[str]:
    """Every check on an exported directory; the lines saying what passed. VerifyError names
    the first failure."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
    )

    directory = Path(directory)
    if not (directory / "config.json").is_file() and not (directory / "model.onnx").is_file():
        raise VerifyError(f"{directory}: no config.json or model.onnx (not an exported model)")
    done = [f"checksums: {check_checksums(directory)} files match {CHECKSUMS}"]
    probe_file = directory / PROBE
    if not probe_file.is_file():
        raise VerifyError(f"{probe_file}: missing")
    probe = json.loads(probe_file.read_text())
    if probe["kind"] == "onnx":
        return done + _verify_onnx(directory, probe)
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    causal = probe["kind"] == "causal_lm"
    loader = AutoModelForCausalLM if causal else AutoModelForSequenceClassification
    try:
        model = loader.from_pretrained(
            directory, local_files_only=True, attn_implementation="eager"
        ).eval()
    except Exception as e:  # transformers' own errors, whatever they are, named here
        raise VerifyError(
            f"{directory}: transformers cannot load it ({type(e).__name__}: {e})"
        ) from None
    done.append(f"loads offline as {type(model).__name__} ({config.dtype})")
    with torch.no_grad():
        out = model(torch.tensor([probe["input_ids"]])).logits.float()
    logits = out[0, -1] if causal else out[0]
    expected = torch.tensor(probe["top_logits"])
    got = logits[torch.tensor(probe["top_ids"])]
    worst = float((got - expected).abs().max())
    if worst > TOLERANCE.get(probe["dtype"], 1e-3):
        raise VerifyError(
            f"{probe_file}: transformers' logits differ from the export's by "
            f"{worst:.3g} (allowed {TOLERANCE.get(probe['dtype'], 1e-3)})"
        )
    done.append(f"probe: top-{len(expected)} logits within {worst:.2g} of the export's")
    del model  # the pipeline loads its own: one copy of the weights at a time
    has_tokenizer = (directory / "tokenizer.json").is_file()
    if usage and causal and has_tokenizer:
        from transformers import pipeline, set_seed

        AutoTokenizer.from_pretrained(directory, local_files_only=True)
        set_seed(42)
        generator = pipeline("text-generation", model=str(directory))
        texts = generator(PROMPT, max_length=30, num_return_sequences=5)
        if len(texts) != 5 or not all(t["generated_text"].startswith(PROMPT) for t in texts):
            raise VerifyError(f"{directory}: the card's pipeline usage did not give 5 texts")
        done.append("the card's usage: pipeline('text-generation') gave 5 continuations")
    elif not has_tokenizer:
        done.append("no tokenizer in the directory: the pipeline usage was not run")
    return done


def _verify_onnx(directory: Path, probe: dict) -> list[str]:
    """The probe through ONNX Runtime (CPU): model.onnx, and with past inputs the same last
    position from decoder_with_past.onnx fed model.onnx's presents for all but the last token."""
    import numpy as np
    import onnxruntime as ort

    ids = np.array([probe["input_ids"]], dtype=np.int64)
    n = ids.shape[1]
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones_like(ids),
        "position_ids": np.arange(n, dtype=np.int64)[None],
    }
    try:
        session = ort.InferenceSession(
            str(directory / "model.onnx"), providers=["CPUExecutionProvider"]
        )
    except Exception as e:  # ONNX Runtime's own errors, named here
        raise VerifyError(
            f"{directory / 'model.onnx'}: ONNX Runtime cannot load it ({e})"
        ) from None
    results = [("model.onnx", session.run(None, feed)[0][0, -1])]
    with_past = directory / "decoder_with_past.onnx"
    if with_past.is_file() and n > 1:
        first = session.run(None, {k: v[:, : n - 1] for k, v in feed.items()})
        names = [o.name for o in session.get_outputs()][1:]
        step = ort.InferenceSession(str(with_past), providers=["CPUExecutionProvider"])
        inputs = {
            "input_ids": ids[:, -1:],
            "attention_mask": np.ones_like(ids),
            "position_ids": np.array([[n - 1]], dtype=np.int64),
        }
        for name, value in zip(names, first[1:], strict=True):
            inputs[name.replace("present.", "past_key_values.")] = value
        results.append(("decoder_with_past.onnx", step.run(None, inputs)[0][0, -1]))
    lines = []
    for name, logits in results:
        got = torch.from_numpy(np.asarray(logits, dtype=np.float32))[torch.tensor(probe["top_ids"])]
        worst = float((got - torch.tensor(probe["top_logits"])).abs().max())
        if worst > TOLERANCE.get(probe["dtype"], 1e-3):
            raise VerifyError(
                f"{directory / name}: ONNX Runtime's logits differ from the export's by {worst:.3g}"
            )
        lines.append(f"probe in ONNX Runtime ({name}): top-{len(got)} logits within {worst:.2g}")
    return lines
