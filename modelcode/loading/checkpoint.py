"""Find and read the weight files of a checkpoint folder, exactly as downloaded from the hub.

Formats, in order of preference: sharded safetensors (`model.safetensors.index.json`),
`model.safetensors`, sharded or single `pytorch_model.bin`, and Meta's `consolidated.*.pth`.
Tensors are read lazily, one at a time, from memory-mapped files, so peak memory stays near the size
of the model itself. Pickle files are opened only with `torch.load(weights_only=True)`.
"""

import functools
import json
import math
import os
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from modelcode.errors import CheckpointError

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json",
                "pytorch_model.bin", "consolidated.*.pth")


@dataclass
class StoredTensor:
    name: str
    file: Path
    shape: tuple[int, ...]
    read: Callable[[], torch.Tensor]
    # Reads only the rows [start, stop) along one dim (a rank's shard, see parallel/): (dim, start, stop) -> tensor.
    read_part: Callable[[int, int, int], torch.Tensor] | None = None

    def part(self, dim: int, start: int, stop: int) -> torch.Tensor:
        if self.read_part is None:
            return self.read().narrow(dim, start, stop - start).clone()  # its own memory, not a view of the whole
        return self.read_part(dim, start, stop)


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder, in the format the hub would load first."""
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index = folder / index_name
        if index.exists():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            missing = [s for s in shards if not (folder / s).exists()]
            if missing:
                raise CheckpointError(f"{index} lists shards that are not in the folder: {', '.join(missing)}; "
                                      "download the missing files")
            return [folder / s for s in shards]
    for pattern in ("model.safetensors", "pytorch_model.bin", "consolidated.*.pth"):
        files = sorted(folder.glob(pattern))
        if files:
            return files
    raise CheckpointError(f"no weights in {folder}: expected one of {', '.join(WEIGHT_FILES)}")


def _safetensors(file: Path) -> Iterator[StoredTensor]:
    try:
        f = safe_open(file, framework="pt", device="cpu")
        names = list(f.keys())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"cannot read {file}: {_first_line(e)} (truncated or corrupt download? fetch the "
                              "file again)") from e
    for name in names:
        yield StoredTensor(name, file, tuple(f.get_slice(name).get_shape()), lambda f=f, n=name: f.get_tensor(n),
                           lambda dim, a, b, f=f, n=name: f.get_slice(n)[a:b] if dim == 0 else
                           _read_columns(file, n, dim, a, b))


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


@functools.cache
def _header(file: Path) -> tuple[int, dict]:
    """Where a safetensors file's data starts, and its header: {name: {dtype, shape, data_offsets}}."""
    with open(file, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        return 8 + n, json.loads(fh.read(n))


def _read_columns(file: Path, name: str, dim: int, start: int, stop: int) -> torch.Tensor:
    """[start, stop) along a dim past the first (a row-parallel rank's columns), read with one positional read
    per row rather than through the memory map: reading columns through the map would fault in (and leave
    resident in this process) the pages of every column, most of which belong to other ranks."""
    data_start, header = _header(file)
    entry = header[name]
    dtype, shape = SAFETENSORS_DTYPES[entry["dtype"]], entry["shape"]
    step = math.prod(shape[dim + 1:]) * dtype.itemsize  # bytes per index along `dim`
    rows = math.prod(shape[:dim])
    out = torch.empty(rows, (stop - start) * step, dtype=torch.uint8)
    buf = out.numpy()
    first = data_start + entry["data_offsets"][0] + start * step
    with open(file, "rb", buffering=0) as fh:
        for i in range(rows):
            if os.preadv(fh.fileno(), [buf[i]], first + i * shape[dim] * step) != buf.shape[1]:
                raise CheckpointError(f"{file} ends inside tensor {name!r}: truncated download? fetch the file again")
    return out.view(dtype).view(*shape[:dim], stop - start, *shape[dim + 1:])


def _torch_pickle(file: Path) -> Iterator[StoredTensor]:
    try:  # files in the legacy (non-zip) format cannot be memory-mapped
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except Exception as e:
        raise CheckpointError(f"cannot read {file}: {_first_line(e)} (truncated or corrupt download? fetch the "
                              "file again)") from e
    for name, t in state.items():
        yield StoredTensor(name, file, tuple(t.shape), lambda t=t: t)


def _first_line(e: Exception) -> str:
    """Readers' messages can run to many lines (torch's zip reader: dozens); the first says what failed."""
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def read_tensors(files: list[Path]) -> Iterator[StoredTensor]:
    """Every tensor of every file, lazily."""
    for file in files:
        yield from (_safetensors(file) if file.suffix == ".safetensors" else _torch_pickle(file))
