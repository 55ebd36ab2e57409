"""The soup's numerics: stored dtypes to fp32 exactly, fp32 back to the output dtype rounded once.

bf16 and f16 results are bit for bit what torch's conversion gives (round to nearest even,
overflow to inf, torch's NaN bits). Numpy only: torch is imported for float8 inputs alone.
"""

from __future__ import annotations

import numpy as np

# Float dtypes of safetensors that can be averaged, by torch name.
FLOAT_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


class Workspace:
    """Reused fp32 scratch of one worker: an accumulator, a conversion buffer and rounding bits."""

    def __init__(self, elems: int = 0) -> None:
        self._acc = np.empty(0, np.float32)
        self._tmp = np.empty(0, np.float32)
        self._bits = np.empty(0, np.uint32)
        self.reserve(elems)

    def reserve(self, elems: int) -> None:
        if self._acc.size < elems:
            self._acc = np.empty(elems, np.float32)
            self._tmp = np.empty(elems, np.float32)
            self._bits = np.empty(elems, np.uint32)

    def acc(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._acc[:n]

    def tmp(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._tmp[:n]

    def bits(self, n: int) -> np.ndarray:
        self.reserve(n)
        return self._bits[:n]


def to_fp32(
    raw: bytearray | memoryview, dtype: str, n: int, out: np.ndarray, split: bool = False
) -> np.ndarray:
    """The first n stored elements of `raw` as fp32, exactly (bf16/f16 widen; f64 rounds once).

    bf16 is the top half of an fp32, so widening is bit moves. With `split` (n even) the result is
    de-interleaved, even elements then odd: read as uint32 pairs, a pair's high half masked is the
    odd element and its low half shifted up the even one, two cheap ops and no widening cast.
    An F32 chunk (not split) is a view of `raw`; otherwise the result is `out`. Only float8 needs
    torch (imported then).
    """
    h = n // 2
    if dtype == "BF16" and split:
        pairs = np.frombuffer(raw, np.uint32, count=h)
        bits = out.view(np.uint32)
        np.left_shift(pairs, 16, out=bits[:h])
        np.bitwise_and(pairs, np.uint32(0xFFFF0000), out=bits[h:n])
        return out[:n]
    if dtype == "BF16":
        bits = out.view(np.uint32)[:n]
        np.copyto(bits, np.frombuffer(raw, np.uint16, count=n))
        np.left_shift(bits, 16, out=bits)
        return out[:n]
    if dtype in ("F32", "F16", "F64"):
        x = np.frombuffer(raw, {"F32": np.float32, "F16": np.float16, "F64": np.float64}[dtype], count=n)
        if not split:
            if dtype == "F32":
                return x
            np.copyto(out[:n], x, casting="same_kind")
            return out[:n]
    else:
        import torch  # float8: numpy has no such dtype

        src = torch.frombuffer(raw, dtype=getattr(torch, FLOAT_DTYPES[dtype]), count=n)
        x = torch.empty(n, dtype=torch.float32).copy_(src).numpy()
        if not split:
            np.copyto(out[:n], x)
            return out[:n]
    np.copyto(out[:h], x[0::2], casting="same_kind")
    np.copyto(out[h:n], x[1::2], casting="same_kind")
    return out[:n]


def _rounded_bits(a: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """fp32 bits + 0x7FFF + (bit 16): their high half is the bf16 rounded to nearest, ties to even."""
    u = a.view(np.uint32)
    np.right_shift(u, 16, out=bits)
    np.bitwise_and(bits, 1, out=bits)
    np.add(bits, 0x7FFF, out=bits)
    np.add(bits, u, out=bits)
    return bits


def round_to_bf16(a: np.ndarray, out: np.ndarray, bits: np.ndarray) -> np.ndarray:
    """fp32 -> bf16 bits (uint16), round to nearest even, the same bits as torch's `.to(torch.bfloat16)`.

    Adding 0x7FFF plus the kept part's lowest bit and dropping the low half rounds to nearest,
    ties to even; overflow carries into the exponent (max finite -> inf, as torch does); inf stays
    inf. NaN is 0xFFFF, what torch's CPU conversion writes for every NaN (tests/soup/test_soup.py).
    """
    r = _rounded_bits(a, bits[: a.size])
    np.right_shift(r, 16, out=r)
    np.copyto(out, r, casting="unsafe")
    nan = np.isnan(a)
    if nan.any():
        out[nan] = 0xFFFF
    return out


def from_fp32(a: np.ndarray, code: str, out: np.ndarray, bits: np.ndarray, split: bool = False) -> np.ndarray:
    """An fp32 chunk in the output dtype (bytes as safetensors stores them, in stored order), rounded once.

    With `split`, `a` is de-interleaved (see to_fp32) and is interleaved back here. `out` holds
    n elements of a 2-byte dtype (bytes), `bits` is uint32 scratch of n elements.
    """
    n = a.size
    if not split:
        if code == "F32":
            return a
        if code == "BF16":
            return round_to_bf16(a, out[: 2 * n].view(np.uint16), bits)
        return _to_f16(a, out[: 2 * n].view(np.float16))
    h = n // 2
    if code == "BF16":
        r = _rounded_bits(a, bits[:n])
        pairs = out[: 2 * n].view(np.uint32)
        np.right_shift(r[:h], 16, out=pairs)  # even element: the low half of a pair
        np.bitwise_and(r[h:], np.uint32(0xFFFF0000), out=r[h:])
        np.bitwise_or(pairs, r[h:], out=pairs)
        nan = np.isnan(a)
        if nan.any():
            halves = pairs.view(np.uint16)
            halves[0::2][nan[:h]] = 0xFFFF
            halves[1::2][nan[h:]] = 0xFFFF
        return pairs
    if code == "F16":
        return _to_f16(
            np.concatenate([a[:h, None], a[h:, None]], axis=1).ravel(), out[: 2 * n].view(np.float16)
        )
    dst = bits[:n].view(np.float32)  # F32 (router bias): `out` is sized for the narrower dtype
    dst[0::2] = a[:h]
    dst[1::2] = a[h:]
    return dst


def _to_f16(a: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """fp32 -> f16 as torch rounds it: numpy's cast (nearest even, overflow to inf), NaN made quiet
    with the payload's top bits kept, which is what torch writes and numpy does not."""
    with np.errstate(over="ignore", invalid="ignore"):
        np.copyto(dst, a, casting="same_kind")
    nan = np.isnan(a)
    if nan.any():
        u = a.view(np.uint32)[nan]
        dst.view(np.uint16)[nan] = ((u >> 16) & 0x8000) | 0x7E00 | ((u >> 13) & 0x3FF)
    return dst
