"""Run in an environment of its own with openMind's pins (tests/checkpoints/test_openmind.py):
openMind's `pipeline` (the PyTorch backend, as the GPT-Neo 1.3B card uses it on NPU, here on
CPU) loads a neotrain export, generates the card's five continuations, and its model recomputes
the export's probe. Prints one line of versions and the probe's largest difference.

    python openmind_check.py EXPORT_DIR
"""

import json
import sys
from pathlib import Path

import torch
import transformers
from openmind import pipeline

directory = sys.argv[1]
probe = json.loads(Path(directory, "probe.json").read_text())
generator = pipeline(
    "text-generation", model=directory, framework="pt", backend="transformers", device="cpu"
)
torch.manual_seed(0)
texts = generator(probe["prompt"], max_length=30, num_return_sequences=5, do_sample=True)
texts = [t if isinstance(t, str) else t["generated_text"] for t in texts]  # openMind: strings
assert len(texts) == 5 and all(t.startswith(probe["prompt"]) for t in texts), texts
model = generator.pipeline.model.eval()
with torch.no_grad():
    logits = model(torch.tensor([probe["input_ids"]])).logits[0, -1].float()
worst = (logits[probe["top_ids"]] - torch.tensor(probe["top_logits"])).abs().max().item()
print(
    f"openmind ok: transformers {transformers.__version__}, {type(model).__name__}, "
    f"probe max diff {worst:.3g}"
)
