"""The reference: lm-evaluation-harness itself, run on the same files as `neo eval`.

The harness reads local files through task YAMLs. For each of our tasks this writes one that
includes the harness's own task definition (prompts, preprocessing, metrics) and replaces only
its dataset with the local file, converted to the fields the hub dataset has. Tests and
bench/eval.py run `lm_eval --model hf` on an exported directory with them, offline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

YAML = {
    "lambada_openai": "lambada/lambada_openai.yaml",
    "wikitext": "wikitext/wikitext.yaml",
    "pubmedqa": "pubmedqa/pubmedqa.yaml",
    "hellaswag": "hellaswag/hellaswag.yaml",
    "piqa": "piqa/piqa.yaml",
    "winogrande": "winogrande/default.yaml",
    "mathqa": "mathqa/mathqa.yaml",
}
MC_YAML = """\
output_type: multiple_choice
doc_to_text: "{{query}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{gold}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


def harness_tasks_dir() -> Path:
    import lm_eval

    return Path(lm_eval.__file__).parent / "tasks"


def write_task(directory: Path, task_type: str, records: list[dict], name: str) -> str:
    """A harness task `neo_<name>` reading `records` (hub-dataset fields) from a local JSON
    lines file; returns its name."""
    directory.mkdir(parents=True, exist_ok=True)
    data = directory / f"{name}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    task = f"neo_{name}"
    lines = [f"task: {task}"]
    if task_type in YAML:
        lines.append(f"include: {harness_tasks_dir() / YAML[task_type]}")
    else:
        lines.append(MC_YAML)
    lines += [
        "tag: []",
        "dataset_path: json",
        "dataset_name: null",
        f"dataset_kwargs: {{data_files: {{test: {json.dumps(str(data))}}}}}",
        "training_split: null",
        "validation_split: null",
        "test_split: test",
    ]
    (directory / f"{task}.yaml").write_text("\n".join(lines) + "\n")
    return task


def run_harness(
    model_dir: str | Path,
    tasks_dir: Path,
    tasks: list[str],
    output: Path,
    batch_size: int = 16,
    limit: int | None = None,
) -> dict:
    """`lm_eval --model hf` on model_dir (CPU, float32, offline); its results and samples."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env["TRANSFORMERS_OFFLINE"] = "1"
    command = [
        sys.executable,
        "-m",
        "lm_eval",
        "--model",
        "hf",
        "--model_args",
        f"pretrained={model_dir},dtype=float32",
        "--tasks",
        ",".join(tasks),
        "--include_path",
        str(tasks_dir),
        "--device",
        "cpu",
        "--batch_size",
        str(batch_size),
        "--output_path",
        str(output),
        "--log_samples",
    ]
    if limit is not None:
        command += ["--limit", str(limit)]
    subprocess.run(command, check=True, env=env, capture_output=True, text=True)
    results = json.loads(next(output.rglob("results_*.json")).read_text())
    samples = {}
    for task in tasks:
        file = next(output.rglob(f"samples_{task}_*.jsonl"))
        samples[task] = [json.loads(line) for line in file.read_text().splitlines()]
    return {"results": results["results"], "samples": samples}
