"""What a run prints: the SFT samples' prompts, and wandb's share of the output."""

import logging

import pytest

from train.config.train import TrainConfig
from train.loop import metrics

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\nExplain what the os module is for.\n\n"
    "### Response:\n"
)


def logged_samples(tmp_path, caplog, prompts: list[str]) -> list[str]:
    cfg = TrainConfig(max_steps=10)
    cfg.logger.wandb.mode = "disabled"
    logger = metrics.MetricsLogger(tmp_path, cfg, enabled=True)
    samples = [{"prompt": p, "answer": "It is.", "reference": "r"} for p in prompts]
    with caplog.at_level(logging.INFO, logger="neo.train"):
        logger.validation(5, {"val/loss": 1.0}, samples)
    logger.close()
    return [m for m in caplog.messages if m.startswith("  sample: ")]


def test_sample_prompts_are_cut_at_a_line_or_word_with_an_ellipsis(tmp_path, caplog):
    """The end of the prompt, which the answer continues: from the start of a line or word
    after '…', never from the middle of a word; a short prompt whole."""
    words = " ".join(f"word{i}" for i in range(40))
    alpaca, long_line, short = logged_samples(tmp_path, caplog, [ALPACA, words, "Say hi.\n"])
    assert alpaca.startswith("  sample: '…### Instruction:\\nExplain what the os module is for.")
    assert "### Response:\\n' -> 'It is.'" in alpaca
    shown = long_line.split("'")[1]
    assert shown.startswith("…word") and words.endswith(shown[1:]) and len(shown) <= 81
    assert short == "  sample: 'Say hi.\\n' -> 'It is.'"


@pytest.mark.parametrize("text", ["x" * 100, "x" * 100 + " ", "a " + "y" * 120, "\n" * 90])
def test_a_prompt_with_no_boundary_to_cut_at_still_shows_its_end(text):
    shown = metrics.prompt_tail(text)
    assert shown.startswith("…") and text.endswith(shown[1:].lstrip()) and len(shown) <= 81


@pytest.mark.slow
def test_wandb_adds_one_line_saying_where_the_offline_run_is(tmp_path, caplog, capfd):
    """wandb's banner and closing summary (history, summary, sync advice: 30 lines and more)
    are silenced; the run's end says in one line where the offline run is and how to upload it,
    as a command that can be pasted."""
    import shlex

    run_dir = tmp_path / "my run"
    run_dir.mkdir()
    cfg = TrainConfig(max_steps=10)
    cfg.logger.wandb.mode = "offline"
    with caplog.at_level(logging.INFO, logger="neo.train"):
        logger = metrics.MetricsLogger(run_dir, cfg, enabled=True)
        for step in range(1, 4):
            logger._write({"step": step, "loss": 5.0 / step, "lr": 1e-3, "val/loss": 4.0})
        logger.close()
    printed = capfd.readouterr()
    assert "wandb" not in printed.out + printed.err, printed
    [line] = [m for m in caplog.messages if "wandb" in m]
    [folder] = list((run_dir / "wandb").glob("offline-run-*"))
    assert line.startswith(f"wandb: offline run in {folder}; upload it with `")
    sync = shlex.split(line.split("`")[1])
    assert sync == ["wandb", "sync", str(folder)]
