"""The machinery every verb that trains shares (neo train, neo sft): the engine (DeepSpeed),
optimizer and schedule, run state, checkpointing and resume, metrics and throughput, the
evaluators' interface, the loop itself (fit) and the run's start and end."""
