"""Formats on disk, knowing no training loop: the neotrain model format, run checkpoints, ZeRO
consolidation, Hugging Face and ONNX, LoRA adapters, the model card, one loader for any
checkpoint, export and verification."""
