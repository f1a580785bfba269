"""The compile cache of `ddpm train`: its key, its file, and compiling as usual (one log line) when it is unusable."""

import hashlib
import json
import logging
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ddpm.compile_cache as cc
import ddpm.train as train_mod
from ddpm.config import load_config
from ddpm.train_compile import compile_options

KEY = cc.CacheKey(torch="2.11.0+cu130", triton="3.6.0", device="NVIDIA H200", model={"base_channels": 64},
                  image_shape=(1, 28, 28), batch_size=256, world_size=1,
                  options={"bf16": True, "channels_last": True, "cuda_graphs": True, "inductor": {"a": 1}})


def _other(**changes):
    import dataclasses
    return dataclasses.replace(KEY, **changes)


def test_the_digest_is_the_sha256_of_the_sorted_key_and_changes_with_every_field():
    expected = hashlib.sha256(json.dumps(KEY.to_dict(), sort_keys=True).encode()).hexdigest()[:20]
    assert KEY.digest == expected
    assert _other().digest == KEY.digest  # equal keys, equal files
    changed = [_other(torch="2.14.1"), _other(triton="3.8.0"), _other(triton=None), _other(device="NVIDIA H100"),
               _other(model={"base_channels": 32}), _other(image_shape=(3, 32, 32)), _other(batch_size=128),
               _other(world_size=2), _other(options={**KEY.options, "bf16": False}),
               _other(options={**KEY.options, "inductor": {"a": 2}})]
    assert len({k.digest for k in changed} | {KEY.digest}) == len(changed) + 1


def test_the_training_key_holds_what_the_compiled_step_depends_on():
    cfg = load_config("params.yaml", "gpu-fast", ["runtime.device=cpu"])
    options = compile_options(False)
    key = cc.training_cache_key(cfg, 1, torch.device("cpu"), False, options)
    assert key.torch == torch.__version__ and key.batch_size == 256
    assert key.device == f"cpu ({torch.get_num_threads()} threads)"  # inductor's CPU kernels depend on it
    threads = torch.get_num_threads()
    torch.set_num_threads(threads + 1)
    try:
        assert cc.training_cache_key(cfg, 1, torch.device("cpu"), False, options).digest != key.digest
    finally:
        torch.set_num_threads(threads)
    assert key.model == cfg.to_dict()["model"] and key.image_shape == (1, 28, 28)
    assert key.options == {"bf16": True, "channels_last": True, "cuda_graphs": False, "inductor": options}
    with cc.caching_dynamo_work(True):  # the file then holds Dynamo's work too: another key, tied to this Python
        dynamo = cc.training_cache_key(cfg, 1, torch.device("cpu"), False, options).options
    assert dynamo == {**key.options, "dynamo": True, "python": platform.python_version(), "cuda": torch.version.cuda}
    with cc.caching_dynamo_work(False):
        assert cc.training_cache_key(cfg, 1, torch.device("cpu"), False, options).digest == key.digest
    smaller = load_config("params.yaml", "gpu-fast", ["runtime.device=cpu", "train.batch_size=128"])
    assert cc.training_cache_key(smaller, 1, torch.device("cpu"), False, options).digest != key.digest
    longer = load_config("params.yaml", "gpu-fast", ["runtime.device=cpu", "train.steps=9000", "train.lr=0.001"])
    assert cc.training_cache_key(longer, 1, torch.device("cpu"), False, options).digest == key.digest


@pytest.fixture
def torch_loads(monkeypatch):
    """What torch.compiler.load_cache_artifacts was given, with torch's own answer for readable bytes."""
    given = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda payload: given.append(payload) or object())
    return given


def test_a_saved_artifact_is_loaded_by_the_next_run_of_its_key(tmp_path, monkeypatch, torch_loads, caplog):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled step", None))
    first = cc.CompileCache(tmp_path, KEY)
    assert first.load()["status"] == "missing"
    record = first.save()
    assert record["saved"] == str(tmp_path / f"{KEY.digest}.bin")
    header, payload = cc.read_cache_file(Path(record["saved"]))
    assert payload == b"compiled step" and header["key"] == KEY.to_dict()
    caplog.clear()  # where an earlier test set the level to INFO, the first run's lines are captured too
    with caplog.at_level(logging.INFO, logger="ddpm.compile_cache"):
        second = cc.CompileCache(tmp_path, KEY).load()
    assert second["status"] == "loaded" and second["file"] == record["saved"] and torch_loads == [b"compiled step"]
    assert len(caplog.records) == 1


def test_an_artifact_of_another_gpu_or_torch_is_not_loaded_and_the_log_says_what_differs(tmp_path, torch_loads,
                                                                                         caplog):
    cc.write_cache_file(tmp_path / f"{KEY.digest}.bin", KEY, b"compiled on an H200")
    here = _other(device="NVIDIA H100 80GB HBM3", torch="2.14.1")
    with caplog.at_level(logging.INFO, logger="ddpm.compile_cache"):
        record = cc.CompileCache(tmp_path, here).load()
    assert record["status"] == "mismatch" and record["file"] is None and torch_loads == []
    assert [r.levelname for r in caplog.records] == ["WARNING"]
    line = caplog.records[0].getMessage()
    assert "NVIDIA H200" in line and "NVIDIA H100 80GB HBM3" in line and "torch" in line and "compiling" in line
    # A file under this key's name that holds another key is refused too.
    (tmp_path / f"{here.digest}.bin").write_bytes((tmp_path / f"{KEY.digest}.bin").read_bytes())
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ddpm.compile_cache"):
        record = cc.CompileCache(tmp_path, here).load()
    assert record["status"] == "mismatch" and "device" in record["reason"] and torch_loads == []
    assert [r.levelname for r in caplog.records] == ["WARNING"]


@pytest.mark.parametrize("damage", ["truncated", "flipped", "header", "empty"])
def test_a_corrupt_artifact_falls_back_to_compiling_with_one_warning(tmp_path, torch_loads, caplog, damage):
    path = cc.write_cache_file(tmp_path / f"{KEY.digest}.bin", KEY, b"x" * 1000)
    data = path.read_bytes()
    path.write_bytes({"truncated": data[:-10], "flipped": data[:-1] + b"y", "header": b"garbage" + data,
                      "empty": b""}[damage])
    with caplog.at_level(logging.INFO):
        record = cc.CompileCache(tmp_path, KEY).load()
    assert record["status"] == "corrupt" and torch_loads == []
    assert [r.levelname for r in caplog.records] == ["WARNING"] and "compiling" in caplog.records[0].getMessage()


def test_bytes_with_a_sound_checksum_that_torch_cannot_read_fall_back_with_one_warning(tmp_path, caplog):
    cc.write_cache_file(tmp_path / f"{KEY.digest}.bin", KEY, b"not torch's serialization")
    with caplog.at_level(logging.INFO):
        record = cc.CompileCache(tmp_path, KEY).load()  # the real torch.compiler.load_cache_artifacts
    assert record["status"] == "corrupt" and "could not read" in record["reason"]
    assert [r.levelname for r in caplog.records] == ["WARNING"]  # torch's own traceback kept out of the log


def test_save_writes_once_and_never_over_the_file_it_loaded(tmp_path, monkeypatch, torch_loads):
    calls = []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: calls.append(1) or (b"v1", None))
    cache = cc.CompileCache(tmp_path, KEY)
    cache.load()
    cache.save()
    cache.save()
    assert calls == [1]
    loaded = cc.CompileCache(tmp_path, KEY)
    loaded.load()
    assert "saved" not in loaded.save() and calls == [1]
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: None)  # nothing was compiled
    assert "saved" not in cc.CompileCache(tmp_path / "other", KEY).save()
    assert not (tmp_path / "other").exists()


def test_artifacts_torch_cannot_save_are_one_log_line_not_a_stopped_run(tmp_path, monkeypatch, caplog):
    def fails():
        raise RuntimeError("Failed to save package to x: cannot pickle")

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", fails)
    with caplog.at_level(logging.WARNING, logger="ddpm.compile_cache"):
        cache = cc.CompileCache(tmp_path, KEY)
        record = cache.save()
        assert cache.save() is record  # tried once: not again, with another warning, at every checkpoint
    assert "saved" not in record and "cannot pickle" in record["reason"] and not any(tmp_path.iterdir())
    assert [r.getMessage() for r in caplog.records] == [
        f"compile cache: {record['reason']}; the next run compiles again"]


def test_ddpm_train_saves_at_its_first_checkpoint_and_the_next_run_loads_it(tmp_path, monkeypatch, torch_loads):
    """train.compile: the record of each run (for MLflow) and the file in <out_dir>/compile_cache/, which an
    --overwrite leaves in place. torch.compile itself is replaced by the model: the CPU would compile for minutes."""
    monkeypatch.setattr(train_mod, "load_images", lambda *a, **k: (
        torch.randint(0, 256, (16, 1, 28, 28), generator=torch.Generator().manual_seed(0), dtype=torch.uint8),
        torch.arange(16) % 10))
    monkeypatch.setattr(train_mod.torch, "compile", lambda net, **kwargs: net)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"the compiled step", None))
    cfg = load_config("params.yaml", "cpu", [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=2", "train.checkpoint_every=1",
        "train.compile=true", "diffusion.timesteps=20", "sampler.steps=2", "sample.num_images=2"])
    first = train_mod.train(cfg)
    folder = tmp_path / "run" / "compile_cache"
    assert first.compile_cache["status"] == "missing" and [p.name for p in folder.iterdir()] == [
        f"{first.compile_cache['key']}.bin"]
    assert first.compile_cache["saved"] == str(folder / f"{first.compile_cache['key']}.bin")
    second = train_mod.train(cfg, overwrite=True)
    assert second.compile_cache["status"] == "loaded" and torch_loads == [b"the compiled step"]
    assert "saved" not in second.compile_cache and folder.is_dir()


@pytest.mark.parametrize("asked", [False, True])
def test_train_cache_dynamo_trace_records_dynamo_s_work_during_the_run_only(tmp_path, monkeypatch, asked):
    monkeypatch.setattr(train_mod, "load_images", lambda *a, **k: (
        torch.zeros(8, 1, 28, 28, dtype=torch.uint8), torch.arange(8) % 10))
    seen = []  # caching_precompile at torch.compile and at the save (the first checkpoint)
    monkeypatch.setattr(train_mod.torch, "compile",
                        lambda net, **kwargs: seen.append(cc.dynamo_work_cached()) or net)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts",
                        lambda: seen.append(cc.dynamo_work_cached()) or (b"bytes", None))
    cfg = load_config("params.yaml", "cpu", [
        f"train.out_dir={tmp_path / 'run'}", "train.steps=1", "train.batch_size=2", "train.compile=true",
        f"train.cache_dynamo_trace={str(asked).lower()}", "diffusion.timesteps=20", "sampler.steps=2",
        "sample.num_images=2"])
    before = cc.dynamo_work_cached()
    record = train_mod.train(cfg).compile_cache
    assert seen == [asked and cc.dynamo_cache_available(1)] * 2
    assert cc.dynamo_work_cached() == before  # the setting is the run's, not the process's
    header, _ = cc.read_cache_file(Path(record["saved"]))
    assert header["key"]["options"].get("dynamo", False) is (asked and cc.dynamo_cache_available(1))


def test_dynamo_s_trace_is_cached_only_on_a_torch_whose_loaded_trace_runs():
    # 2.11 (the GPU machine's): a warm CUDA run that loaded the trace crashed in Dynamo
    assert not cc.dynamo_cache_available(1, "2.11.0+cu130")
    assert cc.dynamo_cache_available(1, "2.14.1+cu130") is hasattr(torch._dynamo.config, "caching_precompile")
    assert cc.dynamo_cache_available(1, "2.14.0a0+git1234") is cc.dynamo_cache_available(1, "2.15.0")
    assert not cc.dynamo_cache_available(2, "2.14.1")


_TINY_COMPILE = """
import json, sys, torch
from torch._dynamo.utils import counters
import ddpm.compile_cache as cc
key = cc.cache_key({"tiny": 1}, (4,), 4, 1, torch.device("cpu"), {})
cache = cc.CompileCache(sys.argv[1], key)
cache.load()
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
y = f(torch.arange(4.0))
cache.save()
print(json.dumps({"status": cache.record["status"], "hits": counters["inductor"]["fxgraph_cache_hit"],
                  "lookups": cache.record["lookups"], "y": y.tolist()}))
"""


def _fresh_process(code: str, arg: str, caches: Path) -> dict:
    """The last stdout line (JSON) of `code` run with `arg` in a new process whose inductor and triton caches are
    the folders under `caches` (empty unless an earlier process used them)."""
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(caches / "inductor"), "OMP_NUM_THREADS": "1",
           "TRITON_CACHE_DIR": str(caches / "triton"), "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-c", code, arg], env=env, cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_a_real_cpu_compile_is_served_from_the_artifact_in_a_fresh_process(tmp_path):
    # each process with empty inductor and triton caches of its own
    runs = [_fresh_process(_TINY_COMPILE, str(tmp_path / "cache"), caches=tmp_path / f"caches{i}") for i in range(2)]
    assert runs[0]["status"] == "missing" and runs[0]["hits"] == 0
    assert runs[1]["status"] == "loaded" and runs[1]["hits"] > 0
    # the record's lookups: the first process compiled its graph, the second was served it
    assert runs[0]["lookups"]["fx_graph_miss"] > 0 and runs[0]["lookups"]["fx_graph_hit"] == 0
    assert runs[1]["lookups"]["fx_graph_hit"] == runs[1]["hits"] and runs[1]["lookups"]["fx_graph_miss"] == 0
    assert runs[0]["y"] == runs[1]["y"] == pytest.approx([1.0, 2.682942, 2.818595, 1.28224])  # 2 sin(x) + 1


_TINY_MODULE_COMPILE = """
import json, sys, torch
from torch._dynamo.utils import counters
import ddpm.compile_cache as cc
torch.manual_seed(0)
net = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.SiLU(), torch.nn.Linear(8, 1))
key = cc.cache_key({"tiny": 2}, (4,), 3, 1, torch.device("cpu"), {})
with cc.caching_dynamo_work(cc.dynamo_cache_available(1)):
    cache = cc.CompileCache(sys.argv[1], key)
    cache.load()
    f = torch.compile(net)
    loss = f(torch.arange(12.0).view(3, 4)).square().mean()
    loss.backward()
    cache.save()
print(json.dumps({"status": cache.record["status"], "lookups": cache.record["lookups"], "loss": loss.item(),
                  "grad": net[0].weight.grad.sum().item()}))
"""


@pytest.mark.slow
@pytest.mark.skipif(not cc.dynamo_cache_available(1), reason="this torch has no caching_precompile")
def test_a_loaded_artifact_spares_the_next_process_dynamo_s_trace(tmp_path):
    def run(i: int) -> tuple[dict, str]:
        root = Path(__file__).resolve().parents[1]
        env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / f"c{i}" / "inductor"), "OMP_NUM_THREADS": "1",
               "TRITON_CACHE_DIR": str(tmp_path / f"c{i}" / "triton"), "PYTHONPATH": str(root)}
        done = subprocess.run([sys.executable, "-c", _TINY_MODULE_COMPILE, str(tmp_path / "cache")], env=env,
                              cwd=root, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return json.loads(done.stdout.strip().splitlines()[-1]), done.stderr

    (first, first_err), (second, _) = run(0), run(1)
    assert first["status"] == "missing" and first["lookups"]["dynamo_miss"] == 1
    assert second["status"] == "loaded" and second["lookups"]["dynamo_hit"] == 1
    assert second["lookups"]["dynamo_miss"] == 0 and second["lookups"]["fx_graph_miss"] == 0
    assert second["lookups"]["dynamo_traced"] == 0 and second["lookups"]["aot_autograd_miss"] == 0  # nothing traced
    assert (second["loss"], second["grad"]) == (first["loss"], first["grad"])  # the same compiled step
    assert "is dropped with caching_precompile" not in first_err  # torch's line per saved-away guard is quiet


_CHANNELS_LAST_STEP = """
import json, sys, torch
from torch._dynamo.utils import counters
from ddpm.layers import channels_last_grad
from ddpm.train_compile import cache_graphs_with_autograd_functions
if sys.argv[1] == "allowed":
    cache_graphs_with_autograd_functions()
torch.manual_seed(0)
conv = torch.nn.Conv2d(8, 8, 3, padding=1).to(memory_format=torch.channels_last)
f = torch.compile(lambda x: conv(channels_last_grad(x)).square().mean())
x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
f(x).backward()
print(json.dumps({k: v for k, v in counters["aot_autograd"].items() if k.startswith("autograd_cache")}))
"""


@pytest.mark.slow
def test_a_channels_last_training_step_is_kept_in_aot_autograd_s_cache(tmp_path):
    """channels_last_grad is a torch.autograd.Function, for which torch bypasses AOTAutograd's cache by default;
    with training's setting the second process (the same inductor cache folder) is served from that cache."""
    def run(mode: str, folder: str) -> dict:
        return _fresh_process(_CHANNELS_LAST_STEP, mode, caches=tmp_path / folder)

    assert run("default", "bypassed") == {"autograd_cache_bypass": 1}
    assert run("allowed", "kept") == {"autograd_cache_miss": 1, "autograd_cache_saved": 1}
    assert run("allowed", "kept") == {"autograd_cache_hit": 1}

