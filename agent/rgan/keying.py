"""The user's secret key → the pseudo-random pattern that conditions G and R.

The code and the weights are public, so everything secret about a protection comes from the key
(Kerckhoffs). A 256-bit key is expanded with HKDF-SHA256 into a ChaCha20 key, whose keystream
(RFC 8439, nonce and counter zero) gives one bit per pixel and channel: a ±1 pattern the size of
the working image. The pattern is both an input plane of G and R and, scaled by the model's
`key_noise`, a part of the perturbation itself, so that recovering without the key means guessing
a fresh random sign at every pixel.

The pattern is a pure function of (key, height, width): it is the same on every machine, device
and torch version, and it is covered by known-answer tests. Version 1 is fixed; a change to the
expansion needs a new `PATTERN_VERSION`, recorded with the model.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ..keys import KEY_BYTES, check_key

PATTERN_VERSION = 1
PATTERN_CHANNELS = 3
if TYPE_CHECKING:
    import torch

_HKDF_INFO = b"rgan-agent key pattern v1"
_NONCE = bytes(16)  # cryptography's ChaCha20 nonce: 4-byte counter + 12-byte nonce, all zero


def keystream(key: bytes, length: int, info: bytes = _HKDF_INFO) -> bytes:
    """`length` bytes of ChaCha20 keystream under a key derived from the user's key for one
    purpose (`info`): each use of the key gets its own independent stream."""
    stream_key = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(check_key(key))
    encryptor = Cipher(algorithms.ChaCha20(stream_key, _NONCE), mode=None).encryptor()
    return encryptor.update(bytes(length))


def key_pattern(key: bytes, height: int, width: int) -> torch.Tensor:
    """(3, height, width) int8 of ±1, row-major per channel, bit i of the stream → value i.
    int8 because a 24-megapixel photo's pattern would take 290 MB as float32; the model converts
    what it uses to its own dtype."""
    # numpy and torch are imported here so that the key store can use this module at start-up
    import numpy as np
    import torch

    if height < 1 or width < 1:
        raise ValueError(f"pattern size must be positive, got {height}x{width}")
    count = PATTERN_CHANNELS * height * width
    bits = np.unpackbits(np.frombuffer(keystream(key, (count + 7) // 8), dtype=np.uint8))[:count]
    signs = bits.astype(np.int8) * 2 - 1
    return torch.from_numpy(signs.reshape(PATTERN_CHANNELS, height, width))


def random_keys(count: int, generator: torch.Generator | None = None) -> list[bytes]:
    """Training keys: drawn from a seeded generator so that runs are reproducible (real user keys
    come from `os.urandom` in the key store, never from here)."""
    import torch

    draws = torch.randint(0, 256, (count, KEY_BYTES), dtype=torch.uint8, generator=generator)
    return [bytes(row.tolist()) for row in draws]


def batch_patterns(keys: list[bytes], height: int, width: int) -> torch.Tensor:
    import torch

    return torch.stack([key_pattern(key, height, width) for key in keys])
