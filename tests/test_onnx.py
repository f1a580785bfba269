"""ONNX export and the torch-free onnxruntime sampler, checked against PyTorch on tiny models.

Measured on the 2-core CPU machine with these tiny random-weight models (outputs of order 1):
network, onnxruntime vs PyTorch float32: 5e-6 to 9e-6; whole loops vs ddpm.samplers from the same
x_T and step_noise: DDPM (50 steps) 1e-6 to 4e-6, DDIM (10 steps) 1e-6 to 7e-6, and 4e-5 with
guidance scale 3; the float16 model vs PyTorch float32: 7e-3 to 1.1e-2.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ddpm.config import ExportConfig, SamplerConfig, config_from_dict, load_config
from ddpm.errors import ExportRejected, OnnxModelError
from ddpm.export import check_export, export_onnx, fp16_path
from ddpm.layers import GroupNorm
from ddpm.onnx_model import METADATA_KEY, NumpySchedule, OnnxDenoiser
from ddpm.onnx_sampler import ddim_timesteps as ddim_steps
from ddpm.onnx_sampler import sample
from ddpm.onnx_sampler import ddim_sample_loop as ort_ddim
from ddpm.onnx_sampler import p_sample_loop as ort_ddpm
from ddpm.quantize import calibration_feeds, int8_path
from ddpm.samplers import ddim_sample_loop, p_sample_loop
from ddpm.schedule import Schedule
from testkit import tiny_checkpoint as _write_checkpoint
from testkit import tiny_config as _tiny
from testkit import with_sampler_entry

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROOT = Path(__file__).resolve().parents[1]
PARITY_ATOL = 1e-4  # the network, float32 (measured: about 2e-6)
LOOP_ATOL = 1e-4  # whole sampling loops from the same random numbers (measured: about 1e-6)
INT8_CHECK = {"int8_calibration_images": 8, "check_samples": 16}
DDIM10 = SamplerConfig(steps=10)  # int8 calibration and the int8 check
# The tiny conditional model (8 channels, random weights, v-prediction) quantizes worse than a trained
# U-Net: its int8 DDIM samples differ from float32 by about 0.03 on average (the unconditional one's
# by about 0.01; the trained default U-Net's by 0.006-0.007), so its gate is wider than the default 0.02.
INT8_COND_MEAN_ATOL = 0.06


@pytest.fixture(scope="module", autouse=True)
def export_each_network_once():
    """torch.onnx.export (ddpm.export._to_onnx) runs once per network of this module: a later export of the same
    weights, settings and opset gets a copy of the graph it made then. Everything an export does with the graph
    (parity, twins, checks, files) runs every time; the exporter's graph is checked by the tests of `models`."""
    import hashlib

    import ddpm.export as export

    real, made = export._to_onnx, {}

    def once(model, cfg, ecfg):
        weights = hashlib.sha256()
        for name, tensor in model.state_dict().items():
            weights.update(name.encode() + tensor.detach().cpu().numpy().tobytes())
        key = (weights.hexdigest(), json.dumps(cfg.to_dict(), sort_keys=True), ecfg.opset)
        if key not in made:
            made[key] = real(model, cfg, ecfg).SerializeToString()
        return onnx.ModelProto.FromString(made[key])  # a fresh copy: the export adds its metadata to it

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(export, "_to_onnx", once)
        yield


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'uncond': (checkpoint, onnx with an int8 twin), 'cond': (checkpoint, onnx with fp16 and int8 twins)}."""
    d = tmp_path_factory.mktemp("onnx")
    out = {}
    for name, cond, fp16 in (("uncond", False, False), ("cond", True, True)):
        ckpt = _write_checkpoint(d / f"{name}.pt", cond, seed=int(cond))
        int8 = {**INT8_CHECK, "int8_mean_atol": INT8_COND_MEAN_ATOL if cond else ExportConfig().int8_mean_atol}
        path = export_onnx(ckpt, d / name / "model.onnx", ExportConfig(fp16=fp16, int8=True, **int8), DDIM10)
        out[name] = (ckpt, path)
    return out


def _torch_model(ckpt):
    from ddpm.checkpoint import load_model
    model, cfg, _ = load_model(ckpt, "cpu", use_ema=True)
    return model, cfg


# ---- export ----

def test_export_is_checked_and_carries_its_metadata(models):
    for name, (ckpt, path) in models.items():
        onnx.checker.check_model(str(path), full_check=True)
        proto = onnx.load(str(path))
        meta = json.loads({p.key: p.value for p in proto.metadata_props}[METADATA_KEY])
        cfg = config_from_dict(_tiny(name == "cond"))
        assert meta["diffusion"] == cfg.to_dict()["diffusion"]
        assert meta["image_shape"] == [1, 28, 28] and meta["num_classes"] == 10
        assert meta["class_conditional"] == (name == "cond") and meta["step"] == 1234 + int(name == "cond")
        assert meta["weights"] == "ema" and meta["parity_max_abs_diff"] < PARITY_ATOL
        inputs = {i.name: i.type.tensor_type for i in proto.graph.input}
        assert list(inputs) == (["x", "t", "labels"] if name == "cond" else ["x", "t"])
        assert inputs["x"].elem_type == TensorProto.FLOAT and inputs["t"].elem_type == TensorProto.INT64
        assert inputs["x"].shape.dim[0].dim_param and inputs["t"].shape.dim[0].dim_param  # dynamic batch
        assert [o.name for o in proto.graph.output] == ["output"]
        # every GroupNorm is exported as aten's group_norm, not as the per-channel form it takes when compiled
        norms = sum(isinstance(m, GroupNorm) for m in _torch_model(ckpt)[0].modules())
        op_types = [n.op_type for n in proto.graph.node]
        assert op_types.count("InstanceNormalization") == norms > 0 and "ReduceMean" not in op_types
        expected_files = [path.name, int8_path(path).name] + ([fp16_path(path).name] if name == "cond" else [])
        assert sorted(os.listdir(path.parent)) == sorted(expected_files)  # no temporary files left


def test_onnxruntime_matches_pytorch_at_batches_1_3_64(models):
    rng = np.random.default_rng(1)
    for name, (ckpt, path) in models.items():
        model, _ = _torch_model(ckpt)
        den = OnnxDenoiser(path)
        T = den.schedule.num_timesteps
        worst = 0.0
        mixed = np.concatenate([[0, T - 1], rng.integers(0, T, 62)])
        for b, t in ((1, np.array([0])), (1, np.array([T - 1])), (3, np.array([0, T // 2, T - 1])), (64, mixed)):
            x = rng.standard_normal((b, 1, 28, 28), dtype=np.float32)
            y = rng.integers(0, 11, b) if den.class_conditional else None
            with torch.no_grad():
                ref = model(torch.from_numpy(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y))
            worst = max(worst, float(np.abs(den(x, t, y) - ref.numpy()).max()))
        assert worst < PARITY_ATOL, (name, worst)


def test_fp16_twin_runs_with_float32_io(models):
    ckpt, path = models["cond"]
    half = OnnxDenoiser(fp16_path(path))
    assert half.metadata["precision"] == "float16"
    model, _ = _torch_model(ckpt)
    rng = np.random.default_rng(2)
    x = rng.standard_normal((8, 1, 28, 28), dtype=np.float32)
    t, y = np.array([0, 10, 20, 30, 40, 49, 49, 25]), np.arange(8) % 11
    with torch.no_grad():
        ref = model(torch.from_numpy(x), torch.from_numpy(t), torch.from_numpy(y)).numpy()
    out = half(x, t, y)
    assert out.dtype == np.float32
    assert np.abs(out - ref).max() < ExportConfig().fp16_atol


def test_int8_twin_quantizes_all_but_the_image_convolutions_and_samples_like_pytorch(models):
    ckpt, path = models["uncond"]
    q = OnnxDenoiser(int8_path(path))
    meta = q.metadata
    assert meta["precision"] == "int8" and meta["step"] == OnnxDenoiser(path).metadata["step"]
    assert meta["int8_calibration"] == {"images": 8, "ddim_steps": 10, "calls": 10}
    assert meta["int8_check"]["n"] == 16 and meta["int8_check"]["steps"] == 10
    graph = onnx.load(str(int8_path(path))).graph
    int8_weights = {i.name for i in graph.initializer if i.data_type == TensorProto.INT8}
    weight_dq = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in int8_weights}
    convs = [n for n in graph.node if n.op_type == "Conv"]
    quantized = [n.input[1] in weight_dq for n in convs]
    model, cfg = _torch_model(ckpt)
    n_convs = sum(isinstance(m, torch.nn.Conv2d) for m in model.modules())
    assert len(convs) == n_convs and quantized == [False] + [True] * (n_convs - 2) + [False]
    # Against PyTorch float32 (not the float32 export the gate compared with): DDIM from the same noise.
    x_T = np.random.default_rng(6).standard_normal((16, 1, 28, 28), dtype=np.float32)
    got = np.clip(ort_ddim(q, q.schedule, x_T, steps=10, prediction=q.prediction), -1, 1)
    ref = ddim_sample_loop(model, Schedule.from_config(cfg.diffusion), torch.from_numpy(x_T), steps=10).clamp(-1, 1)
    diff = np.abs(got - ref.numpy())
    assert diff.mean() <= ExportConfig().int8_mean_atol
    assert diff.mean() > 10 * LOOP_ATOL  # it is a quantized network, not the float32 one


def test_class_conditional_int8_twin_samples_with_guidance_like_pytorch(models):
    ckpt, path = models["cond"]
    q = OnnxDenoiser(int8_path(path))
    assert q.metadata["precision"] == "int8" and q.class_conditional
    model, cfg = _torch_model(ckpt)
    x_T = np.random.default_rng(7).standard_normal((12, 1, 28, 28), dtype=np.float32)
    labels = np.arange(12) % 10
    kw = dict(steps=10, guidance_scale=2.0, prediction="v")
    got = np.clip(ort_ddim(q, q.schedule, x_T, labels=labels, **kw), -1, 1)
    ref = ddim_sample_loop(model, Schedule.from_config(cfg.diffusion), torch.from_numpy(x_T),
                           labels=torch.from_numpy(labels), **kw).clamp(-1, 1)
    # Guidance at scale 2 extrapolates the two predictions and roughly doubles the drift (measured 0.062);
    # a model quantized wrongly (e.g. every operator: 0.21 on the trained U-Net) is far outside.
    assert np.abs(got - ref.numpy()).mean() <= 2 * INT8_COND_MEAN_ATOL


def test_calibration_covers_the_null_class_and_every_ddim_step(models):
    _, path = models["cond"]
    den = OnnxDenoiser(path)
    feeds = calibration_feeds(den, images=12, steps=5)
    assert len(feeds) == 5 and sorted(set(int(f["t"][0]) for f in feeds)) == sorted(ddim_steps(50, 5))
    assert set(feeds[0]["labels"].tolist()) == set(range(11))  # classes 0-9 and the null class 10


def test_an_int8_twin_that_drifts_is_not_written_and_the_float32_export_stands(models, tmp_path, caplog):
    ckpt, _ = models["uncond"]
    out = tmp_path / "model.onnx"
    export_onnx(ckpt, out, ExportConfig(int8=True, **{**INT8_CHECK, "int8_mean_atol": 1e-7}), DDIM10)
    assert os.listdir(tmp_path) == ["model.onnx"]  # no int8 file, no temporary folder
    record = OnnxDenoiser(out).metadata["int8"]
    assert record["written"] is False and record["scheme"] == "portable"
    assert "export.int8_mean_atol = 1e-07; no int8 model was written" in record["reason"]
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "int8 twin not written" in warnings[0] and "\n" not in warnings[0]
    int8_path(out).write_bytes(b"a stale int8 export")  # left by an earlier export
    export_onnx(ckpt, out, ExportConfig())  # float32 only: the stale twin is not this checkpoint's
    assert os.listdir(tmp_path) == ["model.onnx"]


def _int8_weights(path: Path) -> np.ndarray:
    graph = onnx.load(str(path)).graph
    return np.concatenate([onnx.numpy_helper.to_array(i).ravel() for i in graph.initializer
                           if i.data_type == TensorProto.INT8])


def test_the_portable_scheme_keeps_weights_on_7_bits_and_says_why(models):
    """7-bit weights are what keeps onnxruntime's u8 x s8 pair sums inside int16 without VNNI:
    255 * 64 * 2 = 32,640 <= 32,767 (255 * 127 * 2 = 64,770 is not)."""
    meta = OnnxDenoiser(int8_path(models["uncond"][1])).metadata
    assert meta["int8_scheme"]["name"] == "portable" and meta["int8_scheme"]["reduce_range"] is True
    assert "every x86 CPU" in meta["int8_scheme"]["why"]
    assert OnnxDenoiser(models["uncond"][1]).metadata["int8"] == {"written": True, "scheme": "portable",
                                                                  "file": "model.int8.onnx"}
    w = _int8_weights(int8_path(models["uncond"][1]))
    assert w.size > 1000 and int(np.abs(w.astype(np.int32)).max()) <= 64
    assert 255 * 64 * 2 <= np.iinfo(np.int16).max < 255 * 127 * 2


# Gate wide open: the host's own kernels may saturate 8-bit weights; the test on emulated AVX2 gates them.
VNNI_UNGATED = ExportConfig(int8=True, int8_scheme="vnni", **{**INT8_CHECK, "int8_mean_atol": 1.0})


@pytest.fixture(scope="module")
def vnni_export(models, tmp_path_factory):
    """The unconditional model's export with an 8-bit (vnni scheme) int8 twin, made as if on a VNNI CPU."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DDPM_CPU_INT8_DOT_PRODUCT", "1")
        return export_onnx(models["uncond"][0], tmp_path_factory.mktemp("vnni") / "model.onnx", VNNI_UNGATED, DDIM10)


def test_the_vnni_scheme_is_refused_on_a_cpu_without_vnni_and_used_with_it(models, vnni_export, tmp_path,
                                                                             monkeypatch, caplog):
    ckpt, _ = models["uncond"]
    cfg = VNNI_UNGATED
    monkeypatch.setenv("DDPM_CPU_INT8_DOT_PRODUCT", "0")  # an AVX2-only CPU, whatever this one is
    export_onnx(ckpt, tmp_path / "a" / "model.onnx", cfg, DDIM10)
    assert os.listdir(tmp_path / "a") == ["model.onnx"]
    reason = OnnxDenoiser(tmp_path / "a" / "model.onnx").metadata["int8"]["reason"]
    assert reason.startswith("export.int8_scheme=vnni needs a CPU with AVX-512 VNNI or AVX-VNNI and this one has "
                             "neither") and "use export.int8_scheme=portable" in reason
    path = vnni_export
    meta = OnnxDenoiser(int8_path(path)).metadata
    assert meta["int8_scheme"]["name"] == "vnni" and meta["int8_scheme"]["reduce_range"] is False
    assert int(np.abs(_int8_weights(int8_path(path)).astype(np.int32)).max()) > 64  # the full 8 bits
    caplog.clear()
    monkeypatch.setenv("DDPM_CPU_INT8_DOT_PRODUCT", "0")
    OnnxDenoiser(int8_path(path))  # loading it where it would saturate warns
    assert any("lacks" in r.getMessage() and "int8_scheme=portable" in r.getMessage() for r in caplog.records)
    monkeypatch.setenv("DDPM_CPU_INT8_DOT_PRODUCT", "yes")
    with pytest.raises(ValueError, match="DDPM_CPU_INT8_DOT_PRODUCT='yes': set it to 0 or 1"):
        export_onnx(ckpt, tmp_path / "c" / "model.onnx", cfg, DDIM10)


# Runs under qemu-user emulating an AMD EPYC (Zen 1: AVX2, no AVX-512, no VNNI), so that onnxruntime
# picks its AVX2 u8 x s8 kernels whatever CPU runs the suite. qemu passes the host's /proc/cpuinfo
# through, so the detection is overridden too. The float32 model's images, which do not depend on the int8
# kernels, are computed natively (emulation is slow).
_ON_AVX2 = """
import json, sys
import numpy as np
from ddpm.errors import ExportRejected
from ddpm.onnx_model import OnnxDenoiser
from ddpm.quantize import int8_check
fp32, reference, *twins = sys.argv[1:]
out = {}
for twin in twins:
    try:
        out[twin] = int8_check(OnnxDenoiser(fp32), OnnxDenoiser(twin), n=16, steps=10, mean_atol=0.02,
                               reference=np.load(reference))["mean_abs_diff"]
    except ExportRejected as exc:
        out[twin] = str(exc)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_int8_on_an_avx2_cpu_without_vnni_portable_passes_and_8_bit_saturates(models, vnni_export, tmp_path):
    from ddpm.quantize import int8_check_images

    qemu = shutil.which("qemu-x86_64")
    if qemu is None:
        pytest.skip("needs qemu-user (apt-get install qemu-user; .ci/run installs it)")
    path, full = models["uncond"][1], vnni_export
    native = OnnxDenoiser(int8_path(path)).metadata["int8_check"]["mean_abs_diff"]
    np.save(tmp_path / "reference.npy", int8_check_images(OnnxDenoiser(path), n=16, steps=10))
    env = {**os.environ, "DDPM_CPU_INT8_DOT_PRODUCT": "0", "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([qemu, "-cpu", "EPYC", sys.executable, "-c", _ON_AVX2, str(path),
                          str(tmp_path / "reference.npy"), str(int8_path(path)), str(int8_path(full))],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    portable, eight_bit = got[str(int8_path(path))], got[str(int8_path(full))]
    assert isinstance(portable, float) and portable <= 0.02 and portable == pytest.approx(native, rel=0.1)
    # The 8-bit model drifts past the gate on AVX2 (on a VNNI CPU it passes, about 0.011): this is what
    # shows that the emulated CPU runs the saturating kernels.
    assert isinstance(eight_bit, str) and "more than export.int8_mean_atol" in eight_bit, eight_bit


def test_a_wrong_export_is_rejected_and_nothing_is_left(models, tmp_path, monkeypatch):
    import ddpm.export as export
    ckpt, path = models["uncond"]
    broken = onnx.load(str(path))
    init = max(broken.graph.initializer, key=lambda t: len(t.raw_data))
    w = onnx.numpy_helper.to_array(init).copy()
    w.flat[0] += 0.5  # one wrong weight
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    monkeypatch.setattr(export, "_to_onnx", lambda *a: broken)  # skip the slow exporter: hand it this graph
    out = tmp_path / "model.onnx"
    out.write_bytes(b"a stale export")
    with pytest.raises(ExportRejected, match=r"differ by [0-9.e-]+ .*more than the allowed 0.0001"):
        export_onnx(ckpt, out, ExportConfig())
    assert os.listdir(tmp_path) == []  # no model, no stale model, no temporary folder


# ---- the numpy samplers against ddpm.samplers ----

def test_numpy_schedule_is_the_torch_schedule():
    from ddpm.config import DiffusionConfig
    for d in (DiffusionConfig(timesteps=1000), DiffusionConfig(timesteps=50, schedule="cosine")):
        mine, ref = NumpySchedule.from_diffusion(d.__dict__), Schedule.from_config(d)
        for field in ref.__dataclass_fields__:
            assert np.array_equal(getattr(mine, field), getattr(ref, field).numpy()), field


@pytest.mark.parametrize("variance", ["beta_tilde", "beta"])
def test_ddpm_loop_matches_torch(models, variance):
    ckpt, path = models["uncond"]
    model, cfg = _torch_model(ckpt)
    den = OnnxDenoiser(path)
    rng = np.random.default_rng(3)
    x_T = rng.standard_normal((4, 1, 28, 28), dtype=np.float32)
    noise = rng.standard_normal((49, 4, 1, 28, 28), dtype=np.float32)
    got = ort_ddpm(den, den.schedule, x_T, step_noise=noise, variance=variance, prediction=den.prediction)
    ref = p_sample_loop(model, Schedule.from_config(cfg.diffusion), torch.from_numpy(x_T),
                        step_noise=torch.from_numpy(noise), variance=variance, prediction=cfg.diffusion.prediction)
    assert np.abs(got - ref.numpy()).max() < LOOP_ATOL


def test_ddim_loop_with_guidance_matches_torch(models):
    ckpt, path = models["cond"]
    model, cfg = _torch_model(ckpt)
    den = OnnxDenoiser(path)
    rng = np.random.default_rng(4)
    x_T = rng.standard_normal((5, 1, 28, 28), dtype=np.float32)
    noise = rng.standard_normal((9, 5, 1, 28, 28), dtype=np.float32)
    labels = np.array([0, 3, 9, 3, 1])
    kw = dict(steps=10, eta=0.5, guidance_scale=2.0, prediction="v")
    got = ort_ddim(den, den.schedule, x_T, labels=labels, step_noise=noise, **kw)
    ref = ddim_sample_loop(model, Schedule.from_config(cfg.diffusion), torch.from_numpy(x_T),
                           labels=torch.from_numpy(labels), step_noise=torch.from_numpy(noise), **kw)
    assert np.abs(got - ref.numpy()).max() < LOOP_ATOL
    plain = ort_ddim(den, den.schedule, x_T, labels=labels, step_noise=noise, **{**kw, "guidance_scale": 1.0})
    assert np.abs(plain - got).max() > 1e-3  # guidance changed something


def test_sample_slices_x_T_and_step_noise_by_batch(models):
    ckpt, path = models["uncond"]
    model, cfg = _torch_model(ckpt)
    rng = np.random.default_rng(5)
    x_T = rng.standard_normal((5, 1, 28, 28), dtype=np.float32)
    noise = rng.standard_normal((9, 5, 1, 28, 28), dtype=np.float32)
    got = sample(path, 5, "ddim", steps=10, eta=1.0, batch_size=2, x_T=x_T, step_noise=noise)
    ref = ddim_sample_loop(model, Schedule.from_config(cfg.diffusion), torch.from_numpy(x_T), steps=10, eta=1.0,
                           step_noise=torch.from_numpy(noise))
    ref_u8 = ((ref.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    assert got.dtype == np.uint8 and got.shape == (5, 1, 28, 28)
    assert np.abs(got.astype(int) - ref_u8).max() <= 1  # a rounding boundary may flip one level
    again = sample(path, 5, "ddim", steps=10, eta=1.0, seed=7, batch_size=2)
    assert np.array_equal(again, sample(path, 5, "ddim", steps=10, eta=1.0, seed=7, batch_size=2))


def test_check_export_accepts_a_faithful_export_and_rejects_another(models, tmp_path):
    ckpt, path = models["cond"]
    result = check_export(path, ckpt, n=6, steps=5, score_fn=lambda u8: float(u8.mean()), fid_margin=0.0,
                          fid_abs_floor=1e-9)
    assert result["accepted"] and result["max_abs_diff"] < LOOP_ATOL and result["score_diff"] <= 1e-9
    with pytest.raises(ExportRejected, match="was not exported from"):
        check_export(models["uncond"][1], ckpt, n=2, steps=2)
    # Same metadata, one wrong weight: the images differ.
    broken = onnx.load(str(path))
    init = max(broken.graph.initializer, key=lambda t: len(t.raw_data))
    w = onnx.numpy_helper.to_array(init).copy()
    w *= 1.5
    init.CopyFrom(onnx.numpy_helper.from_array(w, init.name))
    onnx.save(broken, str(tmp_path / "broken.onnx"))
    with pytest.raises(ExportRejected, match=r"max \|x_onnx - x_torch\|"):
        check_export(tmp_path / "broken.onnx", ckpt, n=4, steps=5, atol=1e-3)


def test_ddpm_export_gates_the_files_before_they_replace_anything(models, tmp_path, monkeypatch, capsys):
    """`ddpm export` applies the pipeline's gate (gate_export) with the configured bounds and the sampler block:
    accepted, it says so; rejected (export.check_atol below any float32 difference), exit 2 with one line and
    no model at --out. The FID is replaced by the images' mean, since the tiny model has no dataset here."""
    import ddpm.evaluate
    from ddpm import cli

    monkeypatch.setattr(ddpm.evaluate, "fid_score", lambda cfg, net=None: lambda u8: float(u8.mean()))
    ckpt, _ = models["uncond"]
    out = tmp_path / "ok" / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(out), "--params", "params.yaml",
                     "--profile", "cpu", "sampler.steps=3", "export.check_samples=4", "runtime.device=cpu"]) == 0
    said = capsys.readouterr().out
    assert f"exported {out}" in said and "model accepted: 4 DDIM-3 samples" in said and out.is_file()
    rejected = tmp_path / "no" / "model.onnx"
    assert cli.main(["export", "--checkpoint", str(ckpt), "--out", str(rejected), "--params", "params.yaml",
                     "--profile", "cpu", "sampler.steps=3", "export.check_samples=4", "export.check_atol=1e-12"]) == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith(f"ddpm export: error: {rejected}: max |x_onnx - x_torch| = ") and "> 1e-12" in line
    assert sorted(p.name for p in rejected.parent.iterdir()) == []  # nothing written, no temporary folder left


def test_ddpm_export_scores_against_the_dataset_its_checkpoint_was_trained_on(models, tmp_path, monkeypatch, caplog):
    """A Fashion-MNIST checkpoint exported under settings that name MNIST (params.yaml's default): the gate's FID
    uses Fashion-MNIST's feature net and images, with a warning, as `ddpm evaluate` does."""
    import ddpm.evaluate
    from ddpm import cli
    from ddpm.checkpoint import load_checkpoint, save_checkpoint

    scored = []
    monkeypatch.setattr(ddpm.evaluate, "fid_score",
                        lambda cfg, net=None: scored.append(cfg.data.dataset) or (lambda u8: float(u8.mean())))
    ckpt = load_checkpoint(models["uncond"][0])
    ckpt["config"]["data"]["dataset"] = "fashion_mnist"
    save_checkpoint(tmp_path / "fashion.pt", ckpt)
    assert cli.main(["export", "--checkpoint", str(tmp_path / "fashion.pt"), "--out", str(tmp_path / "model.onnx"),
                     "--profile", "cpu", "sampler.steps=3", "export.check_samples=4", "runtime.device=cpu"]) == 0
    assert scored == ["fashion_mnist"]
    assert "trained on fashion_mnist; scoring against fashion_mnist, not data.dataset=mnist" in caplog.text
    # settings whose own model would not fit 28x28 images (the CIFAR-10 layout): only the dataset is taken over
    cifar = load_config("params.yaml", "cifar10", [])
    assert ddpm.evaluate.scored_on("fashion_mnist", cifar) == dataclasses.replace(
        cifar, data=dataclasses.replace(cifar.data, dataset="fashion_mnist"))


# ---- torch-free ----

_NO_TORCH = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "mlflow"):
            raise ImportError(name + " import blocked by the test")
sys.meta_path.insert(0, Block())
import json
from ddpm.cli import main
rc = main(["onnx-sample", *json.loads(sys.argv[1]), "--out", sys.argv[2], "-n", "3", "--steps", "4",
           "--sampler", "ddim", "--label", "7"])
assert rc == 0, rc
assert not [m for m in sys.modules if m.split(".")[0] in ("torch", "mlflow")]
print("NO_TORCH_OK")
"""


@pytest.mark.parametrize("which", ["--model", "--params"])
def test_onnx_sample_cli_never_imports_torch_or_mlflow(models, tmp_path, which):
    """With --model, or without it: then <train.out_dir>/model.onnx of the settings file (`ddpm web`'s default)."""
    _, path = models["cond"]
    if which == "--params":
        (tmp_path / "run").mkdir()
        shutil.copy(path, tmp_path / "run" / "model.onnx")
        (tmp_path / "p.yaml").write_text(f"train:\n  out_dir: {tmp_path / 'run'}\n")
        path = tmp_path / "p.yaml"
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, json.dumps([which, str(path)]), str(tmp_path / "s")],
                          cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert "NO_TORCH_OK" in proc.stdout, proc.stdout + proc.stderr
    assert "CPUExecutionProvider" in proc.stdout
    assert "3 images (ddim, 4 steps, seed 0, label 7, pcg64 noise)" in proc.stdout
    arr = np.load(tmp_path / "s" / "samples.npz")
    assert arr["images"].shape == (3, 1, 28, 28) and arr["images"].dtype == np.uint8
    assert arr["labels"].tolist() == [7, 7, 7]
    assert (tmp_path / "s" / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _with_sampler_entry(src: Path, dest: Path, entry: dict | None) -> Path:
    dest.write_bytes(with_sampler_entry(src, entry))
    return dest


def test_onnx_sample_defaults_to_the_settings_the_export_was_checked_with(models, tmp_path, capsys):
    """The export records the DDIM settings of its check; `ddpm onnx-sample` without --steps, --eta or --guidance
    samples with them, an option given wins, and an export without them gets DDIM-50, eta 0, no guidance."""
    from ddpm.cli import main

    ckpt, path = models["cond"]
    assert OnnxDenoiser(path).metadata["sampler"] == {"steps": 10, "eta": 0.0, "guidance_scale": 1.0}  # DDIM10
    for twin in (fp16_path(path), int8_path(path)):
        assert OnnxDenoiser(twin).sampler_defaults == OnnxDenoiser(path).sampler_defaults, twin
    many = export_onnx(ckpt, tmp_path / "many" / "model.onnx", ExportConfig(), SamplerConfig(steps=80))
    assert OnnxDenoiser(many).metadata["sampler"]["steps"] == 50  # at most T, every timestep
    other = _with_sampler_entry(path, tmp_path / "other.onnx", {"steps": 7, "eta": 0.5, "guidance_scale": 2.0})
    old = _with_sampler_entry(path, tmp_path / "old.onnx", None)

    def run(model: Path, *options: str) -> tuple[str, np.ndarray]:
        out = tmp_path / f"s{len(list(tmp_path.iterdir()))}"
        assert main(["onnx-sample", "--model", str(model), "--out", str(out), "-n", "3", "--label", "2", *options]) == 0
        return capsys.readouterr().out, np.load(out / "samples.npz")["images"]

    said, images = run(other)
    assert "3 images (ddim, 7 steps, seed 0, label 2, eta 0.5, guidance 2, pcg64 noise)" in said
    np.testing.assert_array_equal(images, sample(OnnxDenoiser(other), 3, "ddim", 7, 0.5, 0, 256, 2, 2.0))
    said, images = run(other, "--steps", "4", "--eta", "0", "--guidance", "1")
    assert "(ddim, 4 steps" in said
    np.testing.assert_array_equal(images, sample(OnnxDenoiser(other), 3, "ddim", 4, 0.0, 0, 256, 2, 1.0))
    said, images = run(old)
    assert "(ddim, 50 steps" in said
    np.testing.assert_array_equal(images, sample(OnnxDenoiser(old), 3, "ddim", 50, 0.0, 0, 256, 2, 1.0))
    for bad in ({"steps": 0, "eta": 0.0, "guidance_scale": 1.0}, {"steps": 7.5, "eta": 0.0, "guidance_scale": 1.0},
                {"steps": 7, "eta": -1.0, "guidance_scale": 1.0}, {"steps": 7, "eta": "0", "guidance_scale": 1.0},
                {"steps": 7}, [7, 0.0, 1.0]):
        with pytest.raises(OnnxModelError, match="invalid sampler entry.*re-export"):
            OnnxDenoiser(_with_sampler_entry(path, tmp_path / "bad.onnx", bad))


# ---- bad models and bad inputs ----

def _model_with_inputs(path: Path, inputs: list[tuple[str, int, list]], meta: dict | None) -> Path:
    x = helper.make_tensor_value_info(inputs[0][0], inputs[0][1], inputs[0][2])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, ["B", 1, 28, 28])
    graph = helper.make_graph([helper.make_node("Identity", [inputs[0][0]], ["output"])], "g",
                              [x] + [helper.make_tensor_value_info(*i) for i in inputs[1:]], [out])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=10)
    if meta is not None:
        model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    onnx.save(model, str(path))
    return path


def test_bad_model_files_give_clear_errors(models, tmp_path):
    _, good = models["uncond"]
    meta = OnnxDenoiser(good).metadata
    with pytest.raises(OnnxModelError, match="does not exist"):
        OnnxDenoiser(tmp_path / "missing.onnx")
    data = good.read_bytes()
    (tmp_path / "truncated.onnx").write_bytes(data[: len(data) // 2])
    with pytest.raises(OnnxModelError, match="truncated, corrupt or not an ONNX model"):
        OnnxDenoiser(tmp_path / "truncated.onnx")
    (tmp_path / "text.onnx").write_text("not a model")
    with pytest.raises(OnnxModelError, match="truncated, corrupt or not an ONNX model"):
        OnnxDenoiser(tmp_path / "text.onnx")
    f = TensorProto.FLOAT
    i64 = TensorProto.INT64
    plain = _model_with_inputs(tmp_path / "plain.onnx", [("x", f, ["B", 1, 28, 28]), ("t", i64, ["B"])], None)
    with pytest.raises(OnnxModelError, match="no 'ddpm' metadata"):
        OnnxDenoiser(plain)
    wrong = _model_with_inputs(tmp_path / "wrong.onnx", [("x", f, ["B", 1, 28, 28]), ("timestep", f, ["B"])], meta)
    with pytest.raises(OnnxModelError, match=r"inputs are \['timestep', 'x'\].*takes \['t', 'x'\]"):
        OnnxDenoiser(wrong)
    wrong_t = _model_with_inputs(tmp_path / "t.onnx", [("x", f, ["B", 1, 28, 28]), ("t", f, ["B"])], meta)
    with pytest.raises(OnnxModelError, match=r"input 't' is tensor\(float\).*expected tensor\(int64\)"):
        OnnxDenoiser(wrong_t)
    partial = _model_with_inputs(tmp_path / "partial.onnx", [("x", f, ["B", 1, 28, 28]), ("t", i64, ["B"])],
                                 {**meta, "diffusion": {"schedule": "linear"}})
    with pytest.raises(OnnxModelError, match="metadata lacks diffusion.timesteps"):
        OnnxDenoiser(partial)
    fixed = _model_with_inputs(tmp_path / "fixed.onnx", [("x", f, [4, 1, 28, 28]), ("t", i64, [4])], meta)
    with pytest.raises(OnnxModelError, match="fixed batch size 4"):
        OnnxDenoiser(fixed)
    cifar = _model_with_inputs(tmp_path / "c.onnx", [("x", f, ["B", 3, 32, 32]), ("t", i64, ["B"])], meta)
    with pytest.raises(OnnxModelError, match=r"shape \['B', 3, 32, 32\].*image shape is \[1, 28, 28\]"):
        OnnxDenoiser(cifar)


def test_bad_inputs_give_clear_errors(models):
    den = OnnxDenoiser(models["uncond"][1])
    x, t = np.zeros((2, 1, 28, 28), np.float32), np.array([0, 49])
    assert den(x, t).shape == (2, 1, 28, 28)
    with pytest.raises(OnnxModelError, match="float32"):
        den(x.astype(np.float64), t)
    with pytest.raises(OnnxModelError, match=r"shape \[2, 1, 27, 28\]; expected \[B, 1, 28, 28\]"):
        den(np.zeros((2, 1, 27, 28), np.float32), t)
    with pytest.raises(OnnxModelError, match=r"outside \[0, 49\]"):
        den(x, np.array([0, 50]))
    with pytest.raises(OnnxModelError, match=r"outside \[0, 49\]"):
        den(x, np.array([-1, 3]))
    with pytest.raises(OnnxModelError, match="integers"):
        den(x, np.array([0.0, 1.0]))
    with pytest.raises(OnnxModelError, match=r"t has shape \[3\]; expected \[2\]"):
        den(x, np.array([0, 1, 2]))
    with pytest.raises(OnnxModelError, match="not class-conditional"):
        den(x, t, np.array([1, 2]))
    with pytest.raises(OnnxModelError, match="not class-conditional"):
        sample(den, 2, steps=2, label=3)
    cond = OnnxDenoiser(models["cond"][1])
    with pytest.raises(OnnxModelError, match=r"labels hold 0..11, outside \[0, 10\]"):
        cond(x, t, np.array([0, 11]))


def test_cuda_fails_loudly_without_a_gpu_and_matches_cpu_with_one(models):
    path = models["cond"][1]
    if shutil.which("nvidia-smi") is None:
        with pytest.raises(OnnxModelError, match="CUDA was asked for"):
            OnnxDenoiser(path, provider="cuda")
        return
    gpu = OnnxDenoiser(path, provider="cuda", cuda_options={"use_tf32": 0})  # on a GPU machine this must work
    assert gpu.provider == "CUDAExecutionProvider"
    cpu = OnnxDenoiser(path)
    rng = np.random.default_rng(6)
    x_T = rng.standard_normal((6, 1, 28, 28), dtype=np.float32)
    labels = np.arange(6)
    for b in (6, 3):  # two batch sizes: two sets of IO-binding buffers
        a = ort_ddim(gpu, gpu.schedule, x_T[:b], labels=labels[:b], steps=5, guidance_scale=2.0, prediction="v")
        c = ort_ddim(cpu, cpu.schedule, x_T[:b], labels=labels[:b], steps=5, guidance_scale=2.0, prediction="v")
        assert np.abs(a - c).max() < 1e-3


def test_provider_auto_asks_the_driver_before_requesting_cuda(models, tmp_path, monkeypatch):
    """onnxruntime-gpu lists CUDAExecutionProvider on CPU machines too; requesting it there logs red errors.
    auto requests CUDA only where the driver finds a GPU, so a CPU machine's run is silent and on the CPU."""
    import ddpm.onnx_model as onnx_model

    monkeypatch.setattr(onnx_model, "_driver_problem", lambda: "there is no NVIDIA driver (test)")
    assert onnx_model.resolve_provider("auto") == "cpu" and onnx_model.resolve_provider("cuda") == "cuda"
    with pytest.raises(OnnxModelError, match=r"CUDA was asked for, but there is no NVIDIA driver \(test\)"):
        OnnxDenoiser(models["uncond"][1], provider="cuda")
    monkeypatch.undo()
    proc = subprocess.run([sys.executable, "-m", "ddpm.cli", "onnx-sample", "--model", str(models["uncond"][1]),
                           "--out", str(tmp_path), "-n", "2", "--steps", "3", "--provider", "auto"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr
    expected = "CPUExecutionProvider" if onnx_model.cuda_problem() else "CUDAExecutionProvider"
    assert f"on {expected}" in proc.stdout
    assert "onnxruntime" not in proc.stderr and "CUDA did not start" not in proc.stderr, proc.stderr
