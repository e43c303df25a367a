"""The machinery every verb that trains shares: run state, the run-checkpoint format, resume,
validation, metrics and throughput, collectives and stop signals. The verbs (train/verbs/train.py,
later fine-tuning) build a Trainer and run the loop over these parts."""
