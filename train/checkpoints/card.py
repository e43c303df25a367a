"""The model card (README.md, Hugging Face's format with YAML metadata) of an exported directory,
from the run's own records: its config, last checkpoint, metrics, the prep manifest of its data,
the base and data of a fine-tuning, and `neo eval`'s results.json when given or found in the run.
Nothing here is typed in by hand: a fact the records do not hold is left out."""

from __future__ import annotations

from typing import Any

import torch
import yaml

from data_prep.tokenizers import GPT2_EOD
from train.checkpoints.run_records import RunRecords, hub_id
from train.config.model import ModelConfig
from train.model.heads import TaskHead
from train.model.sizes import count_parameters

GPT_NEO = ("gpt_neo_125m", "gpt_neo_1.3b", "gpt_neo_2.7b")
HF_CLASS = {True: "GPTNeoForCausalLM", False: "GPTNeoForSequenceClassification"}


def model_card(
    config: ModelConfig,
    tokenizer,
    dtype: torch.dtype,
    head: TaskHead | None,
    records: RunRecords | None = None,
) -> str:
    records = records or RunRecords()
    causal = head is None
    meta: dict[str, Any] = {
        "library_name": "transformers",
        "pipeline_tag": "text-generation" if causal else "text-classification",
        "tags": ["gpt-neo", "neotrain", "causal-lm" if causal else head.type],
    }
    if hub := hub_id(records.base()):  # the metadata takes a Hub id; a local path is in the text
        meta["base_model"] = hub
    lines = [
        "---",
        yaml.safe_dump(meta, sort_keys=False).rstrip(),
        "---",
        "",
        f"# {config.name}",
        "",
        f"A GPT-Neo style {_kind(head)} trained with neotrain, saved as `{HF_CLASS[causal]}`.",
        "",
        "## How to use",
        "",
        *_usage(causal),
        "",
        "Check the files and the model before use: `neo verify PATH` (checksums, loading, the",
        "logits of `probe.json`, the usage above), or `sha256sum -c checksums.sha256`.",
        "",
        "## Model",
        "",
        *_architecture(config, tokenizer, dtype),
    ]
    if head is not None:
        lines += ["", *task_card(head)]
    lines += ["", *_training(records, config)]
    if records.evaluation:
        lines += ["", *_evaluation(records)]
    lines += ["", *_limitations(config)]
    return "\n".join(lines) + "\n"


def onnx_card(config: ModelConfig, dtype: torch.dtype, description: dict, records) -> str:
    """The card of `neo export format=onnx`: its files, ONNX Runtime and MIGraphX usage."""
    past = "decoder_with_past.onnx" in description["files"]
    lines = [
        "---",
        "library_name: onnx",
        "pipeline_tag: text-generation",
        "tags:",
        "- gpt-neo",
        "- neotrain",
        "- onnx",
        "---",
        "",
        f"# {config.name} (ONNX)",
        "",
        f"A GPT-Neo style causal language model trained with neotrain, exported with torch's "
        f"ONNX exporter (opset {description['opset']}, {description['dtype']}).",
        "",
        "## Files",
        "",
        "- `model.onnx`: input_ids, attention_mask, position_ids (batch, sequence; int64) -> "
        "logits" + (", present.{i}.key / .value" if past else ""),
        *(
            [
                "- `decoder_with_past.onnx`: the same, for the new tokens, with "
                "past_key_values.{i}.key / .value (batch, heads, past, head_dim) and "
                "attention_mask over past + new tokens"
            ]
            if past
            else []
        ),
        "- `onnx_config.json`: names, shapes and sizes; the tokenizer files; `probe.json`; "
        "`checksums.sha256`",
        "",
        "Positions count real tokens (`position_ids = cumsum(attention_mask) - 1`); a key is "
        "seen when its mask is 1, so left- or right-padded batches both work.",
        "",
        "## ONNX Runtime",
        "",
        "```python",
        "import numpy as np, onnxruntime as ort",
        'session = ort.InferenceSession("PATH/model.onnx", providers=["CPUExecutionProvider"])',
        "ids = np.array([[15496, 11, 314, 1101, 257, 3303, 2746, 11]])",
        "mask = np.ones_like(ids)",
        'logits = session.run(["logits"], {"input_ids": ids, "attention_mask": mask,',
        '                                  "position_ids": np.cumsum(mask, -1) - 1})[0]',
        "```",
        "",
        "`neo verify PATH` checks the checksums and the probe in ONNX Runtime.",
        "",
        "## AMD MIGraphX",
        "",
        "`migraphx-driver perf --onnx PATH/model.onnx --input-dim @input_ids 1 8 "
        "@attention_mask 1 8 @position_ids 1 8`, or ONNX Runtime with "
        '`providers=["MIGraphXExecutionProvider"]`. Not run by neotrain\'s tests (no AMD GPU '
        "there): what was tested is ONNX Runtime's CPU provider.",
        "",
        "## Model",
        "",
        *_architecture(config, None, dtype),
        "",
        *_training(records, config),
        "",
        *_limitations(config),
    ]
    return "\n".join(line for line in lines if "tokenizer: none" not in line) + "\n"


def _usage(causal: bool) -> list[str]:
    if not causal:
        return [
            "```python",
            "from transformers import AutoModelForSequenceClassification, AutoTokenizer",
            'model = AutoModelForSequenceClassification.from_pretrained("PATH")',
            'tokenizer = AutoTokenizer.from_pretrained("PATH")',
            "```",
        ]
    return [
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline, set_seed",
        'model = AutoModelForCausalLM.from_pretrained("PATH")',
        'tokenizer = AutoTokenizer.from_pretrained("PATH")',
        'generator = pipeline("text-generation", model="PATH")',
        "set_seed(42)",
        """generator("Hello, I'm a language model,", max_length=30, num_return_sequences=5)""",
        "```",
    ]


def _architecture(config: ModelConfig, tokenizer, dtype: torch.dtype) -> list[str]:

    kinds = config.layer_kinds()
    local = sum(kind == "local" for kind in kinds)
    lines = [
        f"- parameters: {count_parameters(config).total:,}",
        f"- layers {config.num_layers}, hidden {config.hidden_size}, heads {config.num_heads}, "
        f"context {config.max_position_embeddings}, vocabulary {config.vocab_size}",
        f"- attention: {len(kinds) - local} global layers, {local} local layers "
        f"(window {config.window_size}); pattern {config.attention_types}",
        f"- weights: {str(dtype).removeprefix('torch.')}",
    ]
    if tokenizer is None:
        lines.append("- tokenizer: none was exported with it; tokenize with your own")
    else:
        lines.append(
            f"- tokenizer: {tokenizer.name} ({tokenizer.vocab_size} tokens), end of "
            f"text {tokenizer.eod_token!r} = {tokenizer.eod_id}"
        )
        if tokenizer.eod_token == GPT2_EOD and tokenizer.name == "gpt2":
            lines.append("  (GPT-2's byte-level BPE, as every EleutherAI GPT-Neo model)")
    if config.scale_attn_weights:
        lines.append(
            "- trained with attention scores scaled by 1/sqrt(head_dim) (GPT-3 style); GPT-Neo "
            "has no such scaling, so the scale is folded into each q_proj weight"
        )
    return lines


def _training(records: RunRecords, config: ModelConfig) -> list[str]:
    lines = ["## Training"]
    if records.run_dir is None:
        return [
            *lines,
            "",
            "No run records were found beside the checkpoint (exported from a "
            "checkpoint alone): the data and settings are unknown here.",
        ]
    c, s = records.config, records.state
    lines.append("")
    if records.verb == "sft":
        sft = c.get("sft") or {}
        # `head` (runs written before it was renamed: `task`)
        task = (c.get("head") or c.get("task") or {}).get("type", "lm")
        lora = c.get("lora") or {}
        base = records.base()
        data = f"`{sft['path']}`" if sft.get("path") else "the bundled sample"
        if task == "reward":
            data += " of preference pairs" if not sft.get("path") else ""
            task = "reward: chosen and rejected responses, Bradley-Terry loss"
        hub = f" (Hugging Face Hub: {hub_id(base)})" if hub_id(base) else ""
        lines += [
            f"- fine-tuned (`neo sft`) from `{base}`{hub}"
            if base
            else "- trained by `neo sft` from fresh weights (no base model)",
            f"- data: {data} ({sft.get('format') if task == 'lm' else f'task {task}'})",
        ]
        if lora.get("r"):
            lines.append(
                f"- LoRA r={lora['r']}, alpha {lora.get('alpha')} on "
                f"{', '.join(lora.get('target_modules', []))}, merged"
            )
    if records.verb == "dpo":
        lines += _preference(records)
    if records.manifest:
        m = records.manifest
        tok = m.get("tokenizer", {})
        lines += [
            f"- data: `{(c.get('data') or {}).get('path')}`, prepared by `neo prep` "
            f"({m['totals']['documents']:,} documents, {m['totals']['tokens']:,} tokens; "
            f"tokenizer {tok.get('name')}, vocab.json/tokenizer sha256 "
            f"{next(iter((tok.get('sha256') or {}).values()), '?')[:12]}...):",
            "",
            "| source | documents | tokens |",
            "|---|---:|---:|",
        ]
        lines += [
            f"| {name} | {v['documents']:,} | {v['tokens']:,} |" for name, v in m["sources"].items()
        ]
        lines.append("")
    seq_len = (c.get("data") or {}).get("seq_len") or config.max_position_embeddings
    if s:
        lines.append(
            f"- {s.get('step', '?'):,} steps, {s.get('tokens', 0):,} tokens seen; global batch "
            f"{c.get('global_batch_size')} x {seq_len} tokens"
        )
        lr = (c.get("optim") or {}).get("lr")
        lines.append(
            f"- {s.get('world_size')} ranks, ZeRO-{s.get('zero_stage')}, "
            f"{s.get('precision')}; learning rate {lr}"
        )
    final = {k: v for k, v in records.final.items() if k != "step" and isinstance(v, float)}
    if final:
        shown = ", ".join(
            f"{k} {v:.4f}"
            for k, v in final.items()
            if "/" not in k or k.startswith("val/") and k.count("/") == 1
        )
        lines.append(f"- final validation (step {records.final.get('step')}): {shown}")
    return lines


def _preference(records: RunRecords) -> list[str]:
    """A `neo dpo` run: its base (the reference too), pairs, loss, and the reward accuracy and
    margin on its held-out pairs at the last validation."""
    dpo, lora, base = (
        records.config.get("dpo") or {},
        records.config.get("lora") or {},
        records.base(),
    )
    hub = f" (Hugging Face Hub: {hub_id(base)})" if hub_id(base) else ""
    data = f"`{dpo['path']}`" if dpo.get("path") else "the bundled preference sample"
    loss = f"{dpo.get('loss_type')} loss, beta {dpo.get('beta')}"
    if dpo.get("loss_type") == "robust":
        loss += f", label smoothing {dpo.get('label_smoothing')}"
    lines = [
        f"- preference-tuned (`neo dpo`, DPO) from `{base}`{hub}, which is also the reference"
        if base
        else "- preference-tuned by `neo dpo` from fresh weights (its own reference)",
        f"- data: {data} (chosen and rejected responses); {loss}",
    ]
    if lora.get("r"):
        lines.append(
            f"- LoRA r={lora['r']}, alpha {lora.get('alpha')} on "
            f"{', '.join(lora.get('target_modules', []))}, merged"
        )
    final = records.final
    if "val/rewards/accuracies" in final:
        lines.append(
            f"- held-out pairs (step {final.get('step')}): reward accuracy "
            f"{final['val/rewards/accuracies']:.4f}, reward margin "
            f"{final.get('val/rewards/margins', float('nan')):.4f}"
        )
    return lines


def _evaluation(records: RunRecords) -> list[str]:
    e = records.evaluation
    settings = e.get("settings", {})
    lines = [
        "## Evaluation",
        "",
        f"`neo eval` ({records.evaluation_file.name}; {settings.get('num_fewshot', 0)}-shot, "
        f"limit {settings.get('limit')}), beside the GPT-Neo authors' numbers (EleutherAI/gpt-neo "
        "README, lm-evaluation-harness):",
        "",
        "| task | metric | value | ± | GPT-Neo 125M | GPT-Neo 1.3B | GPT-Neo 2.7B |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    published = e.get("published", {})
    for task, result in e.get("results", {}).items():
        for metric, value in result.get("metrics", {}).items():
            err = (result.get("stderr") or {}).get(metric)
            ref = published.get(task, {}).get(metric, {})
            lines.append(
                f"| {task} | {metric} | {value:.4f} | {f'{err:.4f}' if err is not None else ''} | "
                + " | ".join(f"{ref[m]:.4f}" if m in ref else "" for m in GPT_NEO)
                + " |"
            )
    return lines


def _limitations(config: ModelConfig) -> list[str]:
    lines = [
        "## Intended use and limitations",
        "",
        "A research model: it continues text the way its training data does, including that "
        "data's errors and biases, and states nothing reliably. Evaluate it on your own task "
        "before relying on it.",
    ]
    if any(kind == "local" for kind in config.layer_kinds()):
        lines.append(
            '\nLocal layers need `attn_implementation="eager"` (the default) or `"sdpa"`: '
            "transformers' `flash_attention_2` path for GPT-Neo ignores the window and makes "
            "local layers global, which changes the outputs."
        )
    return lines


def _kind(head: TaskHead | None) -> str:
    if head is None:
        return "causal language model"
    return "reward model" if head.type == "reward" else "classifier"


def reward_card() -> list[str]:
    """How to score with a reward model (neo sft head=reward)."""
    return [
        "## Reward model",
        "",
        "Saved as `GPTNeoForSequenceClassification` with `num_labels=1` (`score`, no bias): the",
        "logit is the reward of the whole text, prompt and response together, trained on",
        "preference pairs with the pairwise Bradley-Terry loss (TRL's RewardTrainer). It reads",
        "the final hidden state at the last token that is not padding (`pad_token_id`, the",
        "end-of-text token): end a text with the end-of-text token or not (it was trained",
        "with one, as TRL adds it), and right-pad batches with it.",
    ]


def task_card(head: TaskHead) -> list[str]:
    """How to feed a task model: GPT-1's input transformation, and what differs from
    GPTNeoForSequenceClassification's usual use."""
    if head.type == "reward":
        return reward_card()
    t = head.tokens
    build = {
        "classification": f"{t['start']}TEXT{t['classify']}",
        "entailment": f"{t['start']}PREMISE{t['delim']}HYPOTHESIS{t['classify']}",
        "similarity": f"{t['start']}A{t['delim']}B{t['classify']}, and B before A",
        "multiple_choice": f"{t['start']}CONTEXT{t['delim']}CHOICE{t['classify']} per choice",
    }[head.type]
    lines = [
        f"## Task head: {head.type}",
        "",
        "Saved as `GPTNeoForSequenceClassification` (`score`, no bias). It was trained on",
        f"inputs built as `{build}` (ids {head.token_ids}); the head reads the final hidden",
        "state at the classify token, which transformers finds as the last token that is not",
        "padding (`pad_token_id`, the end-of-text token): right-pad batches, and never end an",
        "input with the end-of-text token.",
    ]
    if head.type == "similarity":
        lines.append("The trained logits are the sum of the logits of both orders.")
    elif head.type == "multiple_choice":
        lines.append("Each choice gets one score; the prediction is the softmax over choices.")
    else:
        lines.append(f"Labels: {', '.join(head.labels)}.")
    return lines
