"""Train the anchor codec (the shipped default image model), resumably, on the CPU.

Recipe (docs/training.md has the reasoning and the measured cost):

- data: the registry photographs of :mod:`ulbcodec.train.data` (training split only),
  random 256x256 crops at random scales, flips, 90-degree rotations, mild colour jitter;
- one model for all rate levels: every batch draws a level l, whose gain vector scales
  the latent, and is trained on  R + lambda_l * D,  with lambda_l log-spaced;
- D = 255^2 * MSE  (first ``--mse-warmup`` steps alone: MS-SSIM from scratch does not
  learn) then  255^2 * MSE * w_mse + MSSSIM_WEIGHT * (1 - MS-SSIM);
  keeping an MSE term avoids the colour shifts of MS-SSIM alone;
- ``--perceptual-weight w`` adds ``w · (detail loss + VIF loss)`` to D (0 by default; the
  anchor codec of models/generative is models/default continued at w = 500 with λs one
  level lower, docs/training.md);
- the entropy bottleneck's quantiles are fitted by CompressAI's auxiliary loss;
- a checkpoint (safetensors + JSON, no pickles) every ``--save-every`` seconds; running
  the same command again resumes from it;
- ``--dark-fraction f`` darkens that fraction of the crops to ``a·x^γ`` (a in 0.25-0.8,
  γ in 1.2-2.2, as the P-frame trainer does): the registry photographs are daylight
  scenes, and a codec that never saw a night scene lifts its blacks and loses its
  contrast (docs/training.md, "Dark content");
- ``--video-fraction f`` draws that fraction of the crops from frames of the training
  video clips (``videos/train`` of ``make data``; every 4th frame, clips at least one crop
  wide) instead of photographs: a video package's keyframe codec codes every keyframe
  and, through latent-conditional P frames, every coded frame of a clip, and video frames
  (motion blur, camera noise, earlier compression) are not what photographs look like;
- ``--into PACKAGE`` exports PACKAGE with its anchor codec replaced by the trained one
  (every other component and setting unchanged): how a video package's keyframe codec is
  fine-tuned;
- ``--init-from PACKAGE`` starts a new run from a package's anchor codec (its weights and
  rate-level gains; the optimiser and learning-rate schedule start afresh): how a
  finished run is trained further (docs/training.md, "Training further"); with other
  ``--lambdas`` each level starts from the gains the package has at its λ;
- one process or many: ``accelerate launch -m ulbcodec.train.anchor ...`` trains data
  parallel (:mod:`ulbcodec.train.distributed`; global batch = processes x ``--batch``).

Export (``--export DIR``) writes a ulb model package (:mod:`ulbcodec.packages`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import ContextManager, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from ulbcodec.losses.rate_distortion import MSSSIM_WEIGHT, anchor_distortion, bits_per_pixel, perceptual_terms
from ulbcodec import packages
from ulbcodec.models.anchor_codec import AnchorCodec
from ulbcodec.packages import RateLevel, save_package
from ulbcodec.train.distributed import TrainRuntime, add_runtime_arguments, training_runtime
from ulbcodec.train.loop import TrainLoop

# Small enough to code at <= 1.5 s/MP each way on 2 CPU cores (BENCHMARKS.md); no VAE
# latent input until the generative decoder's latent autoencoder exists.
DEFAULT_CONFIG = dict(N=48, M=96, num_slices=4, context_window=5, vae_channels=0, bypass_channels=16,
                      num_rate_levels=6, token_channels=64, num_token_blocks=3)
# lambda per rate level, level 0 = lowest rate. Chosen so the levels span ~0.005-0.15 bpp
# on 768 px photographs; measured values are in BENCHMARKS.md.
DEFAULT_LAMBDAS = [0.00004, 0.0001, 0.00025, 0.0006, 0.0015, 0.0036]


# --------------------------------------------------------------------------- data


VIDEO_FRAME_STRIDE = 4  # consecutive frames are near duplicates: every 4th keeps memory small
VIDEO_FRAMES_PER_CLIP = 40


def load_video_frames(folder: Path, crop: int) -> List[np.ndarray]:
    """Every :data:`VIDEO_FRAME_STRIDE`-th frame (at most :data:`VIDEO_FRAMES_PER_CLIP`) of
    each training clip under ``folder`` whose sides both reach ``crop``, one array per clip."""
    from ulbcodec.train.video_data import read_frames

    clips = []
    for f in sorted(folder.glob("*.mkv")):
        frames = list(read_frames(f, stop=VIDEO_FRAME_STRIDE * VIDEO_FRAMES_PER_CLIP))[::VIDEO_FRAME_STRIDE]
        if frames and min(frames[0].shape[:2]) >= crop:
            clips.append(np.stack(frames))
    if not clips:
        raise SystemExit(f"no training clip of at least {crop}x{crop} under {folder}: run `make data` first")
    return clips


class PhotoCrops:
    """Random crops of in-memory photographs at several scales (plus flips/rotations), and
    with ``video_clips`` a fraction of them from video frames (:func:`load_video_frames`)."""

    def __init__(self, files: List[Path], crop: int, seed: int, dark_fraction: float = 0.0,
                 video_clips: Optional[List[np.ndarray]] = None, video_fraction: float = 0.0):
        from PIL import Image

        if video_fraction and not video_clips:
            raise ValueError("video_fraction > 0 needs video_clips")
        Image.MAX_IMAGE_PIXELS = None
        self.crop = crop
        self.dark_fraction = dark_fraction
        self.video_clips, self.video_fraction = video_clips or [], video_fraction
        # clips drawn in proportion to the square root of their pixel count, as the P-frame trainers do
        self.video_weights = [float(np.sqrt(c.size)) for c in self.video_clips]
        self.rng = random.Random(seed)
        self.pyramids = []
        for f in files:
            im = Image.open(f).convert("RGB")
            levels = []
            # Textures at several scales; the smallest keeps the whole scene in a few crops.
            for side in (2048, 1280, 768, 512):
                scale = min(1.0, side / max(im.size))
                size = (max(crop, round(im.width * scale)), max(crop, round(im.height * scale)))
                levels.append(np.asarray(im.resize(size, Image.LANCZOS)))
            self.pyramids.append(levels)

    def _source(self) -> np.ndarray:
        if self.video_fraction and self.rng.random() < self.video_fraction:
            clip = self.rng.choices(self.video_clips, self.video_weights)[0]
            return clip[self.rng.randrange(clip.shape[0])]
        return self.rng.choice(self.rng.choice(self.pyramids))

    def batch(self, n: int) -> torch.Tensor:
        out = []
        for _ in range(n):
            img = self._source()
            h, w = img.shape[:2]
            y, x = self.rng.randrange(h - self.crop + 1), self.rng.randrange(w - self.crop + 1)
            t = torch.from_numpy(img[y : y + self.crop, x : x + self.crop].copy()).permute(2, 0, 1).float() / 255
            if self.rng.random() < 0.5:
                t = t.flip(-1)
            t = torch.rot90(t, self.rng.randrange(4), dims=(1, 2))
            # mild colour jitter: per-channel gain and a brightness offset
            gain = torch.tensor([self.rng.uniform(0.9, 1.1) for _ in range(3)]).view(3, 1, 1)
            t = (t * gain + self.rng.uniform(-0.05, 0.05)).clamp(0, 1)
            if self.dark_fraction and self.rng.random() < self.dark_fraction:
                t = self.rng.uniform(0.25, 0.8) * t.pow(self.rng.uniform(1.2, 2.2))
            out.append(t)
        return torch.stack(out)


# --------------------------------------------------------------------------- checkpoints


def _flatten_optimizer(opt: torch.optim.Optimizer, prefix: str):
    sd = opt.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            tensors[f"{prefix}.{idx}.{key}"] = torch.as_tensor(value).clone()
    return tensors, sd["param_groups"]


def _restore_optimizer(opt: torch.optim.Optimizer, prefix: str, tensors: Dict[str, torch.Tensor], groups):
    state: Dict[int, dict] = {}
    for name, value in tensors.items():
        if name.startswith(prefix + "."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(run: Path, model, opt, aux_opt, meta: dict) -> None:
    run.mkdir(parents=True, exist_ok=True)
    opt_t, opt_g = _flatten_optimizer(opt, "opt")
    aux_t, aux_g = _flatten_optimizer(aux_opt, "aux")
    tmp = run / "checkpoint.tmp"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, run / "model.safetensors")
    save_file({**opt_t, **aux_t}, str(tmp))
    os.replace(tmp, run / "optimizer.safetensors")
    (run / "state.json.tmp").write_text(json.dumps({**meta, "opt_groups": opt_g, "aux_groups": aux_g}, indent=1))
    os.replace(run / "state.json.tmp", run / "state.json")


def load_checkpoint(run: Path, model, opt, aux_opt) -> dict:
    meta = json.loads((run / "state.json").read_text())
    model.load_state_dict(load_file(str(run / "model.safetensors")), strict=True)
    tensors = load_file(str(run / "optimizer.safetensors"))
    _restore_optimizer(opt, "opt", tensors, meta.pop("opt_groups"))
    _restore_optimizer(aux_opt, "aux", tensors, meta.pop("aux_groups"))
    return meta


# --------------------------------------------------------------------------- training


def rd_loss(model, x: torch.Tensor, level: int, lmbda: float, use_msssim: bool, autocast: ContextManager,
            perceptual_weight: float = 0.0):
    """R + λ·D, plus λ·w·(detail + VIF losses) when ``perceptual_weight`` w is set (the
    encoder's refinement objective, :mod:`ulbcodec.refinement`, learnt by the whole codec)."""
    with autocast:
        out = model(x, rate_level=level, with_bypass=False)
    x_hat = out["anchor_frame"].float()
    bpp = bits_per_pixel(out["likelihoods"], x.shape[0] * x.shape[2] * x.shape[3])
    if use_msssim:
        distortion, mse, msssim = anchor_distortion(x_hat, x)
    else:  # the MSE warm-up
        mse = F.mse_loss(x_hat, x)
        distortion, msssim = 255**2 * mse, torch.tensor(float("nan"))
    if perceptual_weight:
        detail, vif = perceptual_terms(x_hat, x)
        distortion = distortion + perceptual_weight * (detail + vif)
    return bpp + lmbda * distortion, bpp, mse, msssim


def widen_gain_spread(model: AnchorCodec, low: float = -2.6) -> None:
    """Spread the initial gains of the rate levels over a wider range.

    AnchorCodec initialises its gains at 2^-1 .. 2^+1; with few thousand steps Adam moves
    them too slowly to reach ~0.005 bpp at level 0, so level l's quantisation is made
    2^(low*(1 - l/(L-1))) coarser from the start (level L-1 unchanged). The shipped model
    got this at step 1955 of its run (recorded in its manifest); a fresh run gets it at 0.
    """
    with torch.no_grad():
        scale = 2 ** torch.linspace(low, 0, model.gain.shape[0], device=model.gain.device)
        model.gain.mul_(scale[:, None])
        model.inverse_gain.div_(scale[:, None])


def remap_rate_levels(gain: torch.Tensor, inverse_gain: torch.Tensor, old_lambdas: List[float],
                      new_lambdas: List[float]) -> Tuple[torch.Tensor, torch.Tensor]:
    """The gain tables ``[len(new_lambdas), M]`` that give each new λ the gains the model
    already has there.

    Log-gains are linear in the level (fractional levels, Cui et al. 2021) and the levels
    are about evenly spaced in log λ, so a new λ maps to the fractional old level at the
    same place in log λ (linearly extrapolated past either end), and its gains are the
    geometric interpolation there. A continuation with other λs (or more levels) then
    starts at about the rates it is asked for instead of walking its gains there, which
    Adam does slowly (see :func:`widen_gain_spread`)."""
    old = np.log(np.asarray(old_lambdas, dtype=np.float64))
    segments = []  # (i, t): between old levels i and i + 1, t outside [0, 1] past either end
    for lmbda in np.log(np.asarray(new_lambdas, dtype=np.float64)):
        i = int(np.clip(np.searchsorted(old, lmbda) - 1, 0, len(old) - 2))
        segments.append((i, float((lmbda - old[i]) / (old[i + 1] - old[i]))))
    with torch.no_grad():
        tables = []
        for table in (gain, inverse_gain):
            logs = table.abs().log()
            tables.append(torch.stack([logs[i] + t * (logs[i + 1] - logs[i]) for i, t in segments]).exp())
    return tables[0], tables[1]


def init_from_package(model: AnchorCodec, name_or_path: str, lambdas: List[float]) -> dict:
    """Load a package's anchor codec into ``model`` (same config but for the number of
    rate levels); returns what to record.

    Its gains are taken as they are (already widened), remapped when ``lambdas`` differ
    from the package's (:func:`remap_rate_levels`: more levels than the package's extend
    its range, e.g. higher rates for a video package's keyframes), and its training
    history is kept so the exported manifest accounts for every step the weights have seen."""
    pkg = packages.ModelPackage.load_manifest(packages.resolve(name_or_path))
    codec = pkg.build("anchor_codec")
    if {**codec.config, "num_rate_levels": 0} != {**model.config, "num_rate_levels": 0}:
        raise SystemExit(f"--init-from {name_or_path}: anchor codec config {codec.config} is not {model.config}")
    state = codec.state_dict()
    record = {"package": str(name_or_path), "digest": pkg.digest, "training": pkg.extra.get("training", {})}
    old_lambdas = [lv.lmbda for lv in pkg.rate_levels]
    if list(lambdas) != old_lambdas:
        if len(old_lambdas) < 2 or min(old_lambdas) <= 0 or len(old_lambdas) != state["gain"].shape[0]:
            raise SystemExit(f"--init-from {name_or_path}: its rate levels {old_lambdas} cannot be remapped "
                             f"onto --lambdas {list(lambdas)} (each level needs its λ)")
        state["gain"], state["inverse_gain"] = remap_rate_levels(state["gain"], state["inverse_gain"],
                                                                 old_lambdas, lambdas)
        record["remapped_lambdas"] = old_lambdas
    model.load_state_dict(state, strict=True)
    return record


def model_config(args) -> dict:
    """The codec's config: a run's own once it has a checkpoint (so that resuming or
    exporting needs no more than ``--run``), else the default with ``--width``/``--latent``
    where given (a wider keyframe codec for higher rates) and a rate level per λ."""
    state = Path(args.run) / "state.json"
    saved = json.loads(state.read_text()).get("config") if state.exists() else None
    if saved:
        return dict(saved)
    return dict(DEFAULT_CONFIG, num_rate_levels=len(args.lambdas),
                **{k: v for k, v in (("N", args.width), ("M", args.latent)) if v is not None})


def make_optimizers(model: AnchorCodec, lr: float):
    """Adam for the network; a separate Adam for the entropy bottleneck's quantiles."""
    params = [p for n, p in model.named_parameters() if not n.endswith(".quantiles")]
    aux_params = [p for n, p in model.named_parameters() if n.endswith(".quantiles")]
    return params, torch.optim.Adam(params, lr=lr), torch.optim.Adam(aux_params, lr=1e-3)


def train(args, rt: TrainRuntime) -> None:
    torch.manual_seed(args.seed)
    run = Path(args.run)
    files = sorted((Path(args.data) / "photos" / "train").iterdir())
    if not files:
        raise SystemExit(f"no training photographs under {args.data}/photos/train: run `make data` first")
    seed = rt.process_seed(args.seed)  # this process's crops and levels (process 0: args.seed)
    video = load_video_frames(Path(args.data) / "videos" / "train", args.crop) if args.video_fraction else None
    data = PhotoCrops(files, args.crop, seed, args.dark_fraction, video, args.video_fraction)
    config = model_config(args)
    model = AnchorCodec(**config).to(rt.device)
    params, opt, aux_opt = make_optimizers(model, args.lr)
    aux_params = aux_opt.param_groups[0]["params"]
    meta = {"step": 0, "seconds": 0.0, "config": config, "lambdas": args.lambdas, "log": []}
    if (run / "state.json").exists():  # the checkpoint holds the weights, gains and init_from record
        meta = {**meta, **load_checkpoint(run, model, opt, aux_opt)}
        rt.print(f"resumed {run} at step {meta['step']} ({meta['seconds'] / 60:.1f} min trained)")
    elif args.init_from:
        meta["init_from"] = init_from_package(model, args.init_from, args.lambdas)
    else:
        widen_gain_spread(model)
    rt.record(meta, args.batch)
    rt.sync_replicas(model.parameters())
    rt.decorrelate_global_rng(args.seed)
    model.train()
    loop = TrainLoop(rt, meta, args.steps, args.log_every, args.save_every)
    while meta["step"] < args.steps:
        step = meta["step"]
        if step == int(args.steps * 0.85):
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.1
        level = random.Random(seed * 1000003 + step).randrange(len(args.lambdas))
        x = data.batch(args.batch).to(rt.device)
        loss, bpp, mse, msssim = rd_loss(model, x, level, args.lambdas[level], step >= args.mse_warmup, rt.autocast(),
                                         args.perceptual_weight)
        opt.zero_grad(set_to_none=True)
        rt.backward(loss, params)
        rt.clip_grad_norm_(params, 1.0)
        opt.step()
        aux = model.aux_loss()
        aux_opt.zero_grad(set_to_none=True)
        rt.backward(aux, aux_params)
        aux_opt.step()
        meta["step"] = step + 1
        loop.record((level, bpp.item(), mse.item(), msssim.item()))
        logged = loop.flush_log()
        if logged:
            elapsed, rows = logged[0], {}
            for lv, b, m, s in logged[1]:  # every process's batches
                rows.setdefault(lv, []).append((b, m, s))
            summary = {lv: [round(float(np.mean(c)), 5) for c in zip(*v)] for lv, v in sorted(rows.items())}
            loop.log(elapsed, by_level=summary)
            rt.print(f"step {meta['step']:6d} {elapsed / 60:6.1f} min  level: [bpp, mse, ms-ssim] {summary}")
        if loop.checkpoint_due():
            rt.save_checkpoint(lambda: save_checkpoint(run, model, opt, aux_opt, meta), model.parameters(),
                               meta["step"])
    if args.export and rt.is_main:
        export(model.cpu(), args, meta)  # the package is built and used on the CPU


def round_parameters_to_half(model: torch.nn.Module) -> None:
    """Round every parameter to the nearest float16 value, in place (kept as float32)."""
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(param.half().float())


def export(model: AnchorCodec, args, meta: dict) -> None:
    """Round the parameters to float16 (halves the package; quality unaffected), THEN
    build the CDF tables from the rounded entropy-model parameters, and write a package."""
    model.eval()
    round_parameters_to_half(model)
    model.update(force=True)
    levels = [RateLevel(level=i, lmbda=l) for i, l in enumerate(args.lambdas)]
    if args.into:
        return export_into(model, args, meta, levels)
    package = save_package(
        args.export, "default", {"anchor_codec": model}, levels,
        description="ulbc default anchor codec (NeFIC architecture, small config), trained in-project "
        "on registry photographs by ulbcodec.train.anchor",
        extra={"training": {"steps": meta["step"], "minutes": round(meta["seconds"] / 60, 1),
                            "batch": args.batch, "crop": args.crop, "lr": args.lr, "seed": args.seed,
                            "mse_warmup": args.mse_warmup, "msssim_weight": MSSSIM_WEIGHT,
                            "perceptual_weight": args.perceptual_weight,
                            **data_mix(args), "lambdas": args.lambdas, "command": "make models",
                            **training_runtime(meta, args.batch),
                            "interventions": meta.get("interventions", []),
                            **({"init_from": meta["init_from"]} if meta.get("init_from") else {}),
                            "log_tail": meta["log"][-10:]}},
        half_parameters=True,
    )
    print(f"exported {package.root} digest {package.digest[:16]} ({package.size_bytes / 1e6:.1f} MB)")


def data_mix(args) -> dict:
    """The training record's crop mix: the fractions of darkened and video crops that
    were not zero (a record without them trained on photographs alone)."""
    return {name: getattr(args, name) for name in ("dark_fraction", "video_fraction") if getattr(args, name)}


def export_into(model: AnchorCodec, args, meta: dict, levels: List[RateLevel]) -> None:
    """``args.into``'s package with its anchor codec replaced by ``model`` (CDF tables
    already rebuilt), every other component and setting unchanged; the anchor codec's
    training record joins the package's extra as ``keyframe_training``. ``--lambdas`` may
    add levels above the package's (higher keyframe rates for a video package); the
    levels it has keep their λs."""
    base = packages.ModelPackage.load_manifest(packages.resolve(args.into))
    if [lv.lmbda for lv in base.rate_levels] != [lv.lmbda for lv in levels][:len(base.rate_levels)]:
        raise SystemExit(f"--into {args.into}: its rate levels' λs differ from --lambdas")
    training = {"steps": meta["step"], "minutes": round(meta["seconds"] / 60, 1),
                "batch": args.batch, "crop": args.crop, "lr": args.lr,
                **data_mix(args), "init_from": meta.get("init_from"), **training_runtime(meta, args.batch),
                "log_tail": meta["log"][-5:]}
    package = packages.save_derived_package(base, args.export, {"anchor_codec": model},
                                            {"keyframe_training": training}, rate_levels=levels)
    print(f"exported {package.root} digest {package.digest[:16]} ({package.size_bytes / 1e6:.1f} MB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the ulbc anchor codec (resumable).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/default")
    p.add_argument("--export", default=None, help="write a model package here when training ends")
    p.add_argument("--init-from", default=None,
                   help="start a new run from this package's anchor codec (name or path)")
    p.add_argument("--steps", type=int, default=8500)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=1.5e-4)
    p.add_argument("--mse-warmup", type=int, default=1200)
    p.add_argument("--perceptual-weight", type=float, default=0.0,
                   help="weight of the detail and VIF losses in the distortion (0: D alone; "
                   "ulbc encode --refine-steps uses 500)")
    p.add_argument("--lambdas", type=float, nargs="+", default=DEFAULT_LAMBDAS)
    p.add_argument("--width", type=int, default=None, help=f"N, the transforms' width (default {DEFAULT_CONFIG['N']})")
    p.add_argument("--latent", type=int, default=None,
                   help=f"M, the latent's channels (default {DEFAULT_CONFIG['M']}; a multiple of num_slices)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                   help="older spelling of --mixed-precision bf16 (--no-bf16: no)")
    add_runtime_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    p.add_argument("--export-only", action="store_true", help="export the current checkpoint and exit")
    p.add_argument("--dark-fraction", type=float, default=0.0, help="fraction of crops darkened to a·x^γ")
    p.add_argument("--video-fraction", type=float, default=0.0,
                   help="fraction of crops from frames of the training video clips")
    p.add_argument("--into", default=None, help="export this package with its anchor codec replaced")
    args = p.parse_args(argv)
    for name in ("dark_fraction", "video_fraction"):
        if not 0 <= getattr(args, name) <= 1:
            p.error(f"--{name.replace('_', '-')} must be in [0, 1], got {getattr(args, name)}")
    rt = TrainRuntime(args.mixed_precision or {True: "bf16", False: "no", None: None}[args.bf16])
    if args.export_only:
        if rt.is_main:
            model = AnchorCodec(**model_config(args))
            _, opt, aux_opt = make_optimizers(model, args.lr)
            meta = load_checkpoint(Path(args.run), model, opt, aux_opt)
            export(model, args, meta)
    else:
        train(args, rt)
    rt.end()


if __name__ == "__main__":
    main()
