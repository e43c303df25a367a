"""Primary configs of the verbs whose `model=` is a checkpoint path (neo eval, neo generate).

They live apart from configs/model/ on purpose: in a search path that holds the `model` group,
Hydra reads `model=PATH` as a choice of model size and fails."""
