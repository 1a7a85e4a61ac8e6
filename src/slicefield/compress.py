"""Compress a volume into a field's quantised parameters (``.sfz`` files).

Two fields, tried in the order of :attr:`CompressConfig.fields`; the smallest file that meets the target PSNR
(data range = the volume's max - min, every voxel) is kept:

* ``"pyramid"`` (the default): the volume as a piecewise-trilinear field stored as a multiresolution pyramid
  (:mod:`slicefield.pyramid`, CDF 5/3 lifting: each level is the linear interpolation of the coarser one plus a
  residual). The residuals (detail coefficients) are quantised with one step per band, ``step / sqrt(gain)``
  (equal squared error per band), rounding with a small dead zone (:data:`DEADZONE`); most become 0. A constant
  background (voxels equal to the volume's minimum, e.g. outside a skull-stripped brain, when they are at least
  :data:`MIN_BACKGROUND_FRACTION` of the volume) is stored exactly as a bit mask and filled smoothly before the
  transform, so the pyramid spends nothing on the brain's edge. The rate search bisects ``step``.
* ``"voxel"``: a :class:`~slicefield.representations.voxel.VoxelGrid` over the volume's own voxel frame
  (:class:`~slicefield.representations.base.GridFrame`: corner voxel centres at ``u = +-1``) with
  ``ceil((n - 1) / factor) + 1`` samples per axis, read back by trilinear interpolation. Its values are the
  least-squares fit to the volume (L-BFGS on ``sum (field(x_i) - v_i)^2`` over every voxel centre); ``factor = 1``
  is the volume's own samples. Each tensor is quantised to ``bits`` bits with an offset and a scale, differenced
  along the last axis and LZMA-compressed. The search tries the factors from finest to coarsest with the fewest
  bits that meet the target; a factor whose best PSNR (at :data:`MAX_BITS`) misses it ends the search.

``time_budget_s`` bounds the search: when it runs out, the best file found so far is kept (or, if none meets the
target, the one with the highest PSNR, reported as such).

File layout (version :data:`FORMAT_VERSION`; version 1 files, voxel fields only, are still read; little-endian;
no pickle anywhere)::

    magic   8 bytes   b"SLICEFZ\\0"
    version uint16
    hlen    uint32    length of the header
    plen    uint64    length of the payload
    header  hlen      UTF-8 JSON: shape, affine (voxel -> world mm RAS), field, compression, tensors
    payload plen      the tensors' coded bytes one after the other, compressed (LZMA or bzip2, as the header says)
    digest  32 bytes  SHA-256 of everything before it

:func:`read_sfz` checks all of it and raises a one-line :class:`~slicefield.errors.SlicefieldError` for a file that
is not ``.sfz``, of another version, truncated or corrupted.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import lzma
import math
import struct
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import pyramid
from .errors import SlicefieldError
from .io.atomic import atomic_path
from .metrics import psnr
from .volume import Volume

#: First bytes of every .sfz file.
MAGIC = b"SLICEFZ\0"
#: Version of the .sfz layout written by this module.
FORMAT_VERSION = 2
#: Versions this module reads (1: voxel fields, LZMA payload, no ``compression`` key).
READABLE_VERSIONS = (1, 2)
#: struct layout of the fixed-size prefix: magic, version, header length, payload length.
_PREFIX = struct.Struct("<8sHIQ")
#: Bytes of the SHA-256 digest at the end of the file.
_DIGEST_BYTES = 32
#: Fewest and most bits per quantised parameter the voxel field's rate search tries.
MIN_BITS, MAX_BITS = 2, 16
#: LZMA preset of a voxel field's payload (6: the library default; higher presets gained < 1 % on Colin27).
LZMA_PRESET = 6
#: Largest header accepted on load (a corrupted length must not make the reader allocate gigabytes).
MAX_HEADER_BYTES = 1 << 20
#: Field kinds :func:`compress_volume` knows.
FIELDS = ("pyramid", "voxel")
#: Pyramid quantiser: ``q = sign(c) max(floor(|c| / s + 0.5 - DEADZONE), 0)`` -- rounding, with a slightly wider
#: zero bin. Chosen on Colin27 at 40 dB (bytes at equal PSNR; DEADZONE 0 / 0.1 / 0.2 / 0.3: 178 / 168 / 176 / 188 kB
#: of coefficients).
DEADZONE = 0.1
#: Pyramid dequantiser: ``c = sign(q) (|q| + RECON_OFFSET) s`` (stored in the header; 0.05 measured best with 0.1).
RECON_OFFSET = 0.05
#: A constant background is stored as a mask only when it covers at least this fraction of the volume.
MIN_BACKGROUND_FRACTION = 0.05
#: int8 code of a detail coefficient outside [-127, 127]; its value follows in the ``escapes`` tensor (int32).
ESCAPE = -128
#: Levels of the pyramid (measured on Colin27 at 40 dB: 3 and 4 levels within 1 % of each other).
PYRAMID_LEVELS = 4


@dataclass(frozen=True)
class CompressConfig:
    """How to compress a volume."""

    target_psnr_db: float = 45.0
    """Smallest acceptable PSNR of the decoded volume, dB (data range = max - min of the volume, every voxel)."""
    fields: tuple[str, ...] = ("pyramid",)
    """Field kinds tried (see the module docstring): ``"pyramid"`` and/or ``"voxel"``."""
    factors: tuple[float, ...] = (1.0, 1.5, 2.0, 3.0)
    """Voxel field resolutions tried, as voxel-spacing multiples of the volume's (1: one sample per voxel)."""
    levels: int = PYRAMID_LEVELS
    """Levels of the pyramid field."""
    time_budget_s: float | None = None
    """Stop the rate search after this many seconds and keep the best file so far."""
    fit_iterations: int = 30
    """L-BFGS iterations of the least-squares voxel field fit (factors > 1)."""

    def __post_init__(self) -> None:
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown or not self.fields:
            raise ValueError(f"fields must be a non-empty subset of {FIELDS}, got {self.fields}")


@dataclass(frozen=True)
class CompressResult:
    """What :func:`compress_volume` chose and measured."""

    data: bytes
    """The .sfz file's bytes."""
    psnr_db: float
    """PSNR of the decoded volume against the input (dB)."""
    field: str
    """Field kind chosen (``"pyramid"`` or ``"voxel"``)."""
    n_parameters: int
    """Scalar parameters of the stored field (voxel: samples; pyramid: non-zero quantised coefficients)."""
    met_target: bool
    """Whether ``psnr_db >= target``; False when no candidate in the budget reached it."""
    seconds: float
    """Wall time of the whole search."""
    factor: float | None = None
    """Voxel field: resolution chosen (voxel-spacing multiple)."""
    bits: int | None = None
    """Voxel field: bits per parameter chosen."""
    step: float | None = None
    """Pyramid field: quantiser step (intensity units, before the per-band gain)."""
    tried: tuple[dict, ...] = ()
    """Every candidate the search measured, in order."""

    def describe(self) -> str:
        """One line: the field and its rate parameters."""
        if self.field == "pyramid":
            return f"pyramid field, step {self.step:.4g}, {self.n_parameters} non-zero coefficients"
        return f"voxel field, factor {self.factor:g}, {self.bits} bits"


# ---------------------------------------------------------------------------------------------- the voxel field
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


def encode_field(values: np.ndarray, bits: int, *, volume_shape, affine: np.ndarray, extra: dict) -> bytes:
    """A .sfz file holding a voxel field ``values`` quantised to ``bits`` bits, for a volume of ``volume_shape``."""
    q, lo, hi = quantise(values, bits)
    raw = encode_integers(q, bits)
    header = {
        "shape": [int(s) for s in volume_shape],
        "affine": [float(a) for a in np.asarray(affine, dtype=np.float64).ravel()],
        "field": {"kind": "voxel", "frame": "grid", "interpolation": "trilinear-align-corners"},
        "compression": "lzma",
        "tensors": [
            {"name": "values", "shape": [int(s) for s in values.shape], "bits": bits, "lo": lo, "hi": hi,
             "predictor": "previous-along-last-axis", "nbytes": len(raw)}
        ],
        **extra,
    }  # fmt: skip
    return pack_sfz(header, lzma.compress(raw, preset=LZMA_PRESET))


def _decode_voxel(header: dict, raw: bytes, fix, path) -> np.ndarray:
    import torch

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
        return _upsample(torch.from_numpy(tensors["values"]), shape).numpy()


def _psnr_of(values: np.ndarray, bits: int, target: np.ndarray, data_range: float) -> float:
    import torch

    q, lo, hi = quantise(values, bits)
    with torch.no_grad():
        decoded = _upsample(torch.from_numpy(dequantise(q, bits, lo, hi)), target.shape).numpy()
    return psnr(target, decoded, data_range=data_range)


#: What a field's rate search returns: candidates ``(blob, psnr, met, result fields)`` and every trial it measured.
_Search = tuple[list[tuple[bytes, float, bool, dict]], list[dict]]


def _search_voxel(volume: Volume, data: np.ndarray, data_range: float, config: CompressConfig, t0: float) -> _Search:
    """The voxel field's rate search (see the module docstring)."""
    out, tried = [], []
    for factor in sorted(config.factors):
        if config.time_budget_s is not None and out and time.perf_counter() - t0 > config.time_budget_s:
            break
        values = fit_voxel_field(data, factor, iterations=config.fit_iterations)
        top = _psnr_of(values, MAX_BITS, data, data_range)
        if top < config.target_psnr_db:  # even the finest quantisation misses: coarser fields will too
            extra = {"psnr_db": top, "data_range": data_range, "factor": factor}
            blob = encode_field(values, MAX_BITS, volume_shape=data.shape, affine=volume.affine, extra=extra)
            tried.append({"field": "voxel", "factor": factor, "bits": MAX_BITS, "psnr_db": top, "bytes": None})
            out.append((blob, top, False, {"factor": factor, "bits": MAX_BITS, "n_parameters": int(values.size)}))
            break
        lo_b, hi_b = MIN_BITS, MAX_BITS  # fewest bits meeting the target (PSNR grows with bits)
        while lo_b < hi_b:
            mid = (lo_b + hi_b) // 2
            if _psnr_of(values, mid, data, data_range) >= config.target_psnr_db:
                hi_b = mid
            else:
                lo_b = mid + 1
        value = _psnr_of(values, lo_b, data, data_range)
        extra = {"psnr_db": value, "data_range": data_range, "factor": factor}
        blob = encode_field(values, lo_b, volume_shape=data.shape, affine=volume.affine, extra=extra)
        tried.append({"field": "voxel", "factor": factor, "bits": lo_b, "psnr_db": value, "bytes": len(blob)})
        out.append((blob, value, True, {"factor": factor, "bits": lo_b, "n_parameters": int(values.size)}))
    return out, tried


# -------------------------------------------------------------------------------------------- the pyramid field
def background_mask(data: np.ndarray) -> np.ndarray | None:
    """Voxels equal to the volume's minimum, when they are >= :data:`MIN_BACKGROUND_FRACTION` of it (else None)."""
    mask = data == data.min()
    fraction = float(mask.mean())
    return mask if MIN_BACKGROUND_FRACTION <= fraction < 1.0 else None


def fill_background(data: np.ndarray, background: np.ndarray) -> np.ndarray:
    """``data`` with its background replaced by a smooth continuation of the foreground (float64).

    Normalised convolution at growing scales (sigma 2, 4, ... 32 voxels): each background voxel takes the
    Gaussian-weighted mean of the foreground at the finest scale that reaches it; the rest, the foreground mean.
    Only the encoder calls this; the decoder restores the background from the mask.
    """
    from scipy.ndimage import gaussian_filter

    fg = (~background).astype(np.float32)
    values = np.where(background, 0.0, data).astype(np.float32)
    out = data.astype(np.float64)
    todo = background.copy()
    for sigma in (2, 4, 8, 16, 32):
        den = gaussian_filter(fg, sigma, truncate=3.0)
        reach = todo & (den > 1e-3)
        out[reach] = gaussian_filter(values, sigma, truncate=3.0)[reach] / den[reach]
        todo &= ~reach
        if not todo.any():
            break
    out[todo] = float(data[~background].mean())
    return out


@dataclass(frozen=True)
class _Analysed:
    """A volume's pyramid, ready to quantise at any step."""

    coarse: np.ndarray
    details: list
    gains: list
    coarse_gain: float
    background: np.ndarray | None
    background_value: float


def _analyse(data: np.ndarray, *, levels: int) -> _Analysed:
    background = background_mask(data)
    filled = data.astype(np.float64) if background is None else fill_background(data, background)
    coarse, details = pyramid.forward(filled, levels=levels)
    gains, coarse_gain = pyramid.band_gains(data.shape, [list(level) for level in details])
    return _Analysed(coarse, details, gains, coarse_gain, background, float(data.min()))


def _quantise_pyramid(a: _Analysed, step: float) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    qc = np.rint(a.coarse * math.sqrt(a.coarse_gain) / step).astype(np.int64)
    qd = []
    for level, gains in zip(a.details, a.gains, strict=True):
        qd.append({})
        for name, c in level.items():
            mag = np.floor(np.abs(c) * (math.sqrt(gains[name]) / step) + (0.5 - DEADZONE))
            qd[-1][name] = (np.sign(c) * np.maximum(mag, 0.0)).astype(np.int64)
    return qc, qd


def _synthesise(qc, qd, *, step: float, gains, coarse_gain, offset: float, background, value: float) -> np.ndarray:
    """Dequantise and invert the pyramid; restore the background. float32 volume."""
    coarse = qc * (step / math.sqrt(coarse_gain))
    details = []
    for level, level_gains in zip(qd, gains, strict=True):
        details.append({})
        for name, q in level.items():
            c = np.sign(q) * (np.abs(q) + offset) * (step / math.sqrt(level_gains[name]))
            details[-1][name] = c
    out = pyramid.inverse(coarse, details)
    if background is not None:
        out[background] = value
    return out.astype(np.float32)


def _pack_mask(mask: np.ndarray) -> tuple[bytes, int]:
    """A boolean volume -> (packed bits of its changes along the axis that codes smallest, that axis)."""
    best = None
    for axis in range(3):
        bits = np.packbits(np.diff(mask.astype(np.int8), axis=axis, prepend=0) != 0).tobytes()
        size = len(bz2.compress(bits, 9))
        if best is None or size < best[0]:
            best = (size, bits, axis)
    return best[1], best[2]


def _unpack_mask(raw: bytes, shape: tuple[int, int, int], axis: int) -> np.ndarray:
    n = int(np.prod(shape))
    changes = np.unpackbits(np.frombuffer(raw, np.uint8), count=n).reshape(shape)
    return (np.cumsum(changes, axis=axis, dtype=np.int64) % 2).astype(bool)


def _encode_pyramid(a: _Analysed, qc, qd, *, step: float, shape, affine, extra: dict) -> bytes:
    sections, tensors = [], []
    if a.background is not None:
        bits, axis = _pack_mask(a.background)
        sections.append(bits)
        tensors.append({"name": "background", "coding": "changes-packbits", "axis": axis, "nbytes": len(bits)})
    coarse = np.diff(qc, axis=-1, prepend=0).astype("<i4").tobytes()
    sections.append(coarse)
    tensors.append({"name": "coarse", "coding": "int32-previous-along-last-axis", "nbytes": len(coarse)})
    flat = np.concatenate([q.ravel() for level in qd for q in level.values()]) if qd else np.zeros(0, np.int64)
    big = np.abs(flat) > 127
    codes = np.where(big, ESCAPE, flat).astype("<i1").tobytes()
    escapes = flat[big].astype("<i4").tobytes()
    sections += [codes, escapes]
    tensors.append({"name": "details", "coding": "int8-escape", "nbytes": len(codes)})
    tensors.append({"name": "escapes", "coding": "int32", "nbytes": len(escapes)})
    header = {
        "shape": [int(s) for s in shape],
        "affine": [float(x) for x in np.asarray(affine, dtype=np.float64).ravel()],
        "field": {"kind": "pyramid", "wavelet": "cdf53-lifting", "frame": "grid", "levels": len(qd),
                  "step": float(step), "recon_offset": RECON_OFFSET,
                  "background": None if a.background is None else a.background_value},
        "compression": "bz2",
        "tensors": tensors,
        **extra,
    }  # fmt: skip
    return pack_sfz(header, bz2.compress(b"".join(sections), 9))


def _decode_pyramid(header: dict, raw: bytes, fix, path) -> np.ndarray:
    shape = tuple(int(s) for s in header["shape"])
    f = header["field"]
    coarse_shape, layout = pyramid.layout(shape, levels=int(f["levels"]))
    records = {t["name"]: t for t in header["tensors"]}
    names = ["background"] * (f["background"] is not None) + ["coarse", "details", "escapes"]
    n_details = sum(int(np.prod(s)) for level in layout for _, s in level)
    expected = {
        "background": (int(np.prod(shape)) + 7) // 8,
        "coarse": int(np.prod(coarse_shape)) * 4,
        "details": n_details,
    }
    if [t["name"] for t in header["tensors"]] != names:
        raise SlicefieldError("payload holds other data than its header lists", path=path, fix=fix)
    chunks, offset = {}, 0
    for name in names:
        n = int(records[name]["nbytes"])
        if (name in expected and n != expected[name]) or offset + n > len(raw):
            raise SlicefieldError(f"tensor {name!r} does not match its stored size", path=path, fix=fix)
        chunks[name], offset = raw[offset : offset + n], offset + n
    if offset != len(raw):
        raise SlicefieldError("payload holds other data than its header lists", path=path, fix=fix)
    codes = np.frombuffer(chunks["details"], "<i1").astype(np.int64)
    escapes = np.frombuffer(chunks["escapes"], "<i4") if len(chunks["escapes"]) % 4 == 0 else None
    is_escape = codes == ESCAPE
    if escapes is None or len(escapes) != int(is_escape.sum()):
        raise SlicefieldError("tensor 'escapes' does not match its stored size", path=path, fix=fix)
    codes[is_escape] = escapes
    qc = np.cumsum(np.frombuffer(chunks["coarse"], "<i4").astype(np.int64).reshape(coarse_shape), axis=-1)
    qd, start = [], 0
    for level in layout:
        qd.append({})
        for name, s in level:
            n = int(np.prod(s))
            qd[-1][name], start = codes[start : start + n].reshape(s), start + n
    gains, coarse_gain = pyramid.band_gains(shape, [[name for name, _ in level] for level in layout])
    background = None
    if f["background"] is not None:
        background = _unpack_mask(chunks["background"], shape, int(records["background"]["axis"]))
    return _synthesise(
        qc, qd, step=float(f["step"]), gains=gains, coarse_gain=coarse_gain, offset=float(f["recon_offset"]),
        background=background, value=float(f["background"] or 0.0),
    )  # fmt: skip


def _search_pyramid(volume: Volume, data: np.ndarray, data_range: float, config: CompressConfig, t0: float) -> _Search:
    """Bisect the pyramid's step (log scale) for the largest one that meets the target PSNR."""
    a = _analyse(data, levels=config.levels)

    def measure(step: float) -> tuple[float, tuple]:
        qc, qd = _quantise_pyramid(a, step)
        out = _synthesise(
            qc, qd, step=step, gains=a.gains, coarse_gain=a.coarse_gain, offset=RECON_OFFSET,
            background=a.background, value=a.background_value,
        )  # fmt: skip
        return psnr(data, out, data_range=data_range), (qc, qd)

    lo, hi = data_range * 2.0**-16, data_range * 2.0  # PSNR falls as the step grows
    best, tried = None, []
    value, q = measure(hi)
    tried.append({"field": "pyramid", "step": hi, "psnr_db": value})
    if value >= config.target_psnr_db:
        best = (hi, value, q)
    while best is None or (hi / lo > 1.01 and best[0] < hi):
        if config.time_budget_s is not None and best is not None and time.perf_counter() - t0 > config.time_budget_s:
            break
        mid = math.sqrt(lo * hi)
        value, q = measure(mid)
        tried.append({"field": "pyramid", "step": mid, "psnr_db": value})
        if value >= config.target_psnr_db:
            best, lo = (mid, value, q), mid
        else:
            hi = mid
        if best is None and hi / lo <= 1.01:  # the finest step misses too: keep it, reported as missed
            value, q = measure(lo)
            best = (lo, value, q)
            break
    step, value, (qc, qd) = best
    extra = {"psnr_db": value, "data_range": data_range}
    blob = _encode_pyramid(a, qc, qd, step=step, shape=data.shape, affine=volume.affine, extra=extra)
    nonzero = int(sum(np.count_nonzero(q) for level in qd for q in level.values()) + np.count_nonzero(qc))
    tried[-1]["bytes"] = len(blob)
    met = value >= config.target_psnr_db
    return [(blob, value, met, {"step": step, "n_parameters": nonzero})], tried


# ---------------------------------------------------------------------------------------------- file layout
def pack_sfz(header: dict, payload: bytes, *, version: int = FORMAT_VERSION) -> bytes:
    """Header (JSON-able dict) + payload -> the bytes of a .sfz file (see the module docstring)."""
    head = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    body = _PREFIX.pack(MAGIC, version, len(head), len(payload)) + head + payload
    return body + hashlib.sha256(body).digest()


def unpack_sfz(data: bytes, *, path: str | Path | None = None) -> tuple[dict, bytes]:
    """Check a .sfz file's bytes (magic, version, lengths, digest, header) -> (header, payload)."""
    fix = "pass a .sfz file written by slicefield compress (re-create it if it was damaged)"
    if len(data) < _PREFIX.size + _DIGEST_BYTES:
        raise SlicefieldError(f"too short to be a .sfz file ({len(data)} bytes)", path=path, fix=fix)
    magic, version, hlen, plen = _PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise SlicefieldError("not a .sfz file (wrong magic bytes)", path=path, fix=fix)
    if version not in READABLE_VERSIONS:
        raise SlicefieldError(
            f".sfz format version {version}, this slicefield reads versions {', '.join(map(str, READABLE_VERSIONS))}",
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
        _check_header(header, version)
    except (ValueError, TypeError, KeyError) as e:
        raise SlicefieldError(f"malformed header ({e})", path=path, fix=fix) from e
    return header, body[_PREFIX.size + hlen :]


def _check_header(h: dict, version: int) -> None:
    if not isinstance(h, dict):
        raise TypeError("header is not an object")
    shape = [int(s) for s in h["shape"]]
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"bad volume shape {shape}")
    if np.asarray(h["affine"], dtype=np.float64).shape != (16,):
        raise ValueError("affine must have 16 numbers")
    compression = h.get("compression", "lzma") if version == 1 else h["compression"]
    if compression not in ("lzma", "bz2"):
        raise ValueError(f"unknown compression {compression!r}")
    kind = h["field"]["kind"]
    if kind == "voxel":
        for t in h["tensors"]:
            if not MIN_BITS <= int(t["bits"]) <= MAX_BITS or int(t["nbytes"]) < 0:
                raise ValueError(f"bad tensor record {t}")
            [int(s) for s in t["shape"]]
            float(t["lo"]), float(t["hi"])
    elif kind == "pyramid" and version >= 2:
        f = h["field"]
        if not 0 <= int(f["levels"]) <= 32 or not (math.isfinite(float(f["step"])) and float(f["step"]) > 0):
            raise ValueError(f"bad pyramid field {f}")
        float(f["recon_offset"]), f["background"] is None or float(f["background"])
        for t in h["tensors"]:
            if int(t["nbytes"]) < 0:
                raise ValueError(f"bad tensor record {t}")
    else:
        raise ValueError(f"unknown field kind {kind!r}")


def decode_sfz(data: bytes, *, path: str | Path | None = None) -> Volume:
    """The volume a .sfz file's bytes encode (float32, with its affine)."""
    header, payload = unpack_sfz(data, path=path)
    fix = "re-create the file with slicefield compress"
    expected = sum(int(t["nbytes"]) for t in header["tensors"])
    compression = header.get("compression", "lzma")
    decompressor = lzma.LZMADecompressor() if compression == "lzma" else bz2.BZ2Decompressor()
    try:  # never inflate more than the header announces (a damaged or hostile payload cannot exhaust memory)
        raw = decompressor.decompress(payload, max_length=expected + 1)
    except (lzma.LZMAError, OSError, EOFError) as e:
        raise SlicefieldError(f"payload does not decompress ({e})", path=path, fix=fix) from e
    if header["field"]["kind"] == "voxel":
        out = _decode_voxel(header, raw, fix, path)
    else:
        out = _decode_pyramid(header, raw, fix, path)
    return Volume(np.ascontiguousarray(out, dtype=np.float32), np.asarray(header["affine"]).reshape(4, 4))


# ---------------------------------------------------------------------------------------------- top level
def compress_volume(volume: Volume, *, config: CompressConfig = CompressConfig()) -> CompressResult:
    """The smallest .sfz of ``volume`` meeting the target PSNR over ``config.fields`` (see the module docstring)."""
    t0 = time.perf_counter()
    data = np.asarray(volume.data, dtype=np.float32)
    data_range = float(data.max() - data.min())
    if data_range <= 0:
        data_range = 1.0  # a constant volume: any field reproduces it exactly
    candidates, tried = [], []
    for kind in config.fields:
        search = _search_pyramid if kind == "pyramid" else _search_voxel
        found, measured = search(volume, data, data_range, config, t0)
        candidates += [(kind, *c) for c in found]
        tried += measured
    met = [c for c in candidates if c[3]]
    kind, blob, value, ok, params = min(met, key=lambda c: len(c[1])) if met else max(candidates, key=lambda c: c[2])
    return CompressResult(
        blob, value, kind, params["n_parameters"], ok, time.perf_counter() - t0,
        factor=params.get("factor"), bits=params.get("bits"), step=params.get("step"), tried=tuple(tried),
    )  # fmt: skip


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
