"""Benchmarks behind `deitlt bench`; each prints its figures and the ratio to its baseline."""
