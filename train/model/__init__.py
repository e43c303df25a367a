"""The model and what computes with it: the GPT, attention and its one mask definition, the KV
cache, GPT-1's task head, LoRA, sizes and FLOPs, decoding. torch only: no file I/O, no
torch.distributed, no DeepSpeed."""
