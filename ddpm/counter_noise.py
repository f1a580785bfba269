"""A counter-based Gaussian noise source, defined identically here (numpy) and in web/noise.js.

Every value is a pure function of (seed, stream, image, element): no generator state, so the page
in the browser and `ddpm onnx-sample --noise counter` draw the same numbers whatever their batch
sizes, and a batch's noise can be made for any slice of images on its own.

Streams: 0 is x_T, the starting noise; 1 + i is the noise of the i-th sampling step taken (the
`step_noise[i]` convention of ddpm.onnx_sampler). Within an image of D = C*H*W elements (C order),
element j takes 32-bit words 2j and 2j+1 of the image's key and turns them into one normal number
by Box-Muller in float64, then float32.

The 32-bit mixer is Chris Wellons' "lowbias32" integer hash; every step (xor, shift, multiply and
add modulo 2**32) is exact in numpy's uint32 and in JavaScript's Math.imul / >>> 0, so both sides
give the same words; the float64 log, sqrt and cos of numpy and of the browser may differ in the
last bit, which float32 rounding hides all but rarely (then by one float32 step).
"""

from __future__ import annotations

import math

import numpy as np

from ddpm.config import MAX_SEED
from ddpm.errors import ConfigError

U32 = np.uint32
# Odd constants (golden ratio, murmur3's finaliser) that separate the seed, stream and image keys.
SEED_SALT, STREAM_SALT, IMAGE_SALT = U32(0x9E3779B9), U32(0x85EBCA6B), U32(0xC2B2AE35)
X_T_STREAM = 0  # stream 1 + i: the noise of the i-th step taken


def mix32(x: np.ndarray) -> np.ndarray:
    """lowbias32: a bijection of uint32 with good avalanche; uint32 array -> uint32 array of the same shape."""
    x = np.asarray(x, dtype=U32)
    with np.errstate(over="ignore"):
        x = x ^ (x >> U32(16))
        x = x * U32(0x7FEB352D)
        x = x ^ (x >> U32(15))
        x = x * U32(0x846CA68B)
        return x ^ (x >> U32(16))


def image_keys(seed: int, stream: int, images: np.ndarray) -> np.ndarray:
    """The 32-bit key of each image index ([n] int) in one stream of one seed: uint32 [n]."""
    if not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed: {seed} is out of range; allowed: an integer in [0, {MAX_SEED}]")
    if not 0 <= stream <= 0xFFFFFFFF:
        raise ConfigError(f"noise stream {stream} is out of range; allowed: 0..{0xFFFFFFFF}")
    with np.errstate(over="ignore"):
        k = mix32(U32(seed) + SEED_SALT)
        k = mix32(k ^ (U32(stream) + STREAM_SALT))
        return mix32(k ^ (np.asarray(images, dtype=U32) + IMAGE_SALT))


def words(keys: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """Word `counter` of each key: mix32(mix32(key + counter) ^ key); keys [n, 1], counters [m] -> uint32 [n, m]."""
    with np.errstate(over="ignore"):
        return mix32(mix32(keys + counters) ^ keys)


def gaussian(seed: int, stream: int, shape: tuple[int, ...], first_image: int = 0) -> np.ndarray:
    """Standard normal float32 [n, *shape[1:]] for images first_image .. first_image + n - 1 of a stream."""
    n, per_image = shape[0], math.prod(shape[1:])
    if first_image < 0 or first_image + n > 2**32:
        raise ConfigError(f"images {first_image}..{first_image + n - 1} are outside the generator's 0..2**32-1")
    keys = image_keys(seed, stream, np.arange(first_image, first_image + n, dtype=np.uint64))[:, None]
    counters = np.arange(2 * per_image, dtype=np.uint64).astype(U32)
    w = words(keys, counters).astype(np.float64)  # [n, 2D]
    u1 = (w[:, 0::2] + 0.5) / 2.0**32  # (0, 1): the log never sees 0
    u2 = w[:, 1::2] / 2.0**32
    z = np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * math.pi * u2)  # Box-Muller, float64
    return z.astype(np.float32).reshape(shape)


class StepNoise:
    """step_noise for ddpm.onnx_sampler's loops: entry i is stream 1 + i for images sl of the whole sample."""

    def __init__(self, seed: int, image_shape: tuple[int, ...], sl: slice):
        self.seed, self.image_shape, self.sl = seed, tuple(image_shape), sl

    def __getitem__(self, i: int) -> np.ndarray:
        n = self.sl.stop - self.sl.start
        return gaussian(self.seed, 1 + i, (n, *self.image_shape), first_image=self.sl.start)
