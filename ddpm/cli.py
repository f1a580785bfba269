"""The `ddpm` command line: data, train, distill, sample, evaluate, export, onnx-sample, web.

Settings come from params.yaml (`--params`), an optional profile (`--profile gpu`) and overrides
given as `section.key=value` arguments, e.g. `ddpm train train.steps=500 model.base_channels=32`.
Heavy imports happen inside each command so that `ddpm onnx-sample` runs without torch.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable


log = logging.getLogger(__name__)


def _add_settings(p: argparse.ArgumentParser) -> None:
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="override a setting of params.yaml, e.g. train.steps=500")
    p.add_argument("--params", default="params.yaml", help="settings file (default: %(default)s)")
    p.add_argument("--profile", default=None, help="a profile of params.yaml to apply, e.g. cpu or gpu")


def _config(args: argparse.Namespace):
    from ddpm.config import load_config
    params = args.params if Path(args.params).exists() or args.params != "params.yaml" else None
    return load_config(params, args.profile, args.overrides)


def _run_paths(args: argparse.Namespace, cfg, **defaults: Callable[[Any], Path]) -> None:
    """Set each path argument that the user left out to its path in the run of train.out_dir:
    `defaults` maps the argument's name to that path's place in the run's ddpm.layout.RunLayout."""
    from ddpm.layout import RunLayout
    layout = RunLayout(cfg.train.out_dir)
    for name, place in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, str(place(layout)))


def _check_feature_net(setting: str, dataset: str) -> None:
    """Before any work: a --feature-net path must name a file (the pipeline's setting trains a missing one there on
    purpose, but on the command line a mistyped path would train a new net and score with it), and the net
    that exists must load (a shipped one: its pin)."""
    from ddpm.errors import ConfigError
    from ddpm.feature_pins import PINNED, RETRAIN, resolve_feature_net
    from ddpm.features import read_feature_checkpoint
    path = resolve_feature_net(setting, dataset)
    if path.is_file():
        read_feature_checkpoint(path)
    elif setting not in (PINNED, RETRAIN):
        raise ConfigError(f"--feature-net: {path} is not a file; pass an existing feature net, {PINNED} (the "
                          f"shipped one) or {RETRAIN} (trains runs/features/{dataset}.pt on first use)")


def _scoring_settings(cfg: Any, checkpoint: str, feature_net: str, required: bool = True) -> Any:
    """`cfg` for scoring the checkpoint's samples (`ddpm evaluate`, the gate of `ddpm export`), before any folder is
    made: the dataset it was trained on (ddpm.evaluate.scored_on), a student's own sampler, and the feature net
    checked. A missing checkpoint is CheckpointError's one line unless the command can do without it (not
    `required`: an ONNX model is scored), when cfg is taken as it is."""
    from ddpm.checkpoint import config_of, load_checkpoint
    from ddpm.evaluate import scored_on
    from ddpm.generate import student_sampling
    if required or Path(checkpoint).is_file():
        trained = config_of(load_checkpoint(checkpoint), checkpoint)
        cfg = student_sampling(scored_on(trained.data.dataset, cfg), trained.diffusion.distilled_steps)
    _check_feature_net(feature_net, cfg.data.dataset)
    return cfg


def cmd_data(args: argparse.Namespace) -> int:
    from ddpm.data import fetch_dataset
    cfg = _config(args)
    path = fetch_dataset(cfg.data.dataset, cfg.data.root)
    print(f"{cfg.data.dataset}: verified files in {path}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _config(args)
    if cfg.train.nproc > 1 and "WORLD_SIZE" not in os.environ:
        # Relaunch this same command under torchrun, one process per GPU.
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={cfg.train.nproc}",
               "-m", "ddpm.cli", "train", "--params", args.params,
               *(["--profile", args.profile] if args.profile else []),
               *(["--resume"] if args.resume else []), *(["--overwrite"] if args.overwrite else []), *args.overrides]
        return subprocess.call(cmd)
    from ddpm.train import train
    result = train(cfg, resume=args.resume, overwrite=args.overwrite)
    if int(os.environ.get("RANK", "0")) != 0:
        return 0
    from ddpm.layout import RunLayout
    if result.steps_run == 0:
        print(f"{cfg.train.out_dir} is at step {result.step} already (train.steps={cfg.train.steps}): nothing to "
              f"train; raise train.steps to continue it. Checkpoint {result.checkpoint}")
        return 0
    print(f"trained to step {result.step}: loss {result.loss:.4f}, {result.images_per_sec:,.0f} img/s; "
          f"checkpoint {result.checkpoint}; samples {RunLayout(cfg.train.out_dir).samples_final}")
    return 0


def cmd_distill(args: argparse.Namespace) -> int:
    from ddpm.distill import distill
    cfg = _config(args)
    _run_paths(args, cfg, checkpoint=lambda run: run.checkpoint)
    result = distill(cfg, args.checkpoint, resume=args.resume, overwrite=args.overwrite)
    for r in result.rounds:
        print(f"{r.steps} steps: {'kept' if r.skipped else f'loss {r.loss:.4f}, {r.seconds:.0f} s'}; {r.checkpoint}")
    print(f"student ({cfg.distill.steps} DDIM steps): {result.student}; sample it with "
          f"`ddpm sample --checkpoint {result.student}`")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from ddpm.checkpoint import load_model
    from ddpm.config import check_section_values, config_from_dict
    from ddpm.generate import generate, save_array, save_grid, student_sampling
    from ddpm.layout import SampleFiles
    from ddpm.run_folder import check_writable
    from ddpm.schedule import Schedule
    from ddpm.train import resolve_device

    settings = _config(args)
    _run_paths(args, settings, checkpoint=lambda run: run.checkpoint)
    asked = {"sampler": dict(name=args.sampler, steps=args.steps, eta=args.eta, guidance_scale=args.guidance),
             "sample": dict(num_images=args.num_images, seed=args.seed, label=args.label)}
    given = {section: {k: v for k, v in values.items() if v is not None} for section, values in asked.items()}
    for section, values in given.items():  # each value in its range; those that need the model, once loaded
        check_section_values(section, values)
    check_writable(args.out)  # before the model is loaded or an image sampled
    device = resolve_device(args.device or settings.runtime.device)
    model, cfg, ckpt = load_model(args.checkpoint, device)
    log.info("loaded %s (step %d) on %s", args.checkpoint, ckpt["step"], device)
    # A student samples with its own steps unless asked otherwise (then refused).
    ours = student_sampling(settings, cfg.diffusion.distilled_steps).to_dict()
    for section, values in given.items():
        ours[section].update(values)
    from ddpm.schedule_math import check_options_apply
    check_options_apply(ours["sampler"]["name"], args.steps, args.guidance, cfg.model.class_conditional, args.eta)
    # The sampling settings, validated again against the checkpoint's own model and diffusion.
    full = config_from_dict({**cfg.to_dict(), **{k: ours[k] for k in ("sampler", "runtime", "sample")}})
    sc, sp = full.sample, full.sampler
    from ddpm.aot_package import choose_package
    from ddpm.generate import samples_in_bf16
    network, used = choose_package(args.aot, args.checkpoint, device, samples_in_bf16(full, device))
    images, labels = generate(model, Schedule.from_config(cfg.diffusion), full, sc.num_images, seed=sc.seed,
                              network=network)
    log.info("sampled %d images; writing them", len(images))
    out = SampleFiles(args.out)
    grid, arr = save_grid(images, out.grid), save_array(images, labels, out.array)
    print(f"{len(images)} images ({sp.name}, {sp.steps if sp.name == 'ddim' else cfg.diffusion.timesteps} steps, "
          f"seed {sc.seed}{'' if sc.label is None else f', label {sc.label}'}, "
          f"{used.get('package') or 'eager network'}) -> {grid} and {arr}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ddpm.evaluate import evaluate_checkpoint
    from ddpm.layout import EvalFiles
    cfg = _config(args)
    _run_paths(args, cfg, checkpoint=lambda run: run.checkpoint, out=lambda run: run.eval.folder)
    cfg = _scoring_settings(cfg, args.checkpoint, args.feature_net,
                            required=args.onnx is None and cfg.evaluate.backend != "onnx")
    metrics = evaluate_checkpoint(args.checkpoint, cfg, out_dir=args.out, onnx_model=args.onnx,
                                  feature_net=args.feature_net, aot=args.aot)
    for k, v in metrics.items():
        print(f"{k}: {v}")
    files = EvalFiles(args.out)
    print(f"-> {files.metrics}, {files.timings}, {files.samples} and {files.nearest}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from ddpm.evaluate import fid_score
    from ddpm.export import export_onnx
    from ddpm.export_check import gate_export
    cfg = _config(args)
    _run_paths(args, cfg, checkpoint=lambda run: run.checkpoint, out=lambda run: run.onnx_model)
    cfg = _scoring_settings(cfg, args.checkpoint, args.feature_net)
    checks: list[tuple[bool, dict]] = []

    def gate(model: Path, int8: bool) -> dict:
        checks.append((int8, gate_export(model, args.checkpoint, cfg, fid_score(cfg, args.feature_net), int8=int8)))
        return checks[-1][1]

    path = export_onnx(args.checkpoint, args.out, cfg.export, cfg.sampler, gate=gate)
    print(f"exported {path}")
    for int8, check in checks:
        print(f"{'int8 twin' if int8 else 'model'} accepted: {check['n']} DDIM-{check['steps']} samples, max |diff| "
              f"{check['max_abs_diff']:.3g}, FID {check['score_onnx']:.4g} (onnxruntime) vs {check['score_torch']:.4g}")
    from ddpm.aot_package import export_package, package_path
    aot = export_package(args.checkpoint, package_path(path), cfg)
    if aot["written"]:  # else export_package has logged why, unless export.aot is off
        print(f"exported {aot['file']} (the sampling network compiled for {aot['machine']['device']})")
    if cfg.export.int8:
        from ddpm.quantize import int8_path
        if int8_path(path).is_file():
            print(f"exported {int8_path(path)} (int8 convolutions, {cfg.export.int8_scheme} scheme, for onnxruntime "
                  f"on the CPU)")
        else:
            print(f"no int8 twin was written (see the warning above); {path} is complete without it")
    return 0


def cmd_onnx_sample(args: argparse.Namespace) -> int:
    from ddpm.onnx_sampler import main as onnx_main
    if args.model is None:
        args = argparse.Namespace(**{**vars(args), "model": _default_onnx_model(args.params)})
    elif args.model.startswith("models:/"):
        from ddpm.schedule_math import check_options_apply
        check_options_apply(args.sampler, args.steps, None, True, args.eta)  # before a download: it needs no model
        # The resolver lives with the pipeline's MLflow code; ddpm itself never imports MLflow.
        from flows.registry import fetch_onnx
        found = fetch_onnx(args.model, args.params, cache=args.cache)
        print(f"{args.model}: version {found.version} of {found.name!r} in {found.store} -> {found.path}")
        args = argparse.Namespace(**{**vars(args), "model": str(found.path)})
    return onnx_main(args)


def cmd_web(args: argparse.Namespace) -> int:
    from ddpm.web import main as web_main
    model = args.model
    if args.registered:
        from flows.registry import fetch_onnx  # as for onnx-sample: ddpm itself never imports MLflow
        found = fetch_onnx(f"models:/{args.registered}", args.params, cache=args.cache)
        print(f"{args.registered}: version {found.version} of {found.name!r} in {found.store} -> {found.path}")
        model = str(found.path)
    return web_main(_default_onnx_model(args.params) if model is None else model, args.port)


def _default_onnx_model(params: str) -> str:
    """<train.out_dir>/model.onnx of the settings in `params` (the embedded defaults where the default
    params.yaml is absent)."""
    from ddpm.config import load_config
    from ddpm.layout import RunLayout
    path = params if Path(params).exists() or params != "params.yaml" else None
    return str(RunLayout(load_config(path).train.out_dir).onnx_model)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ddpm", description="Train and sample a DDPM on small images.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("data", help="fetch and verify the dataset (SHA-256 pinned)")
    _add_settings(p)
    p.set_defaults(func=cmd_data)

    p = sub.add_parser("train", help="train the U-Net; writes checkpoint.pt, loss.csv and sample grids")
    _add_settings(p)
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="continue from the checkpoint in train.out_dir; settings that change the model, the "
                            "diffusion or the data are refused, other changes are logged")
    again.add_argument("--overwrite", action="store_true",
                       help="start over in a train.out_dir that holds a run; its files (checkpoint.pt, loss.csv, "
                            "config.yaml, samples_*.png) and what was made from them (eval/, model.onnx, export.json, "
                            "distill/, ...) move to <out_dir>.replaced-<UTC time>/")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("distill", help="progressive distillation of a trained checkpoint into a few-step student "
                                       "(settings: the distill block); writes <train.out_dir>/distill/")
    _add_settings(p)
    p.add_argument("--checkpoint", default=None, help="the teacher (default: <train.out_dir>/checkpoint.pt)")
    again = p.add_mutually_exclusive_group()
    again.add_argument("--resume", action="store_true",
                       help="keep the finished rounds of the same teacher and continue an interrupted one")
    again.add_argument("--overwrite", action="store_true",
                       help="distil every round again; each round's previous files move to "
                            "<round>.replaced-<UTC time>/")
    p.set_defaults(func=cmd_distill)
    _add_torch_sampling_parsers(sub)
    _add_onnx_parsers(sub)
    return parser


def _add_torch_sampling_parsers(sub: Any) -> None:
    """`ddpm sample`, `ddpm evaluate` and `ddpm export`: the commands that load a checkpoint."""
    p = sub.add_parser("sample", help="sample images from a checkpoint: a PNG grid and an .npz array")
    _add_settings(p)
    p.add_argument("--checkpoint", default=None, help="(default: <train.out_dir>/checkpoint.pt)")
    p.add_argument("--out", default="samples", help="output folder (default: %(default)s)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], help="default: sampler.name")
    p.add_argument("--steps", type=int,
                   help="DDIM steps (default: a distilled student's own count, else sampler.steps)")
    p.add_argument("--eta", type=float, help="DDIM eta (default: sampler.eta)")
    p.add_argument("-n", "--num-images", type=int, help="default: sample.num_images")
    p.add_argument("--seed", type=int, help="default: sample.seed")
    p.add_argument("--label", type=int, help="class to draw (conditional models only)")
    p.add_argument("--guidance", type=float, help="classifier-free guidance scale (default: sampler.guidance_scale)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: runtime.device")
    p.add_argument("--aot", default="auto",
                   help="the AOT package to sample with (ddpm export writes it on CUDA): a .pt2 path, auto "
                        "(model.pt2 beside the checkpoint, if there) or off; one that does not match this GPU, "
                        "torch or checkpoint is refused (default: %(default)s)")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("evaluate", help="score generated samples: FID, precision/recall, IS, memorisation")
    _add_settings(p)
    p.add_argument("--checkpoint", default=None, help="(default: <train.out_dir>/checkpoint.pt)")
    p.add_argument("--onnx", default=None, help="score the onnxruntime sampler of this ONNX model instead")
    p.add_argument("--out", default=None, help="output folder (default: <train.out_dir>/eval)")
    p.add_argument("--feature-net", default="pinned",
                   help="FID's feature net: pinned (the shipped net, checked against its SHA-256), retrain "
                        "(runs/features/<dataset>.pt, trained here if missing; its FIDs are not comparable with "
                        "pinned ones) or the path of an existing net (default: %(default)s)")
    p.add_argument("--aot", default="auto",
                   help="the AOT package to sample with (ddpm export writes it on CUDA): a .pt2 path, auto "
                        "(model.pt2 beside the checkpoint, if there) or off; one that does not match this GPU, "
                        "torch or checkpoint is refused (default: %(default)s)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("export", help="export the EMA U-Net to ONNX and gate it: parity, then samples and FID "
                                      "against PyTorch (export.check_*, the FID margins)")
    _add_settings(p)
    p.add_argument("--checkpoint", default=None, help="(default: <train.out_dir>/checkpoint.pt)")
    p.add_argument("--out", default=None, help="(default: <train.out_dir>/model.onnx)")
    p.add_argument("--feature-net", default="pinned",
                   help="the gate's FID feature net: pinned, retrain or a path, as for evaluate (default: %(default)s)")
    p.set_defaults(func=cmd_export)


def _add_onnx_parsers(sub: Any) -> None:
    """`ddpm onnx-sample` and `ddpm web`: the commands that need an exported model and no PyTorch."""
    p = sub.add_parser("onnx-sample", help="sample with onnxruntime alone (no PyTorch)")
    p.add_argument("--model", default=None,
                   help="the exported .onnx file (its schedule is read from its metadata), or a registered version: "
                        "models:/<name>@<alias> (e.g. models:/ddpm-unet@champion) or models:/<name>/<version> "
                        "(default: <train.out_dir>/model.onnx)")
    p.add_argument("--params", default="params.yaml",
                   help="train.out_dir for the default model; for models:/ URIs, the settings whose MLflow store holds "
                        "the registry, $MLFLOW_TRACKING_URI first (default: %(default)s, else the project's)")
    p.add_argument("--cache", default=None,
                   help="for models:/ URIs: where downloaded versions are kept (default: ~/.cache/ddpm/models)")
    p.add_argument("--out", default="samples_onnx", help="output folder (default: %(default)s)")
    p.add_argument("--sampler", choices=["ddpm", "ddim"], default="ddim", help="(default: %(default)s)")
    p.add_argument("--steps", type=int, default=None,
                   help="DDIM steps (default: those the export was checked with, its metadata's sampler.steps; "
                        "for a distilled student, its own count)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta (default: the export's, its metadata's sampler.eta)")
    p.add_argument("-n", "--num-images", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=256, help="(default: %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="(default: %(default)s)")
    p.add_argument("--label", type=int, default=None, help="class to draw (conditional models only)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale, class-conditional models only (default: the export's, its "
                        "metadata's sampler.guidance_scale)")
    p.add_argument("--provider", choices=["auto", "cpu", "cuda"], default="cpu",
                   help="execution provider; cuda fails loudly if CUDA is unavailable (default: %(default)s)")
    p.add_argument("--noise", choices=["pcg64", "counter"], default="pcg64",
                   help="random numbers: pcg64 (numpy's, drawn batch by batch) or counter (ddpm/counter_noise.py, "
                        "the web page's: the same images as `ddpm web` from the same seed) (default: %(default)s)")
    p.set_defaults(func=cmd_onnx_sample)

    p = sub.add_parser("web", help="serve the sampling page with an exported model on 127.0.0.1")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--model", default=None, help="the exported .onnx file (default: <train.out_dir>/model.onnx)")
    which.add_argument("--registered", default=None, metavar="NAME@ALIAS",
                       help="a registered version instead: NAME@ALIAS or NAME/VERSION, e.g. ddpm-unet@challenger")
    p.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1; 0: any free one (default: %(default)s)")
    p.add_argument("--params", default="params.yaml",
                   help="the settings: train.out_dir for the default model; for --registered, the MLflow "
                        "store that holds the registry (default: %(default)s)")
    p.add_argument("--cache", default=None,
                   help="for --registered: where downloaded versions are kept (default: ~/.cache/ddpm/models)")
    p.set_defaults(func=cmd_web)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        from ddpm.threads import apply_thread_defaults
        apply_thread_defaults()  # before any command imports torch: OpenMP reads the variables once
        return args.func(args)
    except KeyboardInterrupt:  # Ctrl-C: one line and the shell's status for it (-v: the traceback); training
        if args.verbose:       # catches its own first, saves a checkpoint and says so (TrainingInterrupted)
            raise
        print(f"ddpm {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # expected failures: one clear line, exit status 2; bugs (and -v): the traceback
        from ddpm.errors import user_error
        message = user_error(exc)
        if message is not None and not args.verbose:
            print(f"ddpm {args.command}: error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
