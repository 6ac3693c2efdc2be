"""Read safetensors files through mmap, validating everything a damaged download can break.

Why our own reader: it lets the loader (a) name a truncated or corrupt file precisely instead of
failing deep inside a library, (b) hand out zero-copy views of single tensors *and* of row slices (per-
rank loading reads only its rows), and (c) give pages back to the OS right after each tensor is copied
(`madvise(MADV_DONTNEED)`), so peak RSS stays near one copy of the weights. The format is only an
8-byte little-endian header length, a JSON header, and raw little-endian tensor bytes — no pickle,
no code, ever.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
_MAX_HEADER = 100 * 1024 * 1024
RELEASE_MARGIN = 2 * 1024 * 1024  # > the kernel's fault-around window (512 KiB seen here)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded faithfully; the message names the file, the cause and the fix."""


@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    nbytes: int


class SafetensorsFile:
    """One .safetensors file: parsed, validated header plus a private read-only-in-practice mmap."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise CheckpointError(f"cannot open {self.path}: {e.strerror}") from e
        self.size = os.fstat(self._fh.fileno()).st_size
        self.tensors, self.metadata = self._read_header()
        # ACCESS_COPY (MAP_PRIVATE) gives a writable buffer, which torch.frombuffer wants; pages we
        # only read stay shared with the page cache, nothing is ever written back.
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_COPY) if self.size else None

    def _fail(self, what: str) -> CheckpointError:
        return CheckpointError(f"{self.path} is not a valid safetensors file: {what}. The file is probably "
                               "truncated or corrupt; download or copy it again")

    def _read_header(self) -> tuple[dict[str, TensorInfo], dict]:
        head = self._fh.read(8)
        if len(head) < 8:
            raise self._fail(f"only {self.size} bytes, shorter than the 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > min(self.size - 8, _MAX_HEADER):
            raise self._fail(f"header claims {n} bytes but the file has {self.size}")
        try:
            header = json.loads(self._fh.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise self._fail(f"header is not JSON ({e})") from e
        if not isinstance(header, dict):
            raise self._fail("header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        base = 8 + n
        return {k: self._tensor_info(k, v, base) for k, v in header.items()}, meta

    def _tensor_info(self, name: str, entry: dict, base: int) -> TensorInfo:
        try:
            dtype = DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError) as e:
            raise self._fail(f"tensor {name!r} has a malformed or unsupported header entry {entry!r}") from e
        numel = 1
        for s in shape:
            numel *= s
        if end - begin != numel * dtype.itemsize or begin < 0:
            raise self._fail(f"tensor {name!r} has {end - begin} bytes for shape {list(shape)} {entry['dtype']}")
        if base + end > self.size:
            raise CheckpointError(
                f"{self.path} is truncated: tensor {name!r} ends at byte {base + end} but the file has only "
                f"{self.size} bytes. Download or copy the file again")
        return TensorInfo(name, dtype, shape, base + begin, end - begin)

    def view(self, name: str, rows: slice | None = None) -> torch.Tensor:
        """Zero-copy tensor over the mapped bytes; `rows` slices dim 0 (contiguous bytes) for per-rank loads."""
        info = self.tensors[name]
        start, shape = info.start, info.shape
        if rows is not None:
            row_bytes = info.nbytes // max(shape[0], 1)
            r0, r1, _ = rows.indices(shape[0])
            start, shape = start + r0 * row_bytes, (r1 - r0, *shape[1:])
        count = 1
        for s in shape:
            count *= s
        if count == 0:
            return torch.empty(shape, dtype=info.dtype)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            flat = torch.frombuffer(self._mm, dtype=info.dtype, count=count, offset=start)
        return flat.view(shape)

    def release(self, name: str) -> None:
        """Drop this tensor's pages, and its neighbours', from our RSS (they stay in the page cache).

        The window reaches RELEASE_MARGIN past both ends because the kernel's fault-around maps pages
        beyond those a read touched; a neighbour that is still needed simply faults back in.
        """
        info = self.tensors[name]
        page = mmap.PAGESIZE
        lo = max(0, info.start - RELEASE_MARGIN) // page * page
        hi = min(self.size, -(-(info.start + info.nbytes + RELEASE_MARGIN) // page) * page)
        if self._mm is not None and hi > lo and hasattr(mmap, "MADV_DONTNEED"):
            self._mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # a caller still holds a view; the mapping goes with it
                pass
        self._fh.close()

    def __enter__(self) -> "SafetensorsFile":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
