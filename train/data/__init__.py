"""What the trainers read: records (the one JSON-lines and hub reader), pretraining samples from
token shards, SFT examples and packing, GPT-1 task inputs, and neo sft's data as a whole."""
