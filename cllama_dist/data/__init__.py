"""Corpus readers, packing, Arrow shards and the shard manifest (no torch imports here)."""
