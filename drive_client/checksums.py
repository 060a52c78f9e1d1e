"""CRC32C arithmetic: the CRC32C of bytes put one after the other, from the CRC32C of each part.

A transfer that arrives in parts (the ranges of a parallel get, the streams
of a get resumed after a cut) sums each part once as it arrives; `joined_crc32c`
gives the CRC32C of the whole from those, with no second pass over the bytes
(zlib's crc32_combine, for the Castagnoli polynomial).
"""

from __future__ import annotations

_POLY = 0x82F63B78  # CRC-32C (Castagnoli), bit-reflected as the CRC register holds it


def _multiply(a: int, b: int) -> int:
    """a × b modulo the CRC-32C polynomial, both bit-reflected (a must not be 0)."""
    m = 1 << 31
    product = 0
    while True:
        if a & m:
            product ^= b
            if not a & (m - 1):
                return product
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1


# x^(2^k) modulo the polynomial, for k = 0..31 (x^1 is 1 << 30 in the reflected form).
_X_2K = [1 << 30]
for _ in range(31):
    _X_2K.append(_multiply(_X_2K[-1], _X_2K[-1]))


def _x_8n(n: int) -> int:
    """x^(8n) modulo the polynomial: what appending n bytes does to a CRC register."""
    power, k = 1 << 31, 3
    while n:
        if n & 1:
            power = _multiply(_X_2K[k & 31], power)
        n >>= 1
        k += 1
    return power


def joined_crc32c(first: int, second: int, second_length: int) -> int:
    """The CRC32C of two runs of bytes one after the other, from the CRC32C of each and the second's length."""
    return second if not first else second ^ _multiply(_x_8n(second_length), first)
