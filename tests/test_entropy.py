"""Entropy-coded masks: lossless round trips, the H(p) + 0.05 bit bound, edge cases and
clear errors on damaged streams."""
import struct
import zlib

import numpy as np
import pytest

from common.entropy import MaskCodingError, binary_entropy, decode_mask, encode_mask


def bernoulli_mask(n, zero_fraction, seed):
    """A mask whose bits are independently 0 with probability ``zero_fraction``."""
    return np.random.default_rng(seed).random(n) >= zero_fraction


def roundtrip(bits, **kwargs):
    data = encode_mask(bits, **kwargs)
    out = decode_mask(data, bits.size)
    assert out.dtype == np.bool_ and out.shape == (bits.size,)
    np.testing.assert_array_equal(out, bits.reshape(-1))
    return data


def test_binary_entropy_values():
    assert binary_entropy(0.0) == 0.0 and binary_entropy(1.0) == 0.0
    assert binary_entropy(0.5) == pytest.approx(1.0)
    assert binary_entropy(0.11) == pytest.approx(binary_entropy(0.89))
    assert binary_entropy(0.11) == pytest.approx(0.4999, abs=1e-3)
    with pytest.raises(ValueError, match="p must be in"):
        binary_entropy(1.5)


@pytest.mark.parametrize("p", [0.0, 1e-4, 0.003, 0.02, 0.15, 0.25, 0.38, 0.45, 0.5, 0.62, 0.8, 0.97, 0.9999, 1.0])
def test_roundtrip_many_zero_fractions(p):
    roundtrip(bernoulli_mask(50_003, p, seed=int(p * 1e4)))


@pytest.mark.parametrize("p", [0.01, 0.05, 0.1, 0.3, 0.5])
def test_within_005_bits_of_entropy(p):
    n = 1_000_000
    bits = bernoulli_mask(n, p, seed=7)
    data = roundtrip(bits)
    p_hat = 1.0 - bits.mean()  # the mask's own zero fraction
    bits_per_weight = 8 * len(data) / n  # header included
    assert bits_per_weight <= binary_entropy(p_hat) + 0.05
    # never worse than plain bit packing beyond a block header
    assert len(data) <= n // 8 + 64


def test_worst_case_zero_fraction_still_within_bound():
    # Golomb coding is furthest from H(p) between m = 1 and m = 2, near p = 0.38
    for p in (0.34, 0.38, 0.42):
        bits = bernoulli_mask(300_000, p, seed=3)
        data = roundtrip(bits)
        assert 8 * len(data) / bits.size <= binary_entropy(1.0 - bits.mean()) + 0.05


def test_mostly_zero_masks_are_coded_symmetrically():
    bits = bernoulli_mask(200_000, 0.9, seed=11)
    flipped = ~bits
    a, b = roundtrip(bits), roundtrip(flipped)
    assert abs(len(a) - len(b)) <= 4
    assert 8 * len(a) / bits.size <= binary_entropy(0.9) + 0.05


def test_constant_masks_cost_only_headers():
    for value in (False, True):
        bits = np.full(1_000_000, value)
        data = roundtrip(bits)
        assert len(data) < 64


@pytest.mark.parametrize("n", [0, 1, 2, 7, 8, 9, 15, 16, 17, 100])
def test_tiny_and_empty(n):
    for bits in (np.zeros(n, bool), np.ones(n, bool), bernoulli_mask(n, 0.3, seed=n)):
        roundtrip(bits)
    assert decode_mask(encode_mask(np.zeros(0, bool)), 0).shape == (0,)


def test_multi_block_streams_with_varying_density():
    # blocks of 2**10 bits, each with its own zero fraction and a ragged last block
    rng = np.random.default_rng(5)
    parts = [rng.random(1024) >= p for p in (0.0, 0.02, 0.5, 0.9, 1.0, 0.3)] + [rng.random(333) >= 0.1]
    bits = np.concatenate(parts)
    roundtrip(bits, block_log2=10)
    roundtrip(bits, block_log2=3)


def test_layer_wise_sparsity_beats_global_entropy():
    # layers with different zero fractions, concatenated: per-block adaptation must
    # approach the sum of the per-block entropies, below the global H(p)
    rng = np.random.default_rng(9)
    fractions = (0.01, 0.05, 0.2, 0.4)
    bits = np.concatenate([rng.random(1 << 16) >= p for p in fractions])
    data = roundtrip(bits, block_log2=16)
    local = sum(binary_entropy(1 - bits[i << 16:(i + 1) << 16].mean()) for i in range(4)) / 4
    assert 8 * len(data) / bits.size <= local + 0.05
    assert local < binary_entropy(1 - bits.mean())


def clustered_mask(n_clusters, cluster, zero_fraction, seed):
    """Zeros in whole runs of ``cluster`` weights (a 3x3 kernel: 9, a 64x3x3 filter: 576)."""
    off = np.random.default_rng(seed).random(n_clusters) < zero_fraction
    return ~np.repeat(off, cluster)


@pytest.mark.parametrize("cluster, share", [(9, 0.5), (576, 0.03)])
def test_clustered_zeros_code_far_below_the_independent_entropy(cluster, share):
    # zeros switched off kernel by kernel or filter by filter carry ~H(p)/cluster bits
    # per weight; the alternating-run coding must find most of that saving
    bits = clustered_mask(600_000 // cluster, cluster, 0.2, seed=cluster)
    data = roundtrip(bits)
    assert 8 * len(data) / bits.size <= share * binary_entropy(1 - bits.mean())


def test_clustered_runs_across_blocks_and_both_first_symbols():
    for seed in range(4):
        bits = clustered_mask(300, 37, 0.3, seed)
        roundtrip(bits, block_log2=10)
        roundtrip(~bits, block_log2=10)
        roundtrip(bits[seed * 5:], block_log2=8)


def test_shapes_and_integer_input():
    bits = bernoulli_mask(6 * 5 * 3 * 3, 0.2, seed=1).reshape(6, 5, 3, 3)
    data = encode_mask(bits)
    np.testing.assert_array_equal(decode_mask(data, bits.size), bits.reshape(-1))
    assert encode_mask(bits.astype(np.uint8)) == data
    assert decode_mask(bytearray(data), bits.size).sum() == bits.sum()


def test_deterministic():
    bits = bernoulli_mask(10_000, 0.2, seed=2)
    assert encode_mask(bits) == encode_mask(bits.copy())


def test_bad_input_is_refused():
    with pytest.raises(TypeError, match="numpy array"):
        encode_mask([True, False])
    with pytest.raises(TypeError, match="dtype float"):
        encode_mask(np.zeros(4, dtype=np.float32))
    with pytest.raises(ValueError, match="only 0 and 1"):
        encode_mask(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="block_log2"):
        encode_mask(np.zeros(4, bool), block_log2=2)


def test_corrupt_streams_give_clear_errors():
    bits = bernoulli_mask(20_000, 0.1, seed=4)
    data = encode_mask(bits)
    with pytest.raises(MaskCodingError, match="caller expected 19999"):
        decode_mask(data, 19_999)
    with pytest.raises(MaskCodingError, match="magic"):
        decode_mask(b"XXXX" + data[4:], bits.size)
    with pytest.raises(MaskCodingError, match="shorter than"):
        decode_mask(data[:5], bits.size)
    with pytest.raises(MaskCodingError, match="version"):
        decode_mask(data[:4] + bytes([99]) + data[5:], bits.size)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    with pytest.raises(MaskCodingError, match="checksum"):
        decode_mask(bytes(flipped), bits.size)
    with pytest.raises(MaskCodingError, match="checksum"):
        decode_mask(data[:-3], bits.size)


def _with_body(data, body):
    """Re-seal a modified body with a valid checksum, to reach the structural checks."""
    magic, version, block_log2, n, _ = struct.unpack("<4sBBQI", data[:18])
    return struct.pack("<4sBBQI", magic, version, block_log2, n, zlib.crc32(body)) + body


def test_structural_damage_behind_a_valid_checksum():
    bits = bernoulli_mask(20_000, 0.1, seed=4)
    data = encode_mask(bits)
    body = data[18:]
    assert body[0] in (1, 2)  # a Golomb block
    with pytest.raises(MaskCodingError, match="unknown mode"):
        decode_mask(_with_body(data, bytes([7]) + body[1:]), bits.size)
    with pytest.raises(MaskCodingError, match="truncated"):
        decode_mask(_with_body(data, body[:-5]), bits.size)
    with pytest.raises(MaskCodingError, match="trailing"):
        decode_mask(_with_body(data, body + b"\0"), bits.size)
    m, count, unary_bits, extra = struct.unpack("<IIII", body[1:17])
    wrong = body[:1] + struct.pack("<IIII", m + 1, count, unary_bits, extra) + body[17:]
    with pytest.raises(MaskCodingError, match="block 0"):
        decode_mask(_with_body(data, wrong), bits.size)



def test_random_damage_behind_a_valid_checksum_never_escapes_as_another_error():
    # whatever a damaged body holds, decoding either succeeds or raises MaskCodingError
    rng = np.random.default_rng(12)
    cases = [(bernoulli_mask(3_000, p, seed=int(100 * p)), block_log2)
             for p, block_log2 in ((0.05, 23), (0.3, 23), (0.2, 9), (0.5, 23))]
    cases.append((clustered_mask(300, 9, 0.2, seed=1), 23))
    for bits, block_log2 in cases:
        data = encode_mask(bits, block_log2=block_log2)
        body = data[18:]
        for _ in range(150):
            damaged = bytearray(body)
            for pos in rng.integers(0, len(body), size=int(rng.integers(1, 4))):
                damaged[pos] = int(rng.integers(0, 256))
            try:
                out = decode_mask(_with_body(data, bytes(damaged)), bits.size)
            except MaskCodingError:
                continue
            assert out.shape == bits.shape and out.dtype == np.bool_
