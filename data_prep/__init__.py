"""Corpus -> tokens -> shards. No torch.distributed in here."""
