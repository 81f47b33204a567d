"""Datasets: long-tail arithmetic, raw sources, shard writing and the DALI input pipeline."""
