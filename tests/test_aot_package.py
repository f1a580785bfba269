"""The AOT package of the sampling network: refused, before its code is loaded, for another GPU, torch or
checkpoint; never built without CUDA by `ddpm export`; and (slow) a real CPU package that samples what the
eager network samples. The CUDA load-and-run path is in tests/test_cuda.py."""

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import ddpm.aot_package as aot
from ddpm.aot_loader import cpu_flags, missing_cpu_isa
from ddpm.checkpoint import config_of, load_checkpoint, save_checkpoint
from ddpm.config import config_from_dict, image_shape
from ddpm.generate import generate
from ddpm.schedule import Schedule
from ddpm.unet import build_unet

H200 = {"torch": "2.11.0+cu130", "cuda": "13.0", "device": "NVIDIA H200", "capability": [9, 0]}


def _checkpoint(path: Path, conditional: bool = True) -> Path:
    cfg = config_from_dict({"diffusion": {"timesteps": 20}, "sampler": {"steps": 4}, "sample": {"batch_size": 3},
                            "export": {"check_samples": 4, "aot": True},
                            "model": {"base_channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1,
                                      "attention_levels": [1], "num_heads": 2, "dropout": 0.0, "norm_groups": 4,
                                      "class_conditional": conditional}})
    torch.manual_seed(0)
    net = build_unet(cfg.model, image_shape(cfg))
    with torch.no_grad():  # the zero-initialised output layers would make every prediction 0
        for p in net.parameters():
            p.add_(0.2 * torch.randn_like(p))
    save_checkpoint(path, {"model": net.state_dict(), "ema": net.state_dict(), "config": cfg.to_dict(), "step": 7})
    return path


def _fake_package(path: Path, **record) -> Path:
    """A zip laid out as aoti_compile_and_package's, whose code is not there: loading it would fail."""
    full = {"format": aot.FORMAT, "machine": H200, "checkpoint_sha256": "0" * 64, "bf16": True,
            "class_conditional": True, "num_classes": 10, **record}
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("model/archive_format", "pt2")
        z.writestr(f"model/{aot.RECORD_ENTRY}", json.dumps(full))
    return path


@pytest.fixture
def no_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a refused package was loaded")
    monkeypatch.setattr(aot, "open_package", refuse)


def test_a_package_for_another_gpu_or_torch_is_refused_without_loading_it(tmp_path, no_load):
    here = aot.machine(torch.device("cpu"))
    pkg = _fake_package(tmp_path / "model.pt2", machine=H200)
    why = aot.refusal(pkg, torch.device("cpu"), "0" * 64, True)
    assert "NVIDIA H200" in why and "torch 2.11.0+cu130" in why and f"torch {here['torch']}" in why
    other_torch = _fake_package(tmp_path / "torch.pt2", machine={**here, "torch": "2.11.0+cu130"})
    assert "torch 2.11.0+cu130" in aot.refusal(other_torch, torch.device("cpu"), "0" * 64, True)
    other_gpu = {"torch": torch.__version__, "cuda": "13.0", "device": "NVIDIA H100 80GB HBM3", "capability": [9, 0]}
    assert "NVIDIA H100 80GB HBM3" in aot.refusal(_fake_package(tmp_path / "gpu.pt2", machine=other_gpu),
                                                  torch.device("cpu"), "0" * 64, True)


def test_a_package_compiled_for_instruction_sets_this_cpu_lacks_is_refused(tmp_path, no_load, monkeypatch):
    here = aot.machine(torch.device("cpu"))
    pkg = _fake_package(tmp_path / "model.pt2", machine=here, cpu_isa="AVX512 AVX512_VNNI AMX_TILE")
    avx512 = {"fpu", "avx2", "fma", "f16c", "avx512f", "avx512dq", "avx512vl", "avx512bw"}
    monkeypatch.setattr(aot, "cpu_flags", lambda: avx512)
    why = aot.refusal(pkg, torch.device("cpu"), "0" * 64, True)
    assert why.endswith("was compiled for CPU instruction sets this CPU lacks (AVX512_VNNI, AMX_TILE)"), why
    monkeypatch.setattr(aot, "cpu_flags", lambda: avx512 | {"avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"})
    assert aot.refusal(pkg, torch.device("cpu"), "0" * 64, True) is None
    assert missing_cpu_isa("AVX2", None) == []  # no /proc/cpuinfo: nothing to check against
    assert missing_cpu_isa("", {"avx2"}) == [] and missing_cpu_isa("AVX2", set()) == ["AVX2"]
    assert missing_cpu_isa("AVX512", avx512 - {"avx512bw"}) == ["AVX512"]  # each flag its compile needs
    assert missing_cpu_isa("AVX2", {"avx2", "fma"}) == ["AVX2"]  # -mf16c too


def test_a_package_is_reused_only_when_built_with_the_tuning_asked_for(tmp_path):
    """flows' export stage keeps a package only when it was built for this sample.batch_size with today's options."""
    cfg = config_from_dict({"sample": {"batch_size": 1000}})
    current = _fake_package(tmp_path / "a.pt2", batch_hint=1000, inductor_configs=aot.INDUCTOR_CONFIGS)
    assert aot.built_as_asked(current, cfg)
    assert not aot.built_as_asked(current, config_from_dict({"sample": {"batch_size": 256}}))
    assert not aot.built_as_asked(_fake_package(tmp_path / "old.pt2"), cfg)  # built before either was recorded
    tuned = _fake_package(tmp_path / "cd.pt2", batch_hint=1000, inductor_configs={"coordinate_descent_tuning": True})
    assert not aot.built_as_asked(tuned, cfg)  # built with options export no longer uses
    assert not aot.built_as_asked(tmp_path / "missing.pt2", cfg)
    assert aot.batch_hint(config_from_dict({"sample": {"batch_size": 1}})) == 2
    assert aot.batch_hint(config_from_dict({"sample": {"batch_size": 10 ** 6}})) == aot.MAX_BATCH


def test_a_package_of_another_checkpoint_or_precision_is_refused(tmp_path, no_load):
    here = aot.machine(torch.device("cpu"))
    pkg = _fake_package(tmp_path / "model.pt2", machine=here, checkpoint_sha256="a" * 64, bf16=False)
    assert "another checkpoint" in aot.refusal(pkg, torch.device("cpu"), "b" * 64, False)
    assert "bf16" in aot.refusal(pkg, torch.device("cpu"), "a" * 64, True)
    assert aot.refusal(pkg, torch.device("cpu"), "a" * 64, False) is None  # the only match


@pytest.mark.parametrize("content", [b"", b"not a zip", "no record"])
def test_a_file_that_is_no_package_is_refused(tmp_path, no_load, content):
    path = tmp_path / "model.pt2"
    if content == "no record":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("model/archive_format", "pt2")
    else:
        path.write_bytes(content)
    assert "unusable" in aot.refusal(path, torch.device("cpu"), "0" * 64, True)
    assert "no AOT package" in aot.refusal(tmp_path / "missing.pt2", torch.device("cpu"), "0" * 64, True)


def test_sampling_falls_back_to_the_eager_network_with_one_log_line(tmp_path, no_load, caplog):
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    pkg = _fake_package(tmp_path / "model.pt2", checkpoint_sha256=aot.file_sha256(ckpt))
    with caplog.at_level(logging.INFO, logger="ddpm.aot_package"):
        net, used = aot.choose_package(str(pkg), ckpt, torch.device("cpu"), False)
    assert net is None and used["network"] == "eager" and "NVIDIA H200" in used["reason"]
    assert [r.levelname for r in caplog.records] == ["WARNING"] and used["reason"] in caplog.records[0].getMessage()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddpm.aot_package"):  # auto: packages are for CUDA, quietly
        net, used = aot.choose_package("auto", ckpt, torch.device("cpu"), False)
        assert aot.choose_package(None, ckpt, torch.device("cpu"), False)[0] is None
    assert net is None and used["network"] == "eager" and not caplog.records


def test_ddpm_sample_with_a_package_path_that_is_no_file_is_one_line_and_exit_status_2(tmp_path, capsys):
    from ddpm.cli import main

    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    code = main(["sample", "--checkpoint", str(ckpt), "--device", "cpu", "-n", "2", "--steps", "2", "--aot",
                 str(tmp_path / "x.pt2"), "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "x.pt2: no such file" in err[0]
    assert not (tmp_path / "out" / "samples.npz").exists()


def test_ddpm_sample_with_a_package_of_another_gpu_samples_eagerly_and_says_why(tmp_path, capsys, no_load, caplog):
    from ddpm.cli import main

    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    pkg = _fake_package(tmp_path / "model.pt2", checkpoint_sha256=aot.file_sha256(ckpt))
    with caplog.at_level(logging.WARNING, logger="ddpm.aot_package"):
        code = main(["sample", "--checkpoint", str(ckpt), "--device", "cpu", "-n", "2", "--steps", "2", "--aot",
                     str(pkg), "--out", str(tmp_path / "out")])
    assert code == 0 and (tmp_path / "out" / "samples.npz").is_file() and "eager network" in capsys.readouterr().out
    assert [r.getMessage() for r in caplog.records if "refused" in r.getMessage()][0].count("NVIDIA H200") == 1


def test_export_builds_no_package_without_cuda_and_leaves_the_folder_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    cfg = config_of(load_checkpoint(ckpt))
    record = aot.export_package(ckpt, tmp_path / "model.pt2", cfg)
    assert record["written"] is False and "CUDA" in record["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    off = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, aot=False))
    assert aot.export_package(ckpt, tmp_path / "model.pt2", off)["written"] is False


def test_generate_runs_a_given_network_in_place_of_the_model(tmp_path):
    """The network that replaces the model (a package's) gets every call, at the batch size asked for."""
    from ddpm.checkpoint import load_model

    model, cfg, _ = load_model(_checkpoint(tmp_path / "checkpoint.pt"), "cpu")
    batches = []

    def network(x, t, labels=None):
        batches.append(x.shape[0])
        return model(x, t, labels)
    s = Schedule.from_config(cfg.diffusion)
    via, via_labels = generate(model, s, cfg, 5, seed=3, network=network)
    eager, eager_labels = generate(model, s, cfg, 5, seed=3)
    assert batches == [3] * 4 + [2] * 4  # DDIM-4 over batches of 3 and 2: no padding
    assert torch.equal(via, eager) and torch.equal(via_labels, eager_labels)


def test_a_loader_that_crashes_its_check_process_costs_the_package_not_the_export(tmp_path, monkeypatch, caplog):
    """AOTInductor's loader crashed (SIGSEGV) on every CUDA package on the H200 machine: the check runs in a process
    of its own, so export_package returns, with the reason, and leaves no package and no temporary file."""
    monkeypatch.setattr(aot, "build_package", lambda model, cfg, device, path, bf16, hint: _fake_package(path))
    monkeypatch.setattr(aot, "CHECK_ENTRY", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    ckpt = _checkpoint(tmp_path / "checkpoint.pt")
    cfg = config_of(load_checkpoint(ckpt), ckpt)
    with caplog.at_level(logging.WARNING, logger="ddpm.aot_package"):
        record = aot.export_package(ckpt, tmp_path / "model.pt2", cfg, device=torch.device("cpu"))
    assert not record["written"] and "crashed the check process (SIGSEGV)" in record["reason"], record
    assert "no AOT package: loading it crashed" in caplog.text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]
    monkeypatch.setattr(aot, "CHECK_ENTRY", "import sys; sys.exit('the package is unreadable')")
    failed = aot.export_package(ckpt, tmp_path / "model.pt2", cfg, device=torch.device("cpu"))
    assert not failed["written"] and "exit status 1: the package is unreadable" in failed["reason"], failed
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


@pytest.mark.slow
@pytest.mark.parametrize("conditional", [True, False])
def test_a_real_cpu_package_samples_what_the_eager_network_samples(tmp_path, tmp_path_factory, monkeypatch,
                                                                   conditional):
    """The whole path on the CPU (AOTInductor compiles C++ there): build, parity gate, record, load, sample."""
    from ddpm.checkpoint import load_model

    built, build = tmp_path_factory.mktemp("built") / "model.pt2", aot.build_package

    def build_once(*args):  # the refusal below gets a copy of the package compiled first, not a second compile
        if not built.is_file():
            shutil.copyfile(build(*args), built)
        return shutil.copyfile(built, args[3])
    monkeypatch.setattr(aot, "build_package", build_once)
    ckpt = _checkpoint(tmp_path / "checkpoint.pt", conditional)
    model, cfg, _ = load_model(ckpt, "cpu")
    ecfg = dataclasses.replace(cfg, export=dataclasses.replace(cfg.export, aot_mean_atol=1e-3))
    record = aot.export_package(ckpt, tmp_path / "model.pt2", ecfg, device=torch.device("cpu"))
    assert record["written"], record
    assert record["machine"] == aot.machine(torch.device("cpu")) and record["parity"]["mean_abs_diff"] <= 1e-3
    written = aot.read_record(tmp_path / "model.pt2")
    assert written["checkpoint_sha256"] == aot.file_sha256(ckpt)
    assert not missing_cpu_isa(written["cpu_isa"], cpu_flags()) and written["cpu_isa"].split()
    assert not list(tmp_path.glob(".model.tmp-*"))
    net, used = aot.choose_package(str(tmp_path / "model.pt2"), ckpt, torch.device("cpu"), False)
    assert used == {"network": "aot", "package": str(tmp_path / "model.pt2"), "device": "cpu"}
    s = Schedule.from_config(cfg.diffusion)
    packaged, _ = generate(model, s, cfg, 5, seed=3, network=net)
    eager, _ = generate(model, s, cfg, 5, seed=3)
    assert (packaged.int() - eager.int()).abs().max().item() <= 2  # float32 on both sides: rounding only
    # A package whose samples differ is not written, and one already there is removed.
    monkeypatch.setattr(aot, "check_in_child", lambda *a, **k: {"steps": 4, "mean_abs_diff": 0.5, "max_abs_diff": 1.0})
    refused = aot.export_package(ckpt, tmp_path / "model.pt2", ecfg, device=torch.device("cpu"))
    assert not refused["written"] and "aot_mean_atol" in refused["reason"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


# A package of a small network, built in a process of its own by the compiler in $CXX; then loaded in a fresh
# process, either straight through torch (argv[2] == "torch") or as `ddpm sample` loads it (AotDenoiser).
_TINY_PACKAGE = """
import sys, torch
class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv, self.out = torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Conv2d(4, 1, 1)
    def forward(self, x, t):
        return self.out(torch.nn.functional.silu(self.conv(x))) * t.float()[:, None, None, None]
torch.manual_seed(0)
net, args = Net().eval(), (torch.randn(2, 1, 6, 6), torch.tensor([1, 2]))
with torch.no_grad():
    if sys.argv[2] == "build":
        torch._inductor.aoti_compile_and_package(torch.export.export(net, args), package_path=sys.argv[1])
    else:
        from ddpm.aot_package import AotDenoiser
        run = (torch._inductor.aoti_load_package(sys.argv[1]) if sys.argv[2] == "torch" else
               AotDenoiser(sys.argv[1], {"num_classes": 0, "class_conditional": False}))
        assert torch.allclose(run(*args), net(*args), atol=1e-5)
        # ddpm's loader skips torch.export's Python wrapper, whose imports (dynamo, sympy) cost seconds
        assert sys.argv[2] == "torch" or not {"torch._dynamo", "sympy"} & set(sys.modules), "imported dynamo"
        print("same as eager")
"""


@pytest.mark.slow
def test_a_package_whose_wrapper_holds_a_static_libstdcxx_loads_and_runs(tmp_path):
    """The H200 machine's g++ links libstdc++ statically into a package's wrapper library. Loaded as torch loads
    it, such a package binds to that copy and crashes (SIGSEGV there, std::bad_cast here) in its first std::regex;
    AotDenoiser first gives the process's shared libstdc++ global scope, and the package runs."""
    cxx = torch._inductor.config.cpp.cxx[1]
    if shutil.which(cxx) is None:
        pytest.skip(f"no C++ compiler {cxx}: AOTInductor cannot build a CPU package here")
    static = subprocess.run([cxx, "-print-file-name=libstdc++.a"], capture_output=True, text=True).stdout.strip()
    if not os.path.isabs(static):
        pytest.skip(f"{cxx} has no static libstdc++ to link a wrapper library with")
    wrapper = tmp_path / "cxx-static-libstdcxx"
    wrapper.write_text(f'#!/bin/sh\ncase " $* " in *" -shared "*) exec {cxx} "$@" -static-libstdc++ ;; esac\n'
                       f'exec {cxx} "$@"\n')
    wrapper.chmod(0o755)
    script, package = tmp_path / "tiny.py", tmp_path / "tiny.pt2"
    script.write_text(_TINY_PACKAGE)
    # TMPDIR: where torch's loader unpacks the package, left behind by a process that crashes (as torch's own does)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "CXX": str(wrapper), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor"),
           "TMPDIR": str(tmp_path / "tmp")}

    def run(how: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(script), str(package), how], capture_output=True, text=True,
                              env=env, timeout=600)
    built = run("build")
    assert built.returncode == 0, built.stderr[-2000:]
    with zipfile.ZipFile(package) as z:
        (so,) = [n for n in z.namelist() if n.endswith(".so")]
        assert b"libstdc++.so.6" not in z.read(so)  # the wrapper holds its own libstdc++: it needs no shared one
    ours = run("ddpm")
    assert ours.returncode == 0 and "same as eager" in ours.stdout, ours.stderr[-2000:]
    plain = run("torch")
    if plain.returncode == 0:  # this Python already shares its libstdc++ globally: nothing to tell apart
        pytest.skip("torch's own loader runs this package here: the fix cannot be told from its absence")
    assert "same as eager" not in plain.stdout
