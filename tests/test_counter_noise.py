"""The counter-based noise source: its words against a plain-integer reading of the definition, its numbers
against web/noise.js run by node, its distribution, and `ddpm onnx-sample --noise counter` built on it."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from ddpm.counter_noise import gaussian, image_keys, mix32, words
from ddpm.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
M = 0xFFFFFFFF


def _mix32(x: int) -> int:
    """lowbias32 with Python integers (Wellons, "Prospecting for Hash Functions")."""
    x ^= x >> 16
    x = (x * 0x7FEB352D) & M
    x ^= x >> 15
    x = (x * 0x846CA68B) & M
    return x ^ (x >> 16)


def _normal(seed: int, stream: int, image: int, j: int) -> float:
    """Element j of one image, from the definition in ddpm/counter_noise.py's docstring, in Python floats."""
    k = _mix32((seed + 0x9E3779B9) & M)
    k = _mix32(k ^ ((stream + 0x85EBCA6B) & M))
    k = _mix32(k ^ ((image + 0xC2B2AE35) & M))
    w1, w2 = (_mix32(_mix32((k + c) & M) ^ k) for c in (2 * j, 2 * j + 1))
    return math.sqrt(-2 * math.log((w1 + 0.5) / 2**32)) * math.cos(2 * math.pi * w2 / 2**32)


def test_words_and_numbers_follow_the_definition():
    xs = np.array([0, 1, 2, 0x7FFFFFFF, 0x80000000, M], dtype=np.uint64)
    assert mix32(xs).tolist() == [_mix32(int(x)) for x in xs]
    assert int(mix32(0)) == 0 and len(set(mix32(np.arange(100_000)).tolist())) == 100_000  # a bijection
    z = gaussian(2**32 - 1, 7, (3, 1, 4, 5), first_image=10)
    expected = [[_normal(2**32 - 1, 7, 10 + i, j) for j in range(20)] for i in range(3)]
    np.testing.assert_array_equal(z.reshape(3, 20), np.array(expected, dtype=np.float32))
    assert words(image_keys(0, 0, np.array([0]))[:, None], np.arange(2, dtype=np.uint32)).shape == (1, 2)


def test_any_slice_of_images_gives_the_same_numbers():
    whole = gaussian(5, 3, (9, 1, 28, 28))
    np.testing.assert_array_equal(gaussian(5, 3, (4, 1, 28, 28), first_image=5), whole[5:])
    assert not np.array_equal(gaussian(5, 4, (9, 1, 28, 28)), whole)  # another stream
    assert not np.array_equal(gaussian(6, 3, (9, 1, 28, 28)), whole)  # another seed


def test_the_numbers_are_standard_normal_and_uncorrelated():
    z = gaussian(0, 0, (256, 3, 32, 32)).reshape(256, -1)
    assert stats.kstest(z.ravel(), "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    per_image = z.reshape(256, -1)
    corr = np.corrcoef(per_image)[np.triu_indices(256, 1)]  # image against image
    assert np.abs(corr).max() < 0.1  # 3072 elements each: |r| of independent images is about 0.018
    neighbours = np.corrcoef(z[:, :-1].ravel(), z[:, 1:].ravel())[0, 1]
    streams = np.corrcoef(z.ravel(), gaussian(0, 1, (256, 3, 32, 32)).ravel())[0, 1]
    assert abs(neighbours) < 0.01 and abs(streams) < 0.01


def test_out_of_range_seed_or_images_are_refused():
    with pytest.raises(ConfigError, match="seed: -1 is out of range"):
        gaussian(-1, 0, (1, 1, 2, 2))
    with pytest.raises(ConfigError, match="outside the generator"):
        gaussian(0, 0, (2, 1, 2, 2), first_image=2**32 - 1)


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_web_noise_js_gives_the_same_float32_numbers(tmp_path):
    script = tmp_path / "draw.mjs"
    script.write_text(f"import {{ gaussian }} from {json.dumps((ROOT / 'web' / 'noise.js').as_uri())};\n"
                      "for (const [seed, stream, first] of [[0, 0, 0], [4294967295, 12, 3], [123456789, 1, 1000]]) {\n"
                      "  const z = gaussian(seed, stream, 3, 784, first);\n"
                      "  process.stdout.write(JSON.stringify(Array.from(z)) + '\\n');\n}\n")
    lines = subprocess.run(["node", str(script)], capture_output=True, text=True, check=True, timeout=60).stdout.split()
    for line, (seed, stream, first) in zip(lines, [(0, 0, 0), (2**32 - 1, 12, 3), (123456789, 1, 1000)]):
        js = np.array(json.loads(line), dtype=np.float32)
        py = gaussian(seed, stream, (3, 1, 28, 28), first_image=first).ravel()
        # float64 log and cos may differ in their last bit between libm and V8: one float32 step at most
        assert np.abs(js - py).max() <= 4e-7 * np.abs(py).max() and np.mean(js == py) > 0.999


def test_onnx_sample_with_counter_noise_is_the_same_whatever_the_batch_size(tiny_exports, tmp_path):
    from ddpm.onnx_sampler import sample_model_range

    model = tiny_exports["cond"]
    one = sample_model_range(model, 5, "ddpm", seed=11, batch_size=5, noise="counter")
    split = sample_model_range(model, 5, "ddpm", seed=11, batch_size=2, noise="counter")
    np.testing.assert_array_equal(one, split)
    pcg = sample_model_range(model, 5, "ddpm", seed=11, batch_size=2)
    assert np.abs(pcg - one).max() > 0.1  # the default source is another one
    out = tmp_path / "cli"
    done = subprocess.run([sys.executable, "-m", "ddpm.cli", "onnx-sample", "--model", str(model), "--noise", "counter",
                           "--sampler", "ddpm", "-n", "5", "--seed", "11", "--batch-size", "3", "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "seed 11, counter noise" in done.stdout
    np.testing.assert_array_equal(np.load(out / "samples.npz")["images"],
                                  np.round((np.clip(one, -1, 1) + 1) * 127.5).astype(np.uint8))
    bad = subprocess.run([sys.executable, "-m", "ddpm.cli", "onnx-sample", "--model", str(model), "--noise", "philox",
                          "--out", str(tmp_path / "bad")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "invalid choice: 'philox'" in bad.stderr and not (tmp_path / "bad").exists()


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_web_timestep_grids_are_the_python_samplers(tmp_path):
    """The page's DDIM grids (web/model.js) against ddpm.schedule_math: the uniform grid of a trained model,
    the trailing grid of a distilled student (whose k T / n can end in .5: Python rounds it to even)."""
    from ddpm.errors import ConfigError
    from ddpm.schedule_math import sampling_timesteps

    cases = [(1000, 50, 0), (1000, 7, 0), (1000, 32, 32), (1000, 16, 16), (1000, 4, 4), (1000, 1, 1), (20, 8, 8)]
    script = tmp_path / "grids.mjs"
    script.write_text(f"import {{ samplingTimesteps }} from {json.dumps((ROOT / 'web' / 'model.js').as_uri())};\n"
                      f"for (const [T, n, d] of {json.dumps(cases)}) "
                      "process.stdout.write(JSON.stringify(samplingTimesteps(T, n, d)) + '\\n');\n"
                      "try { samplingTimesteps(1000, 8, 4); } catch (e) { process.stdout.write(e.message + '\\n'); }\n")
    done = subprocess.run(["node", str(script)], capture_output=True, text=True, check=True, timeout=60)
    lines = done.stdout.splitlines()
    for line, (T, n, d) in zip(lines, cases):
        assert json.loads(line) == sampling_timesteps(T, n, d), (T, n, d)
    with pytest.raises(ConfigError):
        sampling_timesteps(1000, 8, 4)
    assert "distilled to 4 DDIM steps" in lines[-1] and "exactly 4 steps" in lines[-1]
