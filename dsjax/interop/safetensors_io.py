"""safetensors files read and written one tensor at a time, and DeepSeek's FP8 block scales.

A safetensors file is an 8-byte little-endian header length, a JSON header
`{name: {dtype, shape, data_offsets: [begin, end]}, '__metadata__': {...}}` and the raw bytes.
Reading it here rather than through the safetensors package keeps one tensor in memory at a time
(no mmap, whose touched pages count against the process), lets every error name the file and the
tensor, and reads bf16 / fp8 straight into numpy through ml_dtypes.
"""
import dataclasses
import json
import math
import os
import pathlib
import struct
from typing import Iterable, Mapping

import ml_dtypes
import numpy as np

DTYPES = {
    'F64': np.dtype(np.float64), 'F32': np.dtype(np.float32), 'F16': np.dtype(np.float16),
    'BF16': np.dtype(ml_dtypes.bfloat16), 'F8_E4M3': np.dtype(ml_dtypes.float8_e4m3fn),
    'F8_E5M2': np.dtype(ml_dtypes.float8_e5m2), 'I64': np.dtype(np.int64), 'I32': np.dtype(np.int32),
    'I16': np.dtype(np.int16), 'I8': np.dtype(np.int8), 'U8': np.dtype(np.uint8), 'BOOL': np.dtype(np.bool_),
}
_CODES = {dtype: code for code, dtype in DTYPES.items()}
INDEX_FILE = 'model.safetensors.index.json'
# Formats that unpickle on load: opening one can run arbitrary code, so dsjax never does.
PICKLE_SUFFIXES = ('.bin', '.pt', '.pth', '.ckpt', '.pkl')
_WRITE_SLAB_BYTES = 32 << 20
FP8_MAX = float(ml_dtypes.finfo(ml_dtypes.float8_e4m3fn).max)  # 448


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """Where one tensor's bytes lie: its file, dtype, shape and absolute byte range."""
    file: pathlib.Path
    dtype: np.dtype
    shape: tuple[int, ...]
    start: int
    nbytes: int


def read_header(path) -> dict[str, TensorInfo]:
    """The tensors of one safetensors file, every offset checked against the file's size.

    Raises:
        ValueError: the file is truncated or its header is corrupt (the message names the file and,
            where one is to blame, the tensor).
    """
    path = pathlib.Path(path)
    size = path.stat().st_size
    with open(path, 'rb') as f:
        if size < 8:
            raise ValueError(f'{path} is truncated: {size} bytes, fewer than the 8-byte header length')
        (n,) = struct.unpack('<Q', f.read(8))
        if n > size - 8:
            raise ValueError(f'{path} is truncated: its header claims {n} bytes but only {size - 8} follow '
                             'the length field')
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f'{path}: the safetensors header is not valid JSON ({e}); the file is corrupt') from e
    data_start, data_size = 8 + n, size - 8 - n
    tensors = {}
    for name, entry in header.items():
        if name == '__metadata__':
            continue
        code = entry.get('dtype')
        if code not in DTYPES:
            raise ValueError(f'{path}: tensor {name} has dtype {code!r}; readable dtypes: {sorted(DTYPES)}')
        shape = tuple(int(s) for s in entry['shape'])
        begin, end = (int(o) for o in entry['data_offsets'])
        expected = math.prod(shape) * DTYPES[code].itemsize
        if end - begin != expected or begin < 0:
            raise ValueError(f'{path}: tensor {name} ({code}, shape {shape}) spans bytes [{begin}, {end}) of '
                             f'the data, {end - begin} bytes, but needs {expected}; the header is corrupt')
        if end > data_size:
            raise ValueError(f'{path} is truncated: tensor {name} needs bytes [{begin}, {end}) of the data '
                             f'section, which holds only {data_size} bytes')
        tensors[name] = TensorInfo(path, DTYPES[code], shape, data_start + begin, expected)
    return tensors


def read_tensor(info: TensorInfo, name: str = '') -> np.ndarray:
    """One tensor's values, read from disk into a fresh array."""
    buf = np.empty(info.nbytes, np.uint8)
    with open(info.file, 'rb') as f:
        f.seek(info.start)
        got = f.readinto(memoryview(buf))
    if got != info.nbytes:  # the file shrank after its header was read
        raise ValueError(f'{info.file} is truncated: tensor {name} got {got} of {info.nbytes} bytes')
    return buf.view(info.dtype).reshape(info.shape)


def _refuse_pickles(directory: pathlib.Path, found: Iterable[pathlib.Path]):
    found = sorted(p.name for p in found)
    raise ValueError(
        f'{directory} holds pickle-based weights ({", ".join(found[:3])}{" ..." if len(found) > 3 else ""}) '
        'and no safetensors: dsjax loads safetensors only, because unpickling can run arbitrary code. '
        'Convert them once where you trust the file, e.g. transformers: '
        "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, safe_serialization=True)")


class SafetensorsDir:
    """The tensors of a HF checkpoint directory (one file, or shards named by the index), by name."""

    def __init__(self, directory):
        self.directory = pathlib.Path(directory)
        if self.directory.is_file() and self.directory.suffix in PICKLE_SUFFIXES:
            _refuse_pickles(self.directory.parent, [self.directory])
        if not self.directory.is_dir():
            raise FileNotFoundError(f'HF checkpoint directory {self.directory} does not exist')
        index = self.directory / INDEX_FILE
        self.tensors: dict[str, TensorInfo] = {}
        if index.is_file():
            self._read_index(index)
        else:
            files = sorted(self.directory.glob('*.safetensors'))
            if not files:
                pickles = [p for p in self.directory.iterdir() if p.suffix in PICKLE_SUFFIXES]
                if pickles:
                    _refuse_pickles(self.directory, pickles)
                raise FileNotFoundError(f'{self.directory} holds no *.safetensors files and no {INDEX_FILE}')
            for file in files:
                for name, info in read_header(file).items():
                    if name in self.tensors:
                        raise ValueError(f'tensor {name} is in both {self.tensors[name].file.name} and '
                                         f'{file.name} of {self.directory}')
                    self.tensors[name] = info

    def _read_index(self, index: pathlib.Path):
        try:
            weight_map = json.loads(index.read_text())['weight_map']
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise ValueError(f'{index}: not a safetensors index (needs a "weight_map" object): {e}') from e
        by_file: dict[str, list[str]] = {}
        for name, file in weight_map.items():
            by_file.setdefault(file, []).append(name)
        for file, names in sorted(by_file.items()):
            path = self.directory / file
            if not path.is_file():
                raise FileNotFoundError(
                    f'missing shard {path}: {index.name} places {len(names)} tensors in it (e.g. {names[0]}); '
                    'the download is incomplete')
            header = read_header(path)
            for name in names:
                if name not in header:
                    raise ValueError(f'{index.name} places tensor {name} in {path}, which has no such tensor')
                self.tensors[name] = header[name]

    def read(self, name: str) -> np.ndarray:
        """Tensor `name` as stored (fp8 stays fp8; see `dequantized`)."""
        if name not in self.tensors:
            raise KeyError(f'HF tensor {name} is not in the checkpoint {self.directory}')
        return read_tensor(self.tensors[name], name)

    def describe(self, name: str) -> str:
        """'<name> in <file>' for error messages."""
        return f'{name} in {self.tensors[name].file}'


# ---------------------------------------------------------------- FP8 block scales


def scale_name(name: str) -> str:
    """The companion scale of an FP8 tensor: `x.weight` -> `x.weight_scale_inv`."""
    return name + '_scale_inv'


def is_fp8(dtype) -> bool:
    return np.dtype(dtype) in (DTYPES['F8_E4M3'], DTYPES['F8_E5M2'])


def scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """[..., ceil(out / b0), ceil(in / b1)]: one scale per block, edge blocks included."""
    return tuple(shape[:-2]) + (-(-shape[-2] // block[0]), -(-shape[-1] // block[1]))


def dequantize_fp8(w8: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """W[..., i, j] = W8[..., i, j] * S[..., i // b0, j // b1] in float32 (edge blocks are partial).

    One float32 multiply per element, as DeepSeek's `weight_dequant` kernel does; done one row
    block at a time so the expanded scales never exist at full size.
    """
    if scale_inv.shape != scale_shape(w8.shape, block):
        raise ValueError(f'FP8 scales of shape {scale_inv.shape} do not fit weights {w8.shape} in '
                         f'{block[0]}x{block[1]} blocks: expected {scale_shape(w8.shape, block)}')
    out = np.empty(w8.shape, np.float32)
    rows, cols = w8.shape[-2:]
    s = scale_inv.astype(np.float32)
    for bi in range(s.shape[-2]):
        r = slice(bi * block[0], min((bi + 1) * block[0], rows))
        col_scale = np.repeat(s[..., bi, :], block[1], axis=-1)[..., :cols]  # [..., in]
        out[..., r, :] = w8[..., r, :].astype(np.float32) * col_scale[..., None, :]
    return out


def quantize_fp8(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """(W8 e4m3, S float32) with S = amax(|block|) / 448 per block, W8 = W / S rounded to nearest."""
    w = np.asarray(w, np.float32)
    scales = np.empty(scale_shape(w.shape, block), np.float32)
    w8 = np.empty(w.shape, ml_dtypes.float8_e4m3fn)
    rows, cols = w.shape[-2:]
    for bi in range(scales.shape[-2]):
        r = slice(bi * block[0], min((bi + 1) * block[0], rows))
        for bj in range(scales.shape[-1]):
            c = slice(bj * block[1], min((bj + 1) * block[1], cols))
            amax = np.abs(w[..., r, c]).max(axis=(-2, -1))
            # An all-zero block keeps scale 1 (any scale gives zeros); avoids 0 / 0.
            s = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
            scales[..., bi, bj] = s
            q = np.clip(w[..., r, c] / s[..., None, None], -FP8_MAX, FP8_MAX)
            w8[..., r, c] = q.astype(ml_dtypes.float8_e4m3fn)
    return w8, scales


# ---------------------------------------------------------------- writing


class ShardedWriter:
    """Writes planned tensors into safetensors shards, streaming each tensor straight to disk.

    The plan (name, dtype, shape), known before any data, fixes every header up front, so a tensor
    is written the moment it is produced and never held with the others. Shards fill in plan order
    up to `max_shard_bytes` (HF's `model-0000k-of-0000n.safetensors` plus an index when there are
    several). Each file is written under a temporary name and renamed when complete.
    """

    def __init__(self, directory, plan: Iterable[tuple[str, np.dtype, tuple[int, ...]]], max_shard_bytes: int,
                 metadata: Mapping[str, str] | None = None):
        self.directory = pathlib.Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self._metadata = dict(metadata or {'format': 'pt'})  # transformers requires format=pt
        shards, size = [[]], 0
        for name, dtype, shape in plan:
            nbytes = math.prod(shape) * np.dtype(dtype).itemsize
            if shards[-1] and size + nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append((name, np.dtype(dtype), tuple(shape)))
            size += nbytes
        n = len(shards)
        self._files = ['model.safetensors'] if n == 1 else [f'model-{k + 1:05d}-of-{n:05d}.safetensors'
                                                            for k in range(n)]
        self._shards = shards
        self._order = [entry for shard in shards for entry in shard]
        self._shard_of = {name: k for k, shard in enumerate(shards) for name, _, _ in shard}
        self._next = 0
        self._file = None
        self._shard = -1
        self.total_bytes = sum(math.prod(s) * d.itemsize for _, d, s in self._order)

    def _open_shard(self, k: int):
        header, offset = {'__metadata__': self._metadata}, 0
        for name, dtype, shape in self._shards[k]:
            nbytes = math.prod(shape) * dtype.itemsize
            header[name] = {'dtype': _CODES[dtype], 'shape': list(shape), 'data_offsets': [offset, offset + nbytes]}
            offset += nbytes
        raw = json.dumps(header, separators=(',', ':')).encode()
        raw += b' ' * (-len(raw) % 8)  # the data section starts 8-byte aligned, as the safetensors library writes
        self._tmp = self.directory / (self._files[k] + '.tmp')
        self._file = open(self._tmp, 'wb')
        self._file.write(struct.pack('<Q', len(raw)) + raw)
        self._shard = k

    def _close_shard(self):
        self._file.close()
        os.replace(self._tmp, self.directory / self._files[self._shard])
        self._file = None

    def write(self, name: str, x: np.ndarray):
        """Appends tensor `name`; tensors must come in plan order with the planned dtype and shape."""
        want_name, dtype, shape = self._order[self._next]
        if name != want_name or np.dtype(x.dtype) != dtype or tuple(x.shape) != shape:
            raise ValueError(f'ShardedWriter: got {name} {x.dtype} {tuple(x.shape)}, planned {want_name} '
                             f'{dtype} {shape}')
        k = self._shard_of[name]
        if k != self._shard:
            if self._file is not None:
                self._close_shard()
            self._open_shard(k)
        if x.flags.c_contiguous or x.ndim == 0:
            self._file.write(memoryview(np.ascontiguousarray(x).reshape(-1).view(np.uint8)))
        else:
            # A transposed view ([in, out] -> [out, in]) is copied a slab of rows at a time, never whole.
            rows = max(1, _WRITE_SLAB_BYTES // max(1, x[0].nbytes))
            for i in range(0, x.shape[0], rows):
                self._file.write(memoryview(np.ascontiguousarray(x[i:i + rows]).reshape(-1).view(np.uint8)))
        self._next += 1

    def close(self):
        """Finishes the last shard and writes the index; fails if a planned tensor was never written."""
        if self._next != len(self._order):
            raise ValueError(f'ShardedWriter: {len(self._order) - self._next} planned tensors were never written, '
                             f'starting with {self._order[self._next][0]}')
        if self._file is not None:
            self._close_shard()
        if len(self._files) > 1:
            weight_map = {name: self._files[k] for k, shard in enumerate(self._shards) for name, _, _ in shard}
            index = {'metadata': {'total_size': self.total_bytes}, 'weight_map': weight_map}
            (self.directory / INDEX_FILE).write_text(json.dumps(index, indent=2))

    def abort(self):
        """Removes the shard being written (after an error)."""
        if self._file is not None:
            self._file.close()
            self._tmp.unlink(missing_ok=True)
            self._file = None
