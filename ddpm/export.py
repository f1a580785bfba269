"""Export the EMA U-Net to ONNX, prove it computes what PyTorch computes, and gate it on samples.

`export_onnx` writes a float32 model (with `export.fp16`, also a float16 twin `<name>.fp16.onnx`;
with `export.int8`, an int8 twin `<name>.int8.onnx` for the CPU, see ddpm.quantize) whose metadata
(key "ddpm", JSON) holds everything `ddpm.onnx_sampler` needs. Nothing reaches
`out_path` before onnx.checker and the parity check against PyTorch pass, and every file is written
and fsynced in a temporary folder beside it before the first rename, so a full disk leaves the
previous export as it was. The export gate (ddpm.export_check.gate_export: the sample check of
onnxruntime against PyTorch from the same x_T, with its FID margins) runs on the files in the
temporary folder when a `gate` is given, as `ddpm export` and the pipeline give it, so a rejected
export never reaches `out_path`.

Graph: inputs x float32 [B, C, H, W], t int64 [B] (indices in [0, T-1]), labels int64 [B] (only
for class-conditional models; label num_classes is the null class); output "output" float32
[B, C, H, W], the network's prediction of kind metadata["diffusion"]["prediction"]. B is dynamic.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import onnx
import torch
from torch import nn

from ddpm.checkpoint import load_model
from ddpm.config import Config, DiffusionConfig, ExportConfig, SamplerConfig, image_shape
from ddpm.errors import ExportRejected, OnnxModelError
from ddpm.export_check import check_export  # noqa: F401 (re-exported: the gate of an export)
from ddpm.onnx_model import METADATA_KEY, METADATA_VERSION, OnnxDenoiser, no_spin_options
from ddpm.quantize import calibration_feeds, int8_check, int8_path, int8_scheme_record, quantize_int8
from ddpm.run_folder import owned

log = logging.getLogger(__name__)
OUTPUT_NAME = "output"
PARITY_BATCHES = (1, 3, 64)
EXTERNAL_DATA_BYTES = 1 << 30  # above this, weights go to `<name>.data` beside the model (protobuf's limit is 2 GiB)


class _Unconditional(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.net(x, t)


class _Conditional(_Unconditional):
    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.net(x, t, labels)


def fp16_path(out_path: str | Path) -> Path:
    """model.onnx -> model.fp16.onnx"""
    p = Path(out_path)
    return p.with_name(f"{p.stem}.fp16{p.suffix}")


def export_metadata(cfg: Config, ckpt: dict[str, Any], checkpoint: Path, num_classes: int,
                    sampler: SamplerConfig) -> dict[str, Any]:
    """What a sampler needs, beside the weights: the schedule, the image shape and the labels; and the DDIM
    settings the export was checked with (a student's own step count; at most T steps), a sampler's defaults."""
    return {
        "format": METADATA_VERSION,
        "diffusion": dict(cfg.to_dict()["diffusion"]),
        "image_shape": list(image_shape(cfg)),
        "dataset": cfg.data.dataset,
        "class_conditional": cfg.model.class_conditional,
        "num_classes": num_classes,  # also the null label, used for classifier-free guidance
        "step": int(ckpt["step"]),
        "weights": "ema" if ckpt.get("ema") is not None else "model",
        "model": cfg.to_dict()["model"],
        "checkpoint_sha256": _sha256(checkpoint),
        "inputs": ["x", "t", "labels"] if cfg.model.class_conditional else ["x", "t"],
        "output": OUTPUT_NAME,
        "precision": "float32",
        "sampler": recorded_sampler(cfg.diffusion, sampler),
    }


def recorded_sampler(diffusion: DiffusionConfig, sampler: SamplerConfig) -> dict[str, Any]:
    """The DDIM settings an export is checked with and records: a student's own steps, else sampler.steps (at most
    T, every timestep), its eta and guidance scale."""
    steps = diffusion.distilled_steps or min(sampler.steps, diffusion.timesteps)
    return {"steps": steps, "eta": sampler.eta, "guidance_scale": sampler.guidance_scale}


Gate = Callable[[Path, bool], dict[str, Any]]  # (model file, is the int8 twin) -> its check; ExportRejected if not


def export_onnx(checkpoint: str | Path, out_path: str | Path, cfg: ExportConfig, sampler: SamplerConfig | None = None,
                gate: Gate | None = None) -> Path:
    """Export the checkpoint's EMA U-Net to `out_path` (and `<name>.fp16.onnx` with cfg.fp16, `<name>.int8.onnx`
    with cfg.int8); returns out_path. `sampler` (None: the defaults): the DDIM steps of int8 calibration and
    of the int8 twin's check, and the sampling settings the metadata records (`ddpm onnx-sample`'s defaults).
    `gate`: called on the float32 model, then on the int8 twin when one is written, before anything is renamed
    into place; its ExportRejected rejects the whole export.

    Raises ExportRejected, with the measured difference, when onnxruntime and PyTorch disagree by
    more than cfg.parity_atol (float32) or cfg.fp16_atol (float16); then no model is left at out_path.
    The int8 twin is optional: when its scheme cannot run on this CPU or its DDIM samples differ from
    the float32 model's by more than cfg.int8_mean_atol on average (int8_check), it is not written, a
    warning says why, and the float32 model's metadata records it under "int8" (written, scheme, reason).
    Raises OSError (its errno kept, out_path named) when a file cannot be written, e.g. the disk is
    full; then the files at out_path are those of before. Every file is written and fsynced before the
    first rename; a crash between the renames themselves (power loss, SIGKILL) can leave a new float16
    or int8 twin, or a new external-weights file of a model over 1 GiB, beside the old model: export again.
    The folder of out_path is held for the export (ddpm.run_folder.owned).
    """
    with owned(Path(out_path).parent, "ddpm export"):
        return _export_onnx(Path(checkpoint), Path(out_path), cfg, sampler or SamplerConfig(), gate)


def _export_onnx(checkpoint: Path, out: Path, cfg: ExportConfig, sampler: SamplerConfig, gate: Gate | None) -> Path:
    model, full_cfg, ckpt = load_model(checkpoint, "cpu", use_ema=True)
    meta = export_metadata(full_cfg, ckpt, checkpoint, model.num_classes, sampler)
    out.parent.mkdir(parents=True, exist_ok=True)
    for stale in out.parent.glob(f".{out.name}.tmp-*"):  # a killed export's: the folder's lock is ours now
        if stale.is_dir() and not stale.is_symlink():
            log.warning("removing %s, left by an export that was killed", stale)
            shutil.rmtree(stale, ignore_errors=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.tmp-") as tmp_dir:
        tmp = Path(tmp_dir)
        proto = _to_onnx(model, full_cfg, cfg)
        try:
            written = [_save(proto, tmp / out.name, meta, cfg.model_name)]
            worst = parity_check(tmp / out.name, model, atol=cfg.parity_atol)
            log.info("float32 parity with PyTorch: max |diff| %.3g (atol %.3g)", worst, cfg.parity_atol)
            meta["parity_max_abs_diff"] = worst
            if cfg.fp16:
                half = _to_fp16(proto)
                meta16 = {**meta, "precision": "float16", "io_dtype": "float32", "parity_max_abs_diff": None}
                written.append(_save(half, tmp / fp16_path(out).name, meta16, cfg.model_name))
                worst16 = parity_check(tmp / fp16_path(out).name, model, atol=cfg.fp16_atol)
                log.info("float16 parity with PyTorch float32: max |diff| %.3g (atol %.3g)", worst16, cfg.fp16_atol)
                written[-1] = _save(half, tmp / fp16_path(out).name, {**meta16, "parity_max_abs_diff": worst16},
                                    cfg.model_name)
            if cfg.int8:
                if twin := _int8_twin(tmp / out.name, tmp / int8_path(out).name, meta, cfg, meta["sampler"]["steps"]):
                    written.append(twin)
            written[0] = _save(proto, tmp / out.name, meta, cfg.model_name)  # with the measured figure
            if gate is not None:
                _run_gate(gate, tmp, out, meta.get("int8", {}).get("written", False))
            for f in (f for files in written for f in files):
                _fsync(f)  # a full disk shows here at the latest, before anything at out_path is replaced
        except ExportRejected:
            remove_export(out)  # a stale model must not pass for this checkpoint's export
            raise
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror or exc} while writing the ONNX export {out}; "
                                     f"no file in {out.parent} was replaced") from exc
        for files in reversed(written):  # the float32 model, which the pipeline tracks, last
            _commit(files, out.parent)
    for wanted, twin in ((cfg.fp16, fp16_path(out)), (meta.get("int8", {}).get("written", False), int8_path(out))):
        if not wanted:
            _remove_model(twin)  # a twin left by an earlier export is not this checkpoint's
    _fsync_dir(out.parent)  # make the renames durable
    return out


def _run_gate(gate: Gate, tmp: Path, out: Path, int8: bool) -> None:
    """`gate` on the float32 model and the int8 twin in `tmp`; its rejection names the files at `out`."""
    for name, is_int8 in [(out.name, False)] + ([(int8_path(out).name, True)] if int8 else []):
        try:
            gate(tmp / name, is_int8)
        except ExportRejected as exc:
            raise ExportRejected(str(exc).replace(str(tmp / name), str(out.parent / name))) from None


def _int8_twin(fp32: Path, dest: Path, meta: dict[str, Any], cfg: ExportConfig, steps: int) -> list[Path]:
    """Quantize the float32 model at `fp32` to `dest` (ddpm.quantize), check it (int8_check), save it with its
    metadata; returns its files, or none when the scheme cannot run on this CPU or the twin fails its gate.

    The float32 export does not depend on the twin: a twin that is refused is logged as one warning line,
    no int8 file is written, and meta["int8"] (the float32 model's metadata) says why."""
    try:
        scheme = int8_scheme_record(cfg.int8_scheme)
        den32 = OnnxDenoiser(fp32, "cpu", session_options=no_spin_options())
        feeds = calibration_feeds(den32, cfg.int8_calibration_images, steps)
        with _quiet("root"):  # onnxruntime.quantization warns through the root logger (per-channel axes, ...)
            quantize_int8(fp32, dest, feeds, cfg.int8_scheme)
        log.info("int8 (%s scheme): convolutions quantized, calibrated on %d calls (%d images, DDIM-%d)",
                 cfg.int8_scheme, len(feeds), cfg.int8_calibration_images, steps)
        check = int8_check(den32, OnnxDenoiser(dest, "cpu", session_options=no_spin_options()),
                           n=cfg.check_samples, steps=steps, mean_atol=cfg.int8_mean_atol)
    except ExportRejected as exc:
        dest.unlink(missing_ok=True)
        log.warning("int8 twin not written, the float32 export goes on: %s", exc)
        meta["int8"] = {"written": False, "scheme": cfg.int8_scheme, "reason": str(exc)}
        return []
    log.info("int8 DDIM-%d samples vs float32: mean |diff| %.3g (allowed %.3g), max %.3g", steps,
             check["mean_abs_diff"], cfg.int8_mean_atol, check["max_abs_diff"])
    calibration = {"images": cfg.int8_calibration_images, "ddim_steps": steps,
                   "calls": len(feeds)}
    meta8 = {**meta, "precision": "int8", "parity_max_abs_diff": None, "int8_calibration": calibration,
             "int8_scheme": scheme, "int8_check": check}
    meta["int8"] = {"written": True, "scheme": cfg.int8_scheme, "file": dest.name}
    return _save(onnx.load(str(dest)), dest, meta8, cfg.model_name)


def _to_onnx(model: nn.Module, cfg: Config, ecfg: ExportConfig) -> onnx.ModelProto:
    c, h, w = image_shape(cfg)
    conditional = cfg.model.class_conditional
    wrapper = (_Conditional if conditional else _Unconditional)(model).eval()
    # Batch 2 as the example: torch.export specialises a dimension whose example size is 1.
    args: tuple[torch.Tensor, ...] = (torch.randn(2, c, h, w), torch.tensor([0, 1]))
    names = ["x", "t"]
    if conditional:
        args, names = args + (torch.tensor([0, model.num_classes]),), names + ["labels"]
    batch = torch.export.Dim("batch")
    with warnings.catch_warnings(), _quiet("onnxscript", "onnx_ir", "torch.onnx"):
        warnings.filterwarnings("ignore", message=".*axis name.*")  # x, t and labels share the batch axis
        program = torch.onnx.export(wrapper, args, dynamo=True, verbose=False, opset_version=ecfg.opset,
                                    input_names=names, output_names=[OUTPUT_NAME],
                                    dynamic_shapes={n: {0: batch} for n in names})
    if program is None:
        raise ExportRejected("torch.onnx.export returned no program")
    return program.model_proto


@contextlib.contextmanager
def _quiet(*loggers: str) -> Iterator[None]:
    """The exporter's optimiser logs every pass at INFO; keep the CLI's log readable."""
    saved = {name: logging.getLogger(name).level for name in loggers}
    for name in loggers:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        for name, level in saved.items():
            logging.getLogger(name).setLevel(level)


def _save(proto: onnx.ModelProto, path: Path, meta: dict[str, Any], name: str) -> list[Path]:
    """Write `proto` with `meta` to `path` (weights beside it when large), run onnx.checker; returns the files."""
    del proto.metadata_props[:]
    proto.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))
    proto.graph.name = name
    files = [path]
    weight_bytes = sum(len(t.raw_data) for t in proto.graph.initializer)
    if weight_bytes > EXTERNAL_DATA_BYTES:
        data = path.with_name(path.name + ".data")
        data.unlink(missing_ok=True)
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        files.insert(0, data)  # moved first, so that the model never points to a missing file
        onnx.load_external_data_for_model(proto, str(path.parent))
    else:
        onnx.save_model(proto, str(path))
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportRejected(f"onnx.checker rejected the exported model: {str(exc).splitlines()[0]}") from None
    return files


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _commit(files: list[Path], dest_dir: Path) -> None:
    """Move fsynced files (data first, the model last) from the temporary folder into dest_dir, each by one rename."""
    for f in files:
        os.replace(f, dest_dir / f.name)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def remove_export(out_path: str | Path) -> None:
    """Delete an export's files: the model, its float16 and int8 twins and their external data."""
    for p in (Path(out_path), fp16_path(out_path), int8_path(out_path)):
        _remove_model(p)


def _remove_model(path: Path) -> None:
    path.unlink(missing_ok=True)
    path.with_name(path.name + ".data").unlink(missing_ok=True)


def _to_fp16(proto: onnx.ModelProto, shape_inference: bool = True) -> onnx.ModelProto:
    """Float16 weights and arithmetic, float32 inputs and output; the timestep embedding stays float32.

    sin/cos of t * freq with t up to 999 would lose up to 0.25 rad in float16 (its spacing is 0.5
    there), so every node computed from t alone (cast, scaling, sin, cos, concat) is kept in float32.
    `shape_inference=False` skips onnx's shape inference, which fails on graphs with onnxruntime's
    com.microsoft ops (docs/experiments/2026-11-26-onnxruntime-cuda-fusions.md).
    """
    from onnxruntime.transformers.float16 import convert_float_to_float16  # ships with onnxruntime
    from onnxruntime.transformers.onnx_model import OnnxModel

    block = _nodes_from_only(proto.graph, "t")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        half = convert_float_to_float16(onnx.ModelProto.FromString(proto.SerializeToString()), keep_io_types=True,
                                        node_block_list=block, disable_shape_infer=not shape_inference)
    # The converter gives an initializer shared by several blocked nodes one Cast per use, all with
    # the same output name (not SSA): keep the first of identical nodes.
    seen, nodes = set(), []
    for node in half.graph.node:
        key = node.SerializeToString(deterministic=True)
        if key not in seen:
            seen.add(key)
            nodes.append(node)
    del half.graph.node[:]
    half.graph.node.extend(nodes)
    del half.graph.value_info[:]  # intermediate type annotations, some stale after conversion; the checker re-infers
    wrapped = OnnxModel(half)
    wrapped.topological_sort()  # the converter appends its Cast nodes at the end of the graph
    return wrapped.model


def _nodes_from_only(graph: onnx.GraphProto, source: str) -> list[str]:
    """Names of the nodes whose inputs all derive from `source` and constants (the first with `source` among them)."""
    constant = {i.name for i in graph.initializer} | {""}
    derived, names = {source}, []
    for node in graph.node:  # topologically sorted
        ins = set(node.input)
        if not ins:
            constant.update(node.output)
        elif ins <= derived | constant and ins & derived:
            derived.update(node.output)
            names.append(node.name)
        elif ins <= constant:
            constant.update(node.output)
    return names


@torch.no_grad()
def parity_check(onnx_path: Path, model: nn.Module, atol: float, seed: int = 0) -> float:
    """Max |onnxruntime CPU - PyTorch float32| over random x at batch 1, 3 and 64 and t = 0, T/2, T-1 (and mixed t).

    Raises ExportRejected when it exceeds `atol`; returns it otherwise.
    """
    try:
        den = OnnxDenoiser(onnx_path, "cpu", session_options=no_spin_options())
    except OnnxModelError as exc:
        raise ExportRejected(f"onnxruntime cannot run the exported model: {exc}") from None
    T = den.schedule.num_timesteps
    rng = np.random.default_rng(seed)
    cases = []  # (x, t, labels, where)
    for b in PARITY_BATCHES:
        x = rng.standard_normal((b, *den.image_shape), dtype=np.float32)
        for t in [np.full(b, v, np.int64) for v in sorted({0, T // 2, T - 1})] + [rng.integers(0, T, b)]:
            labels = rng.integers(0, den.num_classes + 1, b) if den.class_conditional else None
            cases.append((x, t, labels, f"batch {b}, t {int(t[0]) if len(set(t.tolist())) == 1 else 'mixed'}"))
    # All PyTorch runs, then all onnxruntime runs: interleaved, their thread pools slow each other down.
    refs = [model(torch.from_numpy(x), torch.from_numpy(t), None if y is None else torch.from_numpy(y)).numpy()
            for x, t, y, _ in cases]
    worst, where = 0.0, ""
    for (x, t, y, case), ref in zip(cases, refs):
        diff = float(np.abs(den(x, t, y).astype(np.float64) - ref).max())
        if not np.isfinite(diff) or diff > worst:
            worst, where = diff, case
    if not worst <= atol:
        raise ExportRejected(f"{onnx_path.name}: onnxruntime and PyTorch differ by {worst:.3g} (at {where}), "
                             f"more than the allowed {atol:.3g}; the model was not written")
    return worst


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
