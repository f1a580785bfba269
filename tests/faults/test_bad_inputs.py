"""Inputs a careless or hostile user gives the `ddpm` command: each is one line naming what was wrong,
exit status 2, no traceback, and nothing written or changed on disk.

Non-finite and out-of-range sampler arguments, seeds and sizes that pass a type check but no device
could hold, files that are not what their option says (a text file as a checkpoint, a non-UTF-8
params file, profiles that are no mapping, an IDX file with no images, an ONNX model whose metadata
asks for 1e11 timesteps), and output folders that are files or cannot be written. The commands run
in this process through ddpm.cli.main; the ONNX model is a one-node graph with the metadata that
`ddpm export` writes, so no export is needed.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import onnx
import pytest
import torch
from onnx import TensorProto, helper

from ddpm import cli
from ddpm.checkpoint import save_checkpoint
from ddpm.config import config_from_dict, image_shape
from ddpm.errors import OnnxModelError
from ddpm.onnx_model import METADATA_KEY, OnnxDenoiser
from ddpm.unet import build_unet
from testkit import idx_bytes, random_mnist

pytestmark = [pytest.mark.faults, pytest.mark.usefixtures("one_torch_thread")]

TINY = {"data": {"dataset": "mnist"}, "diffusion": {"timesteps": 20},
        "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attention_levels": [1],
                  "num_heads": 2, "dropout": 0.0, "norm_groups": 4},
        "sampler": {"steps": 2}}
TRAIN = ["--params", "params.yaml", "--profile", "cpu", "train.steps=4", "train.batch_size=4", "diffusion.timesteps=20",
         "model.base_channels=8", "model.channel_mult=[1,2]", "model.attention_levels=[1]", "model.num_heads=2",
         "model.norm_groups=4", "sampler.steps=2"]


@pytest.fixture(autouse=True)
def project_root(monkeypatch):
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # params.yaml


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    cfg = config_from_dict(TINY)
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    path = tmp_path_factory.mktemp("ckpt") / "checkpoint.pt"
    save_checkpoint(path, {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": 4})
    return path


def onnx_model(path: Path, **meta_changes) -> Path:
    """A model of ddpm export's signature and metadata whose network is x * 0.5."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 1, 28, 28])
    t = helper.make_tensor_value_info("t", TensorProto.INT64, [None])
    out = helper.make_tensor_value_info("output", TensorProto.FLOAT, [None, 1, 28, 28])
    half = helper.make_tensor("half", TensorProto.FLOAT, [], [0.5])
    graph = helper.make_graph([helper.make_node("Mul", ["x", "half"], ["output"])], "identity", [x, t], [out], [half])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    meta = {"format": 1, "diffusion": config_from_dict(TINY).to_dict()["diffusion"], "image_shape": [1, 28, 28],
            "class_conditional": False, "num_classes": 10, "step": 0, **meta_changes}
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta))
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save_model(model, str(path))
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "folder"
            for p in sorted(folder.rglob("*"))}


def _error_line(capsys, argv: list[str]) -> str:
    """Run `ddpm argv`; the one line of its expected failure (exit status 2, no traceback)."""
    code = cli.main(argv)
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err[-3000:]
    lines = [line for line in err.splitlines() if line.startswith(f"ddpm {argv[0]}: error: ")]
    assert len(lines) == 1, err[-3000:]
    return lines[0]


@pytest.mark.parametrize("args, says", [
    (["--eta", "nan"], "sampler.eta: nan is not a finite number"),
    (["--eta=-inf"], "sampler.eta: -inf is not a finite number"),
    (["--guidance", "inf"], "sampler.guidance_scale: inf is not a finite number"),
    (["--seed", "-1"], "sample.seed: -1 is out of range; allowed: an integer in [0, 4294967295]"),
    (["--seed", "99999999999999999999"], "sample.seed: 99999999999999999999 is out of range"),
])
def test_sample_refuses_non_finite_and_out_of_range_arguments(capsys, checkpoint, tmp_path, args, says):
    out = tmp_path / "samples"
    line = _error_line(capsys, ["sample", "--checkpoint", str(checkpoint), "--out", str(out), "--steps", "2",
                                "-n", "2", *args])
    assert says in line
    assert not list(out.glob("samples.*"))


@pytest.mark.parametrize("args, says", [
    (["--eta", "nan"], "eta: nan is not allowed; use a finite number >= 0"),
    (["--eta", "inf"], "eta: inf is not allowed"),
    (["--guidance", "nan"], "guidance_scale: nan is not allowed; use a finite number >= 0"),
    (["--seed", "-1"], "seed: -1 is out of range; allowed: an integer in [0, 4294967295]"),
])
def test_onnx_sample_refuses_non_finite_and_out_of_range_arguments(capsys, tmp_path, args, says):
    model, out = onnx_model(tmp_path / "model.onnx"), tmp_path / "samples"
    line = _error_line(capsys, ["onnx-sample", "--model", str(model), "--out", str(out), "--steps", "2", "-n", "2",
                                *args])
    assert line == f"ddpm onnx-sample: error: {says}" or says in line
    assert not list(out.glob("samples.*"))
    assert cli.main(["onnx-sample", "--model", str(model), "--out", str(out), "--steps", "2", "-n", "2"]) == 0
    assert (out / "samples.npz").is_file()  # the same model with sound arguments samples


@pytest.mark.parametrize("command", ["sample", "onnx-sample"])
def test_options_the_sampling_would_ignore_are_refused(capsys, checkpoint, tmp_path, command):
    """--steps and --eta with DDPM sampling (every timestep, its own variance) and --guidance for an unconditional
    model: refused, not dropped."""
    source = (["--model", str(onnx_model(tmp_path / "model.onnx"))] if command == "onnx-sample"
              else ["--checkpoint", str(checkpoint)])
    out = tmp_path / "samples"
    for args, says in ((["--sampler", "ddpm", "--steps", "10"], "--steps 10: the step count of DDIM sampling; DDPM "
                                                                "sampling takes every timestep"),
                       (["--sampler", "ddpm", "--eta", "0.5"], "--eta 0.5: DDIM's eta; DDPM sampling draws its "
                                                                "noise with sampler.variance"),
                       (["--steps", "2", "--guidance", "3"], "--guidance 3.0: the model is not class-conditional")):
        assert says in _error_line(capsys, [command, *source, "--out", str(out), "-n", "2", *args])
    assert not out.exists()


def test_steps_with_ddpm_sampling_are_refused_before_a_registered_model_is_downloaded(capsys, tmp_path, monkeypatch):
    import flows.registry

    def fetch(*args, **kwargs):
        raise AssertionError("the model was fetched")
    monkeypatch.setattr(flows.registry, "fetch_onnx", fetch)
    line = _error_line(capsys, ["onnx-sample", "--model", "models:/ddpm-unet@champion", "--out", str(tmp_path / "s"),
                                "--sampler", "ddpm", "--steps", "10"])
    assert "--steps 10: the step count of DDIM sampling" in line and not (tmp_path / "s").exists()


def test_onnx_metadata_asking_for_1e11_timesteps_is_refused_before_any_array(capsys, tmp_path):
    model = onnx_model(tmp_path / "model.onnx", diffusion={**config_from_dict(TINY).to_dict()["diffusion"],
                                                            "timesteps": 100_000_000_000})
    line = _error_line(capsys, ["onnx-sample", "--model", str(model), "--out", str(tmp_path / "s"), "-n", "2"])
    assert f"{model}: its 'ddpm' metadata is invalid (diffusion.timesteps: 100000000000 is out of range" in line
    with pytest.raises(OnnxModelError, match="image shape \\[1, 100000, 100000\\]"):
        OnnxDenoiser(onnx_model(tmp_path / "wide.onnx", image_shape=[1, 100_000, 100_000]))


def test_an_onnx_load_error_keeps_its_reason_past_300_characters(tmp_path):
    deep = tmp_path.joinpath(*["a-folder-with-a-long-name-" + "x" * 40] * 6)
    bad = deep / "model.onnx"
    bad.parent.mkdir(parents=True)
    bad.write_bytes(b"\x08\x07this is not a protobuf of a model" * 8)
    assert len(str(bad)) > 300
    with pytest.raises(OnnxModelError) as info:
        OnnxDenoiser(bad)
    message = str(info.value)
    assert "\n" not in message
    # onnxruntime names the file inside its message, then says why: that part comes after the 300th character
    assert f"Load model from {bad} failed:Protobuf parsing failed." in message, message


@pytest.mark.parametrize("text, says", [
    (b"train:\n  lr: 0.001  # caf\xe9\n", "is not UTF-8 text (byte 25: invalid continuation byte)"),
    (b"profile: cpu\nprofiles: [cpu, gpu]\n", "profiles: expected a mapping of profile names to settings, got list"),
    (b"profile: cpu\nprofiles:\n  cpu:\n", "profiles.cpu: expected a mapping of sections"),
    (b"profile: [cpu]\nprofiles:\n  cpu: {}\n", "profile: ['cpu'] is not a profile name"),
])
def test_params_files_that_are_not_settings(capsys, tmp_path, text, says):
    params = tmp_path / "params.yaml"
    params.write_bytes(text)
    assert says in _error_line(capsys, ["sample", "--params", str(params), "--out", str(tmp_path / "s")])
    assert not (tmp_path / "s").exists()


def test_a_checkpoint_option_that_names_no_checkpoint(capsys, tmp_path):
    out = tmp_path / "s"
    for path, says in (("/etc/passwd", "/etc/passwd is not a checkpoint, or is truncated or corrupt: it is not the "
                                       "complete zip archive"),
                       (str(tmp_path), f"checkpoint {tmp_path} is not a file")):
        assert says in _error_line(capsys, ["sample", "--checkpoint", path, "--out", str(out)])
    assert not list(out.glob("samples.*"))


@pytest.mark.parametrize("command", ["sample", "onnx-sample", "evaluate"])
def test_output_folders_that_are_files_or_unwritable_fail_before_any_work(capsys, checkpoint, tmp_path, monkeypatch,
                                                                          command):
    import ddpm.evaluate

    sampled = []
    monkeypatch.setattr(ddpm.evaluate, "generate", lambda *a, **k: sampled.append(1))
    source = (["--model", str(onnx_model(tmp_path / "model.onnx"))] if command == "onnx-sample"
              else ["--checkpoint", str(checkpoint)])
    settings = ["evaluate.num_samples=8"] if command == "evaluate" else []
    a_file = tmp_path / "a-file"
    a_file.write_text("kept\n")
    for out, says in ((a_file, f"{a_file} exists and is not a folder"),
                      (Path("/proc/ddpm-out"), "cannot write into /proc/ddpm-out")):
        assert says in _error_line(capsys, [command, *source, "--out", str(out), *settings])
    assert a_file.read_text() == "kept\n" and not sampled


@pytest.mark.parametrize("command", ["evaluate", "export"])
def test_a_feature_net_path_that_is_missing_or_corrupt_fails_before_any_work(capsys, checkpoint, tmp_path,
                                                                             monkeypatch, command):
    """On the command line a --feature-net path names a file: a mistyped one is not trained, and a corrupt one is
    found before the sampling."""
    import ddpm.evaluate

    sampled = []
    monkeypatch.setattr(ddpm.evaluate, "generate", lambda *a, **k: sampled.append(1))
    out = tmp_path / ("eval" if command == "evaluate" else "model.onnx")
    run = [command, "--checkpoint", str(checkpoint), "--out", str(out), "evaluate.num_samples=8"]
    missing = tmp_path / "nets" / "mnist-typo.pt"
    line = _error_line(capsys, [*run, "--feature-net", str(missing)])
    assert f"--feature-net: {missing} is not a file; pass an existing feature net, pinned" in line
    assert not missing.parent.exists() and not out.exists()
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ddpm.evaluate.feature_net_path(config_from_dict(TINY)).read_bytes()[:5000])
    assert "is truncated, corrupt or unsafe" in _error_line(capsys, [*run, "--feature-net", str(truncated)])
    assert not out.exists() and not sampled


def _run_folder(tmp_path: Path, checkpoint: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "checkpoint.pt").write_bytes(checkpoint.read_bytes())
    (run / "loss.csv").write_text("step,loss,lr,images_per_sec\r\n2,0.5,0.001,9\r\n4,0.4,0.001,9\r\n")
    (run / "config.yaml").write_text("train: {}\n")
    return run


@pytest.mark.parametrize("override, says", [
    ("train.batch_size=1000000000", "train.batch_size=1000000000 with model.base_channels=8 needs at least 31.4 TiB"),
    ("model.base_channels=100000000", "with model.base_channels=100000000 needs at least"),
    ("train.seed=99999999999999999999", "train.seed: 99999999999999999999 is out of range"),
    ("train.seed=-1", "train.seed: -1 is out of range"),
    ("diffusion.timesteps=100000000000", "diffusion.timesteps: 100000000000 is out of range; allowed: an integer in"),
])
@pytest.mark.parametrize("flag", ["--resume", "--overwrite"])
def test_sizes_no_device_holds_are_refused_before_the_run_folder_is_touched(capsys, checkpoint, tmp_path, override,
                                                                            says, flag):
    data = random_mnist(tmp_path)
    run = _run_folder(tmp_path, checkpoint)
    before = _snapshot(tmp_path)
    line = _error_line(capsys, ["train", *TRAIN, f"data.root={data}", f"train.out_dir={run}", override, flag])
    assert says in line and ("lower train.batch_size or model.base_channels" in line or "out of range" in line)
    assert _snapshot(tmp_path) == before  # no lock file, no replaced-* folder, every file as it was


def test_an_idx_file_with_no_images_is_named(capsys, tmp_path):
    data = random_mnist(tmp_path)
    empty = data / "mnist" / "train-images-idx3-ubyte"
    empty.write_bytes(idx_bytes(torch.zeros(0, 28, 28, dtype=torch.uint8).numpy()))
    out = tmp_path / "run"
    line = _error_line(capsys, ["train", *TRAIN, f"data.root={data}", f"train.out_dir={out}"])
    assert line == (f"ddpm train: error: {empty}: holds no images (dims [0, 28, 28]); delete it and re-fetch "
                    f"(`ddpm data`)")
    assert not out.exists() or not any(out.iterdir())


def test_verbose_keeps_the_traceback_for_an_expected_failure(tmp_path):
    params = tmp_path / "params.yaml"
    params.write_bytes(b"\xff\xfe")
    from ddpm.errors import ConfigError
    with pytest.raises(ConfigError, match="is not UTF-8 text"):
        cli.main(["-v", "sample", "--params", str(params)])
    assert params.read_bytes() == b"\xff\xfe"
