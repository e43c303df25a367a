"""`make demo`'s script (train/verbs/demo.py), its commands recorded instead of run: what it
runs, how it prints them, and that it says how long each step took."""

import json
import shlex
import sys
import types

from train.verbs import demo


def test_the_demo_trains_both_models_as_two_processes_and_prints_pasteable_commands(
    tmp_path, monkeypatch, capsys
):
    """Pretraining and fine-tuning both run as 2 single-threaded processes (torchrun): one
    process of 2 threads took 4 times as long to fine-tune on a 2-core machine busy with other
    work. Every command is echoed as it can be pasted into a shell, with its time."""
    ran = []
    monkeypatch.setattr(demo.subprocess, "run", lambda words, check: ran.append(list(words)))
    monkeypatch.chdir(tmp_path)
    run = tmp_path / "runs" / "demo"
    run.mkdir(parents=True)
    machine = {"name": "a CPU", "threads": 1}
    records = [
        {"step": 0, "event": "start", "precision": "fp32", "precision_reason": "r"},
        {"step": 50, "val/loss": 7.0, "val/bits_per_byte": 2.7},
        {"step": 150, "val/loss": 6.5, "val/bits_per_byte": 2.5},
    ]
    records[0]["machine"] = machine
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    dpo_run = tmp_path / "runs" / "demo-dpo"
    dpo_run.mkdir(parents=True)
    held_out = [
        {"step": 0, "val/rewards/accuracies": 0.0},
        {"step": 15, "val/rewards/accuracies": 0.6},
        {"step": 30, "val/rewards/accuracies": 0.8},
    ]
    # closer to the chosen, to the rejected; looping
    answers = [(0.4, 0.3, 0.45), (0.45, 0.3, 0.3), (0.5, 0.25, 0.2)]
    for r, (chosen, rejected, loops) in zip(held_out, answers, strict=True):
        r["val/answers/closer_to_chosen"], r["val/answers/closer_to_rejected"] = chosen, rejected
        r["val/answers/loops"] = loops
    (dpo_run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in held_out))
    fake = types.ModuleType("transformers")
    fake.pipeline = lambda *a, **k: lambda prompt, **kw: [{"generated_text": prompt + " ..."}]
    monkeypatch.setitem(sys.modules, "transformers", fake)

    demo.main()

    torchrun = [str(demo.BIN / "torchrun"), "--standalone", "--nproc_per_node=2", "-m"]
    verbs = {words[5] if words[0].endswith("torchrun") else words[1]: words for words in ran}
    assert verbs["train"][:4] == torchrun and verbs["sft"][:4] == torchrun
    out = capsys.readouterr().out
    echoed = [line[2:] for line in out.splitlines() if line.startswith("$ ")]
    assert [shlex.split(line) for line in echoed] == ran  # pasted, each is the command run
    assert "prompt=It is a truth universally acknowledged" in verbs["generate"]
    # the demo ends with a short DPO of the fine-tuned model, and its held-out reward accuracy
    assert ran[-1][1] == "dpo" and "base=runs/demo-sft" in verbs["dpo"]
    assert "DPO reward accuracy on held-out pairs: 0.60 -> 0.80 (0.5 is chance)" in out
    assert (
        "greedy answers to held-out prompts closer to the chosen than to the rejected response: "
        "0.40 before, 0.50 after (to the rejected: 0.30 -> 0.25); that loop: 0.45 -> 0.20"
    ) in out
    assert out.count("\n[0m0") == len(ran) and "The demo took 0m0" in out
