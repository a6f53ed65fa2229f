"""Tensor parallelism on `torch.distributed`: one model split across several processes or devices, applied from
outside the model. `shard.py`: what is split how (a plan per architecture) and sharded loading; `layers.py`: the
collectives; `process.py`: joining the torchrun processes' group; `ranks.py`: rank 0 prints and reads input.
`modelcode.load(path, tp=N)` inside a torchrun process loads this rank's share."""
