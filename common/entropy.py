"""Lossless entropy coding of binary masks (the optional compressed mask file).

A piggyback mask stores one bit per backbone weight (paper, section 3: 1 bit per
parameter, the 1.28 parameter ratio of the decathlon). Learned masks are far from
balanced: the paper's Table 6 reports 4.5-43 % zeros, so the information in a mask is
the binary entropy H(p) of its zero fraction p, well under one bit. This module owns
the coder that gets there:

* ``encode_mask(bits) -> bytes`` / ``decode_mask(data, n) -> bits``.
* The mask is cut into blocks of 2**block_log2 bits, each coded on its own (bounded
  memory on VGG-16's 134 M bits, and each block adapts to its own zero fraction, which
  can only lower the total since the entropy is concave).
* In a block, the rarer symbol splits the stream into runs of the common symbol whose
  lengths are geometric for an independent source; a Golomb code with the parameter m
  that minimises the exact coded size is optimal among prefix codes for that law. Its
  worst excess over H(p) is about 0.041 bit/weight (near p = 0.38). Zeros that cluster
  (whole kernels or filters switched off) carry far less information than H(p); for
  them the lengths of the alternating runs of both symbols are Golomb-coded instead.
  Each block takes the smallest of these two codings and raw bit packing.
* Every Golomb codeword ``unary(n // m) + truncated_binary(n % m)`` is split over three
  separate streams (unary parts, the first k-1 remainder bits of every codeword, the
  extra remainder bit of the "long" codewords) so that encoding and decoding are a
  handful of vectorised numpy operations instead of a bit-serial loop.

Layout (little-endian): header ``magic "PBEM", version u8, block_log2 u8, n u64,
crc32 u32`` (crc over everything after the header), then per block a mode byte:
0 = raw packed bits; 1/2 = runs between rare symbols 0/1 as one Golomb sequence; 3 = the
block's first symbol (u8), then the alternating run lengths minus one as two Golomb
sequences (runs of the first symbol, runs of the other). A Golomb sequence is
``m u32, codewords u32, unary_bits u32, extra_bits u32`` and its three packed streams.
"""
from __future__ import annotations

import struct
import zlib

import numpy as np

__all__ = ["encode_mask", "decode_mask", "binary_entropy", "MaskCodingError"]

MAGIC = b"PBEM"
VERSION = 1
DEFAULT_BLOCK_LOG2 = 23  # 8 Mi bits per block: ~64 MB of int64 temporaries at most
_HEADER = struct.Struct("<4sBBQI")
_GOLOMB = struct.Struct("<IIII")
MODE_RAW, MODE_RARE_ZERO, MODE_RARE_ONE, MODE_RUNS = 0, 1, 2, 3


class MaskCodingError(ValueError):
    """The byte string is not a valid entropy-coded mask (corrupt or truncated)."""


def binary_entropy(p: float) -> float:
    """H(p) in bits; 0 at p = 0 and p = 1."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"binary_entropy: p must be in [0, 1], got {p}")
    if p in (0.0, 1.0):
        return 0.0
    return float(-(p * np.log2(p) + (1.0 - p) * np.log2(1.0 - p)))


# --------------------------------------------------------------------------- helpers
def _as_bool_vector(bits) -> np.ndarray:
    if not isinstance(bits, np.ndarray):
        raise TypeError(f"encode_mask: expected a numpy array, got {type(bits).__name__}")
    if bits.dtype == np.bool_:
        return bits.reshape(-1)
    if np.issubdtype(bits.dtype, np.integer):
        flat = bits.reshape(-1)
        if flat.size and (flat.min() < 0 or flat.max() > 1):
            raise ValueError("encode_mask: integer mask must hold only 0 and 1, "
                             f"found values in [{flat.min()}, {flat.max()}]")
        return flat.astype(bool)
    raise TypeError(f"encode_mask: expected a bool (or 0/1 integer) array, got dtype {bits.dtype}")


def _golomb_shape(m: int) -> tuple[int, int]:
    """(k, u) of the truncated-binary remainder: k = ceil(log2 m), u = 2**k - m.

    Remainders r < u take k-1 bits, the others k bits (r + u written in k bits)."""
    k = (m - 1).bit_length()
    return k, (1 << k) - m


def _golomb_bits(runs: np.ndarray, m: int) -> int:
    """Exact size in bits of the Golomb code of ``runs`` with parameter m."""
    k, u = _golomb_shape(m)
    # unary parts (q ones + a terminating zero), k-1 remainder bits each and one more when
    # r >= u; for m = 1 (k = 0, u = 0) the remainder terms cancel: n*(k-1) + n = 0.
    n = runs.size
    return int((runs // m).sum()) + n + n * (k - 1) + int(np.count_nonzero(runs % m >= u))


def _best_m(runs: np.ndarray) -> tuple[int, int]:
    """The Golomb parameter with the smallest exact code for ``runs``, and that size.

    Candidates surround the optimum for a geometric law with the runs' mean; the exact
    sizes decide, so a non-geometric block still gets the best of them."""
    if runs.size == 0:
        return 1, 0
    mean = float(runs.mean())
    m0 = 1
    if mean > 0.0:
        q = mean / (1.0 + mean)  # ML estimate of the geometric law's continuation probability
        m0 = max(1, int(np.ceil(np.log1p(q) / -np.log(q))))
    candidates = {max(1, c) for c in (m0 - 1, m0, m0 + 1, int(m0 * 0.8), int(np.ceil(m0 * 1.25)))}
    sizes = {m: _golomb_bits(runs, m) for m in sorted(candidates) if m < 2 ** 32}
    m = min(sizes, key=sizes.get)
    return m, sizes[m]


def _pack(bits: np.ndarray) -> bytes:
    return np.packbits(bits).tobytes()  # b"" for no bits


def _nbytes(nbits: int) -> int:
    return (nbits + 7) // 8


# --------------------------------------------------------------------------- encode
def _golomb_encode(values: np.ndarray, m: int) -> bytes:
    """Golomb code of the non-negative ``values``: four header fields, then the packed
    unary, leading-remainder and extra-bit streams."""
    k, u = _golomb_shape(m)
    quot, rem = np.divmod(values, m)
    unary = np.ones(int(quot.sum()) + values.size, dtype=bool)
    unary[np.cumsum(quot + 1) - 1] = False
    head_stream, extra = b"", np.zeros(0, dtype=bool)
    if m > 1:
        long = rem >= u
        value = np.where(long, rem + u, rem)  # truncated binary: long codes are r + u in k bits
        if k > 1:
            head = np.where(long, value >> 1, value)  # the first k-1 bits; >= u exactly when long
            shifts = np.arange(k - 2, -1, -1, dtype=np.int64)
            head_stream = _pack(((head[:, None] >> shifts) & 1).astype(bool).ravel())
        extra = (value[long] & 1).astype(bool)
    return _GOLOMB.pack(m, values.size, unary.size, extra.size) + _pack(unary) + head_stream + _pack(extra)


def _encode_block(block: np.ndarray) -> bytes:
    """The smallest of three codings of one block: raw bits, Golomb-coded runs of the
    common symbol between rare ones (independent bits), or Golomb-coded lengths of the
    alternating runs of both symbols (masks whose zeros cluster, e.g. whole filters)."""
    size = block.size
    rare = 2 * int(np.count_nonzero(block)) < size  # True: 1 is the rarer symbol
    pos = np.flatnonzero(block) if rare else np.flatnonzero(~block)
    # a virtual rare symbol just past the end closes the last run; the decoder drops it
    runs = np.diff(np.append(pos, size).astype(np.int64), prepend=-1) - 1
    m_runs, bits_runs = _best_m(runs)
    edges = np.flatnonzero(block[1:] != block[:-1]) + 1
    lengths = np.diff(np.concatenate(([0], edges, [size])).astype(np.int64)) - 1
    first, second = lengths[0::2], lengths[1::2]  # runs of block[0], then of the other symbol
    (m_first, bits_first), (m_second, bits_second) = _best_m(first), _best_m(second)
    sizes = {  # bytes, padding of every stream included at its worst
        MODE_RAW: _nbytes(size),
        MODE_RARE_ONE: _GOLOMB.size + _nbytes(bits_runs) + 2,
        MODE_RUNS: 1 + 2 * _GOLOMB.size + _nbytes(bits_first) + _nbytes(bits_second) + 4,
    }
    mode = min(sizes, key=sizes.get)
    if mode == MODE_RAW:
        return bytes([MODE_RAW]) + _pack(block)
    if mode == MODE_RARE_ONE:
        return bytes([MODE_RARE_ONE if rare else MODE_RARE_ZERO]) + _golomb_encode(runs, m_runs)
    return (bytes([MODE_RUNS, int(block[0])]) + _golomb_encode(first, m_first)
            + _golomb_encode(second, m_second))


def encode_mask(bits: np.ndarray, *, block_log2: int = DEFAULT_BLOCK_LOG2) -> bytes:
    """Losslessly code a boolean mask (any shape, flattened in C order) to bytes.

    The size is within about 0.041 bit per weight of ``n * H(p)`` for an independent
    mask with zero fraction p, plus 18 header bytes and ~20 bytes per block; masks whose
    zeros come in runs (whole kernels or filters) code far below H(p)."""
    if not 3 <= int(block_log2) <= 31:
        raise ValueError(f"encode_mask: block_log2 must be in [3, 31], got {block_log2}")
    flat = _as_bool_vector(bits)
    step = 1 << int(block_log2)
    body = b"".join(_encode_block(flat[i:i + step]) for i in range(0, flat.size, step))
    header = _HEADER.pack(MAGIC, VERSION, int(block_log2), flat.size, zlib.crc32(body))
    return header + body


# --------------------------------------------------------------------------- decode
class _Reader:
    def __init__(self, data: memoryview):
        self.data, self.at = data, 0

    def take(self, nbytes: int, what: str) -> memoryview:
        if self.at + nbytes > len(self.data):
            raise MaskCodingError(f"corrupt mask stream: truncated inside {what} "
                                  f"(needs {nbytes} bytes at offset {self.at}, "
                                  f"{len(self.data) - self.at} left)")
        out = self.data[self.at:self.at + nbytes]
        self.at += nbytes
        return out

    def bits(self, nbits: int, what: str) -> np.ndarray:
        raw = np.frombuffer(self.take(_nbytes(nbits), what), dtype=np.uint8)
        return np.unpackbits(raw, count=nbits).view(bool)


def _golomb_decode(reader: _Reader, size: int, what: str) -> np.ndarray:
    """One Golomb-coded sequence of at most ``size + 1`` values, each at most ``size``."""
    m, count, unary_bits, extra_bits = _GOLOMB.unpack(reader.take(_GOLOMB.size, f"{what} header"))
    if m < 1 or count > size + 1 or unary_bits < count or (count == 0 and unary_bits + extra_bits):
        raise MaskCodingError(f"corrupt mask stream: {what} header is inconsistent "
                              f"(m={m}, codewords={count}, unary bits={unary_bits}, block size={size})")
    unary = reader.bits(unary_bits, f"{what} unary stream")
    stops = np.flatnonzero(~unary)
    if stops.size != count or (count and stops[-1] != unary_bits - 1):
        raise MaskCodingError(f"corrupt mask stream: {what} unary stream holds "
                              f"{stops.size} codewords, header says {count}")
    quotients = np.diff(stops, prepend=-1) - 1
    if count and int(quotients.max()) > size // m:  # also keeps the products below from overflowing
        raise MaskCodingError(f"corrupt mask stream: {what} holds a run longer than its {size} bits")
    values = quotients * m
    if m == 1:
        if extra_bits:
            raise MaskCodingError(f"corrupt mask stream: {what} has m=1 but {extra_bits} extra bits")
        return values
    k, u = _golomb_shape(m)
    head = np.zeros(count, dtype=np.int64)  # m = 2 has no leading remainder bits
    if k > 1:
        head_bits = reader.bits(count * (k - 1), f"{what} remainder stream")
        weights = np.left_shift(1, np.arange(k - 2, -1, -1, dtype=np.int64))
        head = head_bits.reshape(count, k - 1).astype(np.int64) @ weights
    long = head >= u
    if int(np.count_nonzero(long)) != extra_bits:
        raise MaskCodingError(f"corrupt mask stream: {what} has {int(np.count_nonzero(long))} "
                              f"long remainders, header says {extra_bits}")
    extra = reader.bits(extra_bits, f"{what} extra-bit stream").astype(np.int64)
    head[long] = 2 * head[long] + extra - u
    return values + head


def _decode_block(reader: _Reader, size: int, index: int) -> np.ndarray:
    mode = reader.take(1, f"block {index} mode")[0]
    where = f"block {index}"
    if mode == MODE_RAW:
        return reader.bits(size, f"raw {where}")
    if mode in (MODE_RARE_ZERO, MODE_RARE_ONE):
        runs = _golomb_decode(reader, size, where)
        ends = np.cumsum(runs + 1) - 1
        if runs.size == 0 or ends[-1] != size:
            raise MaskCodingError(f"corrupt mask stream: {where} decodes to "
                                  f"{int(ends[-1]) if runs.size else 0} bits, expected {size}")
        rare = mode == MODE_RARE_ONE
        out = np.full(size, not rare, dtype=bool)
        out[ends[:-1]] = rare
        return out
    if mode == MODE_RUNS:
        first_symbol = reader.take(1, f"{where} first symbol")[0]
        first = _golomb_decode(reader, size, f"{where} runs of its first symbol")
        second = _golomb_decode(reader, size, f"{where} runs of its second symbol")
        if first_symbol > 1 or first.size - second.size not in (0, 1):
            raise MaskCodingError(f"corrupt mask stream: {where} holds {first.size} and {second.size} "
                                  f"alternating runs starting with symbol {first_symbol}")
        lengths = np.empty(first.size + second.size, dtype=np.int64)
        lengths[0::2], lengths[1::2] = first + 1, second + 1
        if int(lengths.sum()) != size:
            raise MaskCodingError(f"corrupt mask stream: {where} runs cover {int(lengths.sum())} bits, "
                                  f"expected {size}")
        symbols = (np.arange(lengths.size) & 1).astype(bool) ^ bool(first_symbol)
        return np.repeat(symbols, lengths)
    raise MaskCodingError(f"corrupt mask stream: {where} has unknown mode {mode}")


def decode_mask(data: bytes, n: int) -> np.ndarray:
    """Inverse of ``encode_mask``: a flat bool array of ``n`` bits.

    Raises MaskCodingError (a ValueError) on anything that is not an intact stream of
    exactly ``n`` bits: wrong magic or version, checksum mismatch, truncation."""
    view = memoryview(data if isinstance(data, bytes) else bytes(data))
    if len(view) < _HEADER.size:
        raise MaskCodingError(f"corrupt mask stream: {len(view)} bytes is shorter than the "
                              f"{_HEADER.size}-byte header")
    magic, version, block_log2, stored_n, crc = _HEADER.unpack(view[:_HEADER.size])
    if magic != MAGIC:
        raise MaskCodingError(f"corrupt mask stream: magic {bytes(magic)!r}, expected {MAGIC!r}")
    if version != VERSION:
        raise MaskCodingError(f"unsupported mask stream version {version} (this reader knows {VERSION})")
    if stored_n != int(n):
        raise MaskCodingError(f"mask stream holds {stored_n} bits, caller expected {int(n)}")
    if not 3 <= block_log2 <= 31:
        raise MaskCodingError(f"corrupt mask stream: block_log2 {block_log2} out of range")
    body = view[_HEADER.size:]
    if zlib.crc32(body) != crc:
        raise MaskCodingError("corrupt mask stream: checksum mismatch")
    reader = _Reader(body)
    step = 1 << block_log2
    blocks = [_decode_block(reader, min(step, stored_n - start), i)
              for i, start in enumerate(range(0, stored_n, step))]
    if reader.at != len(body):
        raise MaskCodingError(f"corrupt mask stream: {len(body) - reader.at} trailing bytes")
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=bool)
