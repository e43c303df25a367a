"""Where the benchmark files come from (neo eval downloads nothing, and says where each file is
published), and which published GPT-Neo numbers a result is shown beside."""

import json
import logging
from pathlib import Path

import pytest
from conftest import ROOT
from omegaconf import OmegaConf

from train.config.evaluation import BENCHMARKS, EvalConfig
from train.errors import NotFound
from train.evals.published import left_out, references
from train.evals.runner import TaskResult
from train.evals.suite import select_tasks
from train.evals.tasks import PUBLISHED, SPECS, load_task
from train.verbs.eval import table

# ---------------------------------------------------------------------------------------------
# where the files come from


def test_benchmark_files_are_looked_for_inside_the_working_directory():
    """The default data_dir is data/eval beside data/pile_sample, not a folder outside the
    repository that a user does not have."""
    yaml_default = OmegaConf.load(ROOT / "configs" / "eval.yaml").data_dir
    assert EvalConfig().data_dir == yaml_default == "data/eval"


@pytest.mark.parametrize("name", BENCHMARKS)
def test_a_missing_benchmark_file_says_where_it_is_published(name, tmp_path):
    """One line: the file, its format, the URL of the published file and the name to save it
    under, that nothing is downloaded, and the key that points elsewhere."""
    path = tmp_path / "data" / "eval" / SPECS[name].default_file
    with pytest.raises(NotFound) as caught:
        load_task(name, name, str(path), strict=False)
    message = str(caught.value)
    assert "\n" not in message
    assert f"task {name}: {path} does not exist; expected " in message
    assert f"neo eval downloads nothing: save {SPECS[name].source} as {path}" in message
    assert "https://" in SPECS[name].source and f"task.{name}.path=FILE" in message


def test_the_readme_lists_every_benchmark_file_and_its_source():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("#### Benchmark files")[1].split("\n#")[0]
    for name in BENCHMARKS:
        spec = SPECS[name]
        assert f"`{spec.default_file}`" in section, name
        url = spec.source.split("https://")[1].split()[0].rstrip(",)")
        assert url in section, name


def test_the_tasks_left_out_are_said_in_one_line(tmp_path, caplog):
    cfg = EvalConfig(data_dir=str(tmp_path / "none"))
    cfg.task["val"]["path"] = str(tmp_path)  # val found; no benchmark file
    with caplog.at_level(logging.INFO, logger="neo.eval"):
        assert list(select_tasks(cfg, default_set=True)) == ["val"]
    [line] = caplog.messages
    assert line.startswith("left out, not found: lambada_openai (")
    assert all(name in line for name in BENCHMARKS) and "downloads nothing" in line


# ---------------------------------------------------------------------------------------------
# published numbers beside a result


def val_result(source: Path, num_fewshot: int = 0) -> TaskResult:
    metrics = {"loss": 2.0, "perplexity": 7.389, "bits_per_byte": 0.9}
    return TaskResult("val", "val", metrics, {}, 64, num_fewshot, 0, [], str(source))


def prepared(tmp_path: Path, input_name: str) -> Path:
    """A `neo prep` directory's manifest, made from one input file of that name."""
    out = tmp_path / input_name.split(".")[0]
    out.mkdir()
    inputs = [{"path": f"/data/pile/{input_name}", "format": "jsonl.zst"}]
    (out / "manifest.json").write_text(json.dumps({"inputs": inputs}))
    return out


def test_val_on_other_data_is_shown_without_the_pile_numbers(tmp_path):
    """The bundled sample or a user's corpus: GPT-Neo's Pile numbers would compare unlike
    with unlike; they are left out of the table and results, and a note says why."""
    result = val_result(prepared(tmp_path, "my_corpus.jsonl"))
    shown = table([result], "gpt2")
    for values in PUBLISHED["val"].values():
        for value in values.values():
            assert f"{value:.4f}" not in shown
    assert references(result, "gpt2") == {}
    assert "on the Pile's validation set (val.jsonl.zst)" in left_out(result, "gpt2")


def test_val_on_the_pile_validation_set_is_shown_beside_them(tmp_path):
    result = val_result(prepared(tmp_path, "val.jsonl.zst"))
    shown = table([result], "gpt2")
    assert "0.7527" in shown and "6.1590" in shown and left_out(result, "gpt2") is None
    # Another tokenizer: bits per byte still compare, perplexity (per token) does not.
    assert set(references(result, "sentencepiece")) == {"bits_per_byte"}
    assert "0.7527" in table([val_result(tmp_path / "val.jsonl.zst")], "gpt2")


def test_few_shot_results_are_not_set_beside_zero_shot_numbers():
    metrics = {"acc": 0.5, "perplexity": 20.0}
    result = TaskResult("lambada_openai", "loglikelihood", metrics, {}, 10, 3, 0, [], "f")
    assert references(result, "gpt2") == {} and "0.3736" not in table([result], "gpt2")
    assert "zero-shot" in left_out(result, "gpt2")
    zero_shot = TaskResult("lambada_openai", "loglikelihood", metrics, {}, 10, 0, 0, [], "f")
    assert "0.3736" in table([zero_shot], "gpt2")
