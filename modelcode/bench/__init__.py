"""Benchmarks behind `modelcode bench`: `subjects` builds the models (ours, random-weight presets, and
transformers' twin on the same tensors), `measure` times a generation and the memory bandwidth, `run`
puts a batch sweep together, `report` prints the table and draws the plot."""
