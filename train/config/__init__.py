"""Every verb's typed schema (torch-free), its composition with Hydra (compose.py) and the one
`resolve` per verb (resolve.py). Import from the modules: model, run, train, sft, evaluation,
tools, schemas, compose, resolve, rules."""
