"""What the preference tests share (neo dpo's and the reward model's): the sample records they
compare with TRL, and the kill-and-resume of a run."""

import json
import time
from pathlib import Path

from runs import kill

from train.loop.metrics import read_metrics

PROMPT = "### Instruction:\nWhat does `{}` do?\n\n### Response:\n"

# Explicit prompts, a rejected response of shuffled words, and an implicit prompt (Anthropic
# hh-rlhf: the texts' shared prefix, its last space moved on to the responses, as TRL's
# extract_prompt cuts it); each test adds a record of its own.
RECORDS = [
    {
        "prompt": PROMPT.format("textwrap.dedent"),
        "chosen": "Remove any common leading whitespace from every line.",
        "rejected": "Return the number of items in a container.",
    },
    {
        "prompt": PROMPT.format("len"),
        "chosen": "Return the number of items in a container.",
        "rejected": "container. a items Return in of number the",
    },
    {
        "chosen": "Human: Is the sky blue? Assistant: Yes, on a clear day.",
        "rejected": "Human: Is the sky blue? Assistant: Bananas are yellow.",
    },
]


def kill_after_step(proc, metrics: Path, step: int = 4, poll: float = 0.1) -> None:
    """SIGKILL the run `proc` (started with wait=False) once `metrics` has logged `step`;
    it must still be running then (else its output is the failure's message)."""
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        lines = metrics.read_text().splitlines() if metrics.exists() else []
        if max((json.loads(x).get("step", 0) for x in lines if x.endswith("}")), default=0) >= step:
            break
        time.sleep(poll)
    assert proc.poll() is None, proc.stdout.read()
    kill(proc)


def values_by_step(run: Path, keys: tuple[str, ...]) -> dict[int, dict]:
    """The run's logged `keys`, step by step (steps that logged none of them left out)."""
    out = {}
    for r in read_metrics(run):
        values = {k: r[k] for k in keys if k in r}
        if values:
            out.setdefault(r.get("step"), {}).update(values)
    return out
