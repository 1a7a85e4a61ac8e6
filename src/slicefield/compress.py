"""Compress a volume by fitting a field to it and storing the field's quantised parameters (``.sfz`` files).

Pipeline (:func:`compress_volume`):

1. **Fit** a field to the volume. The field is a :class:`~slicefield.representations.voxel.VoxelGrid` over the
   volume's own voxel frame (:class:`~slicefield.representations.base.GridFrame`: corner voxel centres at
   ``u = +-1``) with ``ceil((n - 1) / factor) + 1`` samples per axis, read back by trilinear interpolation.
   Its values are the least-squares fit to the volume (L-BFGS on ``sum (field(x_i) - v_i)^2`` over every voxel
   centre), not a plain downsampling. ``factor = 1`` is the volume's own samples (no fit needed).
2. **Quantise** each parameter tensor to ``bits`` bits with a per-tensor offset and scale (``lo``, ``hi``).
3. **Entropy-code**: integer differences along the last array axis (a previous-sample predictor), then LZMA.

The rate search tries the factors from finest to coarsest; for each it takes the fewest bits that meet the
target PSNR (data range = the volume's max - min, every voxel) and keeps the smallest file. A factor whose best
PSNR (at :data:`MAX_BITS`) misses the target ends the search (coarser ones do worse). ``time_budget_s`` bounds the
search: when it runs out, the best file found so far is kept (or, if none meets the target, the one with the
highest PSNR, reported as such).

File layout (version :data:`FORMAT_VERSION`, little-endian; no pickle anywhere)::

    magic   8 bytes   b"SLICEFZ\\0"
    version uint16
    hlen    uint32    length of the header
    plen    uint64    length of the payload
    header  hlen      UTF-8 JSON: shape, affine (voxel -> world mm RAS), field, tensors (shape, bits, lo, hi, bytes)
    payload plen      LZMA stream of the tensors' coded integers, one after the other
    digest  32 bytes  SHA-256 of everything before it

:func:`read_sfz` checks all of it and raises a one-line :class:`~slicefield.errors.SlicefieldError` for a file that
is not ``.sfz``, of another version, truncated or corrupted.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import SlicefieldError
from .io.atomic import atomic_path
from .metrics import psnr
from .volume import Volume

#: First bytes of every .sfz file.
MAGIC = b"SLICEFZ\0"
#: Version of the .sfz layout written by this module (and the only one it reads).
FORMAT_VERSION = 1
#: struct layout of the fixed-size prefix: magic, version, header length, payload length.
_PREFIX = struct.Struct("<8sHIQ")
#: Bytes of the SHA-256 digest at the end of the file.
_DIGEST_BYTES = 32
#: Fewest and most bits per quantised parameter the rate search tries.
MIN_BITS, MAX_BITS = 2, 16
#: LZMA preset of the payload (6: the library default; higher presets gained < 1 % on Colin27).
LZMA_PRESET = 6
#: Largest header accepted on load (a corrupted length must not make the reader allocate gigabytes).
MAX_HEADER_BYTES = 1 << 20


@dataclass(frozen=True)
class CompressConfig:
    """How to compress a volume."""

    target_psnr_db: float = 45.0
    """Smallest acceptable PSNR of the decoded volume, dB (data range = max - min of the volume, every voxel)."""
    factors: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    """Field resolutions tried, as voxel-spacing multiples of the volume's (1: one sample per voxel)."""
    time_budget_s: float | None = None
    """Stop the rate search after this many seconds and keep the best file so far."""
    fit_iterations: int = 30
    """L-BFGS iterations of the least-squares field fit (factors > 1)."""


@dataclass(frozen=True)
class CompressResult:
    """What :func:`compress_volume` chose and measured."""

    data: bytes
    """The .sfz file's bytes."""
    psnr_db: float
    """PSNR of the decoded volume against the input (dB)."""
    factor: float
    """Field resolution chosen (voxel-spacing multiple)."""
    bits: int
    """Bits per parameter chosen."""
    n_parameters: int
    """Scalar parameters of the stored field."""
    met_target: bool
    """Whether ``psnr_db >= target``; False when no candidate in the budget reached it."""
    seconds: float
    """Wall time of the whole search."""
    tried: tuple[dict, ...] = ()
    """Every (factor, bits, psnr, bytes) the search measured, in order."""


# ---------------------------------------------------------------------------------------------- the field
def field_shape(shape: tuple[int, int, int], factor: float) -> tuple[int, int, int]:
    """Samples per axis of the field at ``factor`` (>= 2 per axis; the volume's own shape at factor 1)."""
    if not (math.isfinite(factor) and factor >= 1.0):
        raise ValueError(f"field factor must be >= 1, got {factor}")
    return tuple(max(2, int(math.ceil((n - 1) / factor - 1e-9)) + 1) if n > 1 else 1 for n in shape)


def _upsample(values, shape: tuple[int, int, int]):
    """Trilinear read of a field ``values (x, y, z)`` torch tensor at every voxel centre of ``shape``.

    Equivalent to evaluating ``VoxelGrid.from_array(values)`` on the volume's :class:`GridFrame` coordinates
    (``align_corners=True``: the corner samples sit on the corner voxel centres), without building the coordinates.
    """
    import torch.nn.functional as F

    if tuple(values.shape) == tuple(shape):
        return values
    return F.interpolate(values[None, None], size=tuple(shape), mode="trilinear", align_corners=True)[0, 0]


def fit_voxel_field(data: np.ndarray, factor: float, *, iterations: int = 30) -> np.ndarray:
    """Least-squares field values ``field_shape(data.shape, factor)`` float32 whose trilinear read fits ``data``."""
    import torch
    import torch.nn.functional as F

    target = torch.from_numpy(np.ascontiguousarray(data, dtype=np.float32))
    shape = field_shape(target.shape, factor)
    if shape == tuple(target.shape):
        return target.numpy().copy()
    start = F.interpolate(target[None, None], size=shape, mode="trilinear", align_corners=True)[0, 0]
    values = start.clone().requires_grad_(True)
    opt = torch.optim.LBFGS([values], lr=1.0, max_iter=iterations, history_size=10, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.mean((_upsample(values, target.shape) - target) ** 2)
        loss.backward()
        return loss

    opt.step(closure)
    return values.detach().numpy().astype(np.float32)


# ------------------------------------------------------------------------------------- quantise and code
def quantise(values: np.ndarray, bits: int) -> tuple[np.ndarray, float, float]:
    """``values`` -> integers in ``[0, 2^bits - 1]`` (int64), with the offset ``lo`` and top ``hi`` to undo it."""
    lo, hi = float(values.min()), float(values.max())
    levels = (1 << bits) - 1
    span = hi - lo if hi > lo else 1.0
    q = np.rint((values.astype(np.float64) - lo) / span * levels).astype(np.int64)
    return q, lo, hi


def dequantise(q: np.ndarray, bits: int, lo: float, hi: float) -> np.ndarray:
    """Inverse of :func:`quantise` (up to its rounding), float32."""
    levels = (1 << bits) - 1
    span = hi - lo if hi > lo else 1.0
    return (q.astype(np.float64) / levels * span + lo).astype(np.float32)


def _code_dtype(bits: int) -> np.dtype:
    # differences of b-bit integers need b + 1 bits with their sign
    return np.dtype("<i1") if bits <= 7 else np.dtype("<i2") if bits <= 15 else np.dtype("<i4")


def encode_integers(q: np.ndarray, bits: int) -> bytes:
    """Differences along the last axis (first sample kept), as little-endian signed integers of the fewest bytes."""
    d = np.diff(q, axis=-1, prepend=0)
    return d.astype(_code_dtype(bits)).tobytes()


def decode_integers(raw: bytes, shape: tuple[int, ...], bits: int) -> np.ndarray:
    """Inverse of :func:`encode_integers`."""
    d = np.frombuffer(raw, dtype=_code_dtype(bits)).astype(np.int64).reshape(shape)
    return np.cumsum(d, axis=-1)


# ---------------------------------------------------------------------------------------------- file layout
def pack_sfz(header: dict, payload: bytes) -> bytes:
    """Header (JSON-able dict) + payload -> the bytes of a .sfz file (see the module docstring)."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = _PREFIX.pack(MAGIC, FORMAT_VERSION, len(head), len(payload)) + head + payload
    return body + hashlib.sha256(body).digest()


def unpack_sfz(data: bytes, *, path: str | Path | None = None) -> tuple[dict, bytes]:
    """Check a .sfz file's bytes (magic, version, lengths, digest, header) -> (header, payload)."""
    fix = "pass a .sfz file written by slicefield compress (re-create it if it was damaged)"
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
        raise SlicefieldError(f"too short to be a .sfz file ({len(data)} bytes)", path=path, fix=fix)
    magic, version, hlen, plen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SlicefieldError("not a .sfz file (wrong magic bytes)", path=path, fix=fix)
    if version != FORMAT_VERSION:
        raise SlicefieldError(
            f".sfz format version {version}, this slicefield reads version {FORMAT_VERSION}",
            path=path,
            fix="decompress it with the slicefield version that wrote it",
        )
    expected = _PREFIX.size + hlen + plen + _DIGEST_BYTES
    if hlen > MAX_HEADER_BYTES or len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header says"
        raise SlicefieldError(f"file is {what} ({len(data)} bytes, expected {expected})", path=path, fix=fix)
    body, digest = data[:-_DIGEST_BYTES], data[-_DIGEST_BYTES:]
    if hashlib.sha256(body).digest() != digest:
        raise SlicefieldError("checksum mismatch: the file is corrupted", path=path, fix=fix)
    try:
        header = json.loads(body[_PREFIX.size : _PREFIX.size + hlen].decode("utf-8"))
        _check_header(header)
    except (ValueError, TypeError, KeyError) as e:
        raise SlicefieldError(f"malformed header ({e})", path=path, fix=fix) from e
    return header, body[_PREFIX.size + hlen :]


def _check_header(h: dict) -> None:
    if not isinstance(h, dict):
        raise TypeError("header is not an object")
    shape = [int(s) for s in h["shape"]]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"bad volume shape {shape}")
    if np.asarray(h["affine"], dtype=np.float64).shape != (16,):
        raise ValueError("affine must have 16 numbers")
    if h["field"]["kind"] != "voxel":
        raise ValueError(f"unknown field kind {h['field']['kind']!r}")
    for t in h["tensors"]:
        if not MIN_BITS <= int(t["bits"]) <= MAX_BITS or int(t["nbytes"]) < 0:
            raise ValueError(f"bad tensor record {t}")
        [int(s) for s in t["shape"]]
        float(t["lo"]), float(t["hi"])


def encode_field(values: np.ndarray, bits: int, *, volume_shape, affine: np.ndarray, extra: dict) -> bytes:
    """A .sfz file holding a voxel field ``values`` quantised to ``bits`` bits, for a volume of ``volume_shape``."""
    q, lo, hi = quantise(values, bits)
    raw = encode_integers(q, bits)
    header = {
        "shape": [int(s) for s in volume_shape],
        "affine": [float(a) for a in np.asarray(affine, dtype=np.float64).ravel()],
        "field": {"kind": "voxel", "frame": "grid", "interpolation": "trilinear-align-corners"},
        "tensors": [
            {"name": "values", "shape": [int(s) for s in values.shape], "bits": bits, "lo": lo, "hi": hi,
             "predictor": "previous-along-last-axis", "nbytes": len(raw)}
        ],
        **extra,
    }  # fmt: skip
    return pack_sfz(header, lzma.compress(raw, preset=LZMA_PRESET))


def decode_sfz(data: bytes, *, path: str | Path | None = None) -> Volume:
    """The volume a .sfz file's bytes encode (float32, with its affine)."""
    import torch

    header, payload = unpack_sfz(data, path=path)
    fix = "re-create the file with slicefield compress"
    expected = sum(int(t["nbytes"]) for t in header["tensors"])
    try:  # never inflate more than the header announces (a damaged or hostile payload cannot exhaust memory)
        raw = lzma.LZMADecompressor().decompress(payload, max_length=expected + 1)
    except lzma.LZMAError as e:
        raise SlicefieldError(f"payload does not decompress ({e})", path=path, fix=fix) from e
    tensors, offset = {}, 0
    for t in header["tensors"]:
        shape, bits, n = tuple(int(s) for s in t["shape"]), int(t["bits"]), int(t["nbytes"])
        if n != int(np.prod(shape)) * _code_dtype(bits).itemsize or offset + n > len(raw):
            raise SlicefieldError(f"tensor {t['name']!r} does not match its stored size", path=path, fix=fix)
        q = decode_integers(raw[offset : offset + n], shape, bits)
        tensors[t["name"]] = dequantise(q, bits, float(t["lo"]), float(t["hi"]))
        offset += n
    if offset != len(raw) or "values" not in tensors:
        raise SlicefieldError("payload holds other data than its header lists", path=path, fix=fix)
    shape = tuple(int(s) for s in header["shape"])
    with torch.no_grad():
        data_out = _upsample(torch.from_numpy(tensors["values"]), shape).numpy()
    return Volume(np.ascontiguousarray(data_out, dtype=np.float32), np.asarray(header["affine"]).reshape(4, 4))


# ---------------------------------------------------------------------------------------------- top level
def _psnr_of(values: np.ndarray, bits: int, target: np.ndarray, data_range: float) -> float:
    import torch

    q, lo, hi = quantise(values, bits)
    with torch.no_grad():
        decoded = _upsample(torch.from_numpy(dequantise(q, bits, lo, hi)), target.shape).numpy()
    return psnr(target, decoded, data_range=data_range)


def compress_volume(volume: Volume, *, config: CompressConfig = CompressConfig()) -> CompressResult:
    """Fit, quantise and code ``volume`` (see the module docstring); the smallest file meeting the target PSNR."""
    t0 = time.perf_counter()
    data = np.asarray(volume.data, dtype=np.float32)
    data_range = float(data.max() - data.min())
    if data_range <= 0:
        data_range = 1.0  # a constant volume: any field reproduces it exactly
    best, best_any, tried = None, None, []
    for factor in sorted(config.factors):
        if config.time_budget_s is not None and best is not None and time.perf_counter() - t0 > config.time_budget_s:
            break
        values = fit_voxel_field(data, factor, iterations=config.fit_iterations)
        top = _psnr_of(values, MAX_BITS, data, data_range)
        if top < config.target_psnr_db:  # even the finest quantisation misses: coarser fields will too
            cand = (factor, MAX_BITS, top, values)
            if best_any is None or top > best_any[2]:
                best_any = cand
            tried.append({"factor": factor, "bits": MAX_BITS, "psnr_db": top, "bytes": None})
            break
        lo_b, hi_b = MIN_BITS, MAX_BITS  # fewest bits meeting the target (PSNR grows with bits)
        while lo_b < hi_b:
            mid = (lo_b + hi_b) // 2
            if _psnr_of(values, mid, data, data_range) >= config.target_psnr_db:
                hi_b = mid
            else:
                lo_b = mid + 1
        bits = lo_b
        value = _psnr_of(values, bits, data, data_range)
        blob = encode_field(values, bits, volume_shape=data.shape, affine=volume.affine, extra={})
        tried.append({"factor": factor, "bits": bits, "psnr_db": value, "bytes": len(blob)})
        if best is None or len(blob) < len(best[4]):
            best = (factor, bits, value, values, blob)
    if best is not None:
        factor, bits, value, values, _ = best
        met = True
    else:
        factor, bits, value, values = best_any
        met = False
    extra = {"psnr_db": value, "data_range": data_range, "factor": factor}
    blob = encode_field(values, bits, volume_shape=data.shape, affine=volume.affine, extra=extra)
    return CompressResult(blob, value, factor, bits, int(values.size), met, time.perf_counter() - t0, tuple(tried))


def write_sfz(data: bytes, path: str | Path) -> Path:
    """Write .sfz bytes to ``path`` atomically (a crash leaves no partial file)."""
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def read_sfz(path: str | Path) -> Volume:
    """Read and decode a .sfz file (checked: magic, version, length, checksum, header)."""
    p = Path(path)
    if not p.is_file():
        raise SlicefieldError("file not found" if not p.exists() else "not a file", path=p, fix="check the path")
    return decode_sfz(p.read_bytes(), path=p)
