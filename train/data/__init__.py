"""What the trainers read: pretraining samples from token shards (pretrain.py); SFT records,
prompt templates and packing (sft.py, packing.py)."""
