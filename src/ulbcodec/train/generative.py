"""Train the shipped generative decoder (models/generative), resumably, on the CPU.

Three stages, each a checkpoint directory under ``--run`` that the same command resumes::

  vae     AutoencoderKLCogVideoX (tiny config) as a plain image autoencoder:
          L1 + 0.2·(1 − MS-SSIM) + 1e-6·KL on 256² crops. CogVideoX's own VAE cannot be
          downloaded here, so the latent space is ours; its scaling_factor is set to
          1/std of the training latents when the stage ends (unit-variance latents, as the
          diffusion schedule assumes).
  stage1  next-frame adaptation, multi-step ("interval adaptation" in the paper): frames
          [A, A, X_t, X_t], A = VAE latent of the decoded anchor frame (frozen anchor
          codec, random rate level), X_t = noised VAE latent of the photograph at a random
          t; loss = ||v − v_target||² on the target tokens + 0.1·||out_anchor − A||² (the
          anchor auxiliary loss: the anchor tokens must keep carrying the anchor).
  stage2  one-step bypass decoding: the anchor decoder's bypass head (new, trained here)
          gives Z; frames [A, A, Z, Z] at t = 500; x0 from v; VAE-decode;
          loss = 255²·MSE·w + 1300·(1 − MS-SSIM) + latent MSE + adversarial (hinge, a
          patch discriminator trained from scratch: no pretrained perceptual network can
          be loaded here, so no LPIPS term) + ``--detail-weight``·detail loss (the share
          of the original's wavelet detail the image fails to restore,
          :mod:`ulbcodec.losses.detail_loss`; 0 by default) + ``--vif-weight``·VIF loss (the
          share of the original's visual information lost at four scales, contrast gains
          capped at 1, :mod:`ulbcodec.losses.vif_loss`; 0 by default) + ``--ssimulacra2-weight``·
          (100 − SSIMULACRA 2)/100 (:mod:`ulbcodec.losses.ssimulacra2_loss`) + ``--grid-weight``·
          the gradient energy added on an 8/16 px grid (:mod:`ulbcodec.losses.grid_loss`);
          ``--disc-scales 2|3`` makes the discriminator multi-scale. The anchor codec's encoder and entropy
          model stay frozen (they are ``--anchor-model``'s, trained by
          :mod:`ulbcodec.train.anchor`), so the rate term of the paper's stage II is a
          constant here and is left out.

``--output anchor_residual`` trains (and exports) the decoder whose image is
``anchor + VAE.decode(x0) − VAE.decode(A)`` (models/next_frame.py), the losses taken on
that image. ``--init-from PACKAGE`` starts stage II from a package's VAE, transformer,
prompt and bypass head instead of from this run's earlier stages (which it skips): how
the shipped model continued a finished run in a new output mode (docs/training.md).

Then ``export`` writes the package: anchor_codec.safetensors (``--anchor-model``'s codec +
trained bypass head), vae/ and transformer/ and scheduler/ in diffusers' layout, prompt_embeds.

Every stage runs on one process or data parallel under ``accelerate launch``
(:mod:`ulbcodec.train.distributed`: gradients averaged explicitly, main process
checkpoints and exports).
"""

from __future__ import annotations

import argparse
import json
import os
import random
from pathlib import Path
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from safetensors.torch import load_file, save_file

from ulbcodec.losses.detail_loss import detail_loss
from ulbcodec.losses.grid_loss import grid_loss
from ulbcodec.losses.ssimulacra2_loss import ssimulacra2_loss
from ulbcodec.losses.rate_distortion import anchor_distortion
from ulbcodec.losses.vif_loss import vif_loss
from ulbcodec import packages
from ulbcodec.packages import NEXT_FRAME_SETTINGS
from ulbcodec.models.next_frame import ONE_STEP_TIMESTEP, SCHEDULER_CONFIG, NextFramePipeline
from ulbcodec.train.anchor import PhotoCrops, _flatten_optimizer, _restore_optimizer
from ulbcodec.train.distributed import TrainRuntime, add_runtime_arguments, training_runtime
from ulbcodec.train.loop import TrainLoop

VAE_CONFIG = dict(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8, latent_channels=16,
                  temporal_compression_ratio=4, sample_height=256, sample_width=256)
# sample_height/width: from the training crop (build_transformer)
TRANSFORMER_CONFIG = dict(num_attention_heads=4, attention_head_dim=48, in_channels=16, out_channels=16,
                          time_embed_dim=128, text_embed_dim=64, num_layers=6, sample_frames=5, patch_size=2,
                          patch_size_t=2, temporal_compression_ratio=4, max_text_seq_length=8,
                          use_rotary_positional_embeddings=True)
PROMPT_SHAPE = (1, 8, 64)
VAE_SCALE = 8  # pixels per latent
STAGES = ("vae", "stage1", "stage2")
DEFAULT_STEPS = {"vae": 2400, "stage1": 1000, "stage2": 1400}


def build_vae():
    from diffusers import AutoencoderKLCogVideoX

    return AutoencoderKLCogVideoX(**VAE_CONFIG)


def build_transformer(crop: int = 256):
    """The transformer for ``crop`` px training crops: its config's sample size (in
    latents, 1/8) is what the decoder sizes its tiles by (ulbcodec.tiling.transformer_tile)."""
    from diffusers import CogVideoXTransformer3DModel

    side = crop // VAE_SCALE
    return CogVideoXTransformer3DModel(**{**TRANSFORMER_CONFIG, "sample_height": side, "sample_width": side})


def build_scheduler():
    from diffusers import CogVideoXDDIMScheduler

    return CogVideoXDDIMScheduler(**SCHEDULER_CONFIG)


class PatchDiscriminator(nn.Module):
    """A small PatchGAN: real/fake logits per ~40 px patch."""

    def __init__(self, width: int = 32):
        super().__init__()
        w = width
        self.net = nn.Sequential(
            nn.Conv2d(3, w, 4, 2, 1), nn.LeakyReLU(0.2),
            nn.Conv2d(w, 2 * w, 4, 2, 1), nn.GroupNorm(8, 2 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(2 * w, 4 * w, 4, 2, 1), nn.GroupNorm(8, 4 * w), nn.LeakyReLU(0.2),
            nn.Conv2d(4 * w, 1, 3, 1, 1),
        )

    def forward(self, x):
        return self.net(x * 2 - 1)


class MultiScaleDiscriminator(nn.Module):
    """PatchGANs on the image and its 2x, 4x, ... average-pooled copies (pix2pixHD, HiFiC):
    the coarser ones judge the layout of texture over ~80-160 px, where a single PatchGAN
    sees only ~40 px patches. Returns one logit map per scale."""

    def __init__(self, scales: int, width: int = 32):
        super().__init__()
        self.scales = nn.ModuleList(PatchDiscriminator(width) for _ in range(scales))

    def forward(self, x):
        out = []
        for i, d in enumerate(self.scales):
            out.append(d(F.avg_pool2d(x, 2**i) if i else x))
        return out


def build_discriminator(scales: int) -> nn.Module:
    """One PatchGAN (the checkpoints of runs before ``--disc-scales``) or several."""
    return PatchDiscriminator() if scales == 1 else MultiScaleDiscriminator(scales)


def hinge_terms(disc: nn.Module, x_hat: Tensor, x: Tensor | None = None) -> Tensor:
    """The generator's hinge term −D(x̂) when ``x`` is None, else the discriminator's
    relu(1 − D(x)) + relu(1 + D(x̂)); means over every scale's logits."""
    fake = disc(x_hat)
    fake = fake if isinstance(fake, list) else [fake]
    if x is None:
        return sum(-f.mean() for f in fake) / len(fake)
    real = disc(x)
    real = real if isinstance(real, list) else [real]
    return sum(F.relu(1 - r).mean() + F.relu(1 + f).mean() for r, f in zip(real, fake)) / len(fake)


# --------------------------------------------------------------------------- checkpoints


def save_stage(path: Path, modules: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor], opts: Dict, meta: dict):
    path.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{k}": v.detach().contiguous() for name, m in modules.items() for k, v in m.state_dict().items()}
    state.update({k: v.detach().contiguous() for k, v in tensors.items()})
    groups = {}
    opt_state = {}
    for name, opt in opts.items():
        t, g = _flatten_optimizer(opt, name)
        opt_state.update(t)
        groups[name] = g
    save_file(state, str(path / "weights.tmp"))
    os.replace(path / "weights.tmp", path / "weights.safetensors")
    save_file(opt_state or {"empty": torch.zeros(1)}, str(path / "optim.tmp"))
    os.replace(path / "optim.tmp", path / "optimizer.safetensors")
    (path / "state.tmp").write_text(json.dumps({**meta, "groups": groups}, indent=1))
    os.replace(path / "state.tmp", path / "state.json")


def load_stage(path: Path, modules: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor], opts: Dict) -> dict:
    meta = json.loads((path / "state.json").read_text())
    weights = load_file(str(path / "weights.safetensors"))
    for name, m in modules.items():
        prefix = name + "."
        m.load_state_dict({k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}, strict=True)
    with torch.no_grad():
        for k, t in tensors.items():
            t.copy_(weights[k])
    if opts:
        opt_state = load_file(str(path / "optimizer.safetensors"))
        for name, opt in opts.items():
            _restore_optimizer(opt, name, opt_state, meta["groups"][name])
    meta.pop("groups", None)
    return meta


def stage_done(run: Path, stage: str) -> bool:
    path = run / stage / "state.json"
    return path.exists() and json.loads(path.read_text()).get("done", False)


# --------------------------------------------------------------------------- stages


class Trainer:
    def __init__(self, args, rt: TrainRuntime):
        self.args = args
        self.rt = rt
        self.run = Path(args.run)
        files = sorted((Path(args.data) / "photos" / "train").iterdir())
        if not files:
            raise SystemExit(f"no training photographs under {args.data}/photos/train: run `make data` first")
        self.data = PhotoCrops(files, args.crop, rt.process_seed(args.seed))
        torch.manual_seed(args.seed)
        self.vae = build_vae().to(rt.device)
        self.transformer = build_transformer(args.crop).to(rt.device)
        self.scheduler = build_scheduler()
        g = torch.Generator().manual_seed(args.seed)
        self.prompt = nn.Parameter((torch.randn(PROMPT_SHAPE, generator=g) * 0.5).to(rt.device))
        base = packages.ModelPackage.load_manifest(packages.resolve(args.anchor_model))
        self.base = base
        self.codec = base.build("anchor_codec", device=str(rt.device))
        self.levels = [lv.level for lv in base.rate_levels]
        self.disc = build_discriminator(args.disc_scales).to(rt.device)
        rt.decorrelate_global_rng(args.seed)

    def pipeline(self) -> NextFramePipeline:
        return NextFramePipeline(self.vae, self.transformer, self.scheduler, self.prompt, dtype=self.rt.autocast_dtype,
                                 output=self.args.output)

    def init_from(self, name_or_path: str):
        """Take the VAE, transformer, prompt embeddings and bypass head of a generative
        package: the earlier stages are that package's. The rest of the anchor codec
        (encoder, entropy model, synthesis) stays ``--anchor-model``'s, so a decoder can be
        moved onto a retrained anchor codec (with the package's own codec, nothing changes)."""
        pkg = packages.ModelPackage.load_manifest(packages.resolve(name_or_path))
        if not pkg.is_generative:
            raise SystemExit(f"--init-from {name_or_path}: not a generative package")
        device = self.rt.device
        vae = pkg.build("vae")
        self.vae.load_state_dict(vae.state_dict(), strict=True)
        self._set_scaling(1.0 / vae.config.scaling_factor)
        self.transformer.load_state_dict(pkg.build("transformer").state_dict(), strict=True)
        with torch.no_grad():
            self.prompt.copy_(pkg.build("prompt_embeds").to(device))
        trained = pkg.build("anchor_codec")
        if trained.config != self.codec.config:
            raise SystemExit(f"--init-from {name_or_path}: its anchor codec's config differs from "
                             f"--anchor-model {self.args.anchor_model}'s")
        source = self.bypass_modules(trained)
        for name, module in self.bypass_modules().items():
            module.load_state_dict(source[name].state_dict(), strict=True)
        self.init_package = pkg

    def _batch(self) -> torch.Tensor:
        return self.data.batch(self.args.batch).to(self.rt.device)

    def _save(self, path: Path, modules: Dict[str, nn.Module], tensors: Dict[str, torch.Tensor], opts: Dict,
              meta: dict):
        """``save_stage`` by the main process, once every replica is checked to hold the same weights."""
        trained = [p for m in modules.values() for p in m.parameters()] + list(tensors.values())
        self.rt.save_checkpoint(lambda: save_stage(path, modules, tensors, opts, meta), trained, meta["step"])

    def _loop(self, stage: str, modules, tensors, opts, step_fn, steps: int):
        rt = self.rt
        path = self.run / stage
        meta = {"step": 0, "seconds": 0.0, "log": [], "done": False}
        if (path / "state.json").exists():
            meta = {**meta, **load_stage(path, modules, tensors, opts)}
            rt.print(f"{stage}: resumed at step {meta['step']} ({meta['seconds'] / 60:.1f} min)")
        rt.record(meta, self.args.batch)
        rt.sync_replicas([p for m in modules.values() for p in m.parameters()] + list(tensors.values()))
        loop = TrainLoop(rt, meta, steps, self.args.log_every, self.args.save_every)
        while meta["step"] < steps:
            logs = step_fn(meta["step"])
            meta["step"] += 1
            loop.record(logs)
            logged = loop.flush_log()
            if logged:
                elapsed, merged = logged[0], {}
                for w in logged[1]:  # every process's batches, step by step
                    for k, v in w.items():
                        merged.setdefault(k, []).append(v)
                row = {k: round(sum(v) / len(v), 5) for k, v in merged.items()}
                loop.log(elapsed, **row)
                rt.print(f"{stage} step {meta['step']:5d} {elapsed / 60:6.1f} min {row}")
            if loop.checkpoint_due():
                meta["done"] = meta["step"] >= steps
                self._save(path, modules, tensors, opts, meta)
        return meta

    # ---- stage 0: the latent autoencoder
    def train_vae(self):
        from pytorch_msssim import ms_ssim

        vae = self.vae.train()
        params = list(vae.parameters())
        opt = torch.optim.Adam(params, lr=self.args.lr)

        def step(i):
            x = self._batch()
            with self.rt.autocast():
                dist = vae.encode((x * 2 - 1).unsqueeze(2)).latent_dist
                z = dist.sample()
                x_hat = vae.decode(z).sample[:, :, 0].float() * 0.5 + 0.5
            kl = dist.kl().mean()
            l1 = (x_hat - x).abs().mean()
            ms = ms_ssim(x_hat.clamp(0, 1), x, data_range=1.0)
            loss = l1 + 0.2 * (1 - ms) + 1e-6 * kl
            opt.zero_grad(set_to_none=True)
            self.rt.backward(loss, params)
            self.rt.clip_grad_norm_(params, 1.0)
            opt.step()
            psnr = -10 * torch.log10(F.mse_loss(x_hat.detach().clamp(0, 1), x))
            return {"l1": l1.item(), "ms_ssim": ms.item(), "psnr": psnr.item(), "kl": kl.item()}

        meta = self._loop("vae", {"vae": vae}, {}, {"opt": opt}, step, self.args.steps["vae"])
        if "latent_std" not in meta:
            meta["latent_std"] = self._latent_std()
            self._save(self.run / "vae", {"vae": vae}, {}, {"opt": opt}, meta)
        self._set_scaling(meta["latent_std"])

    @torch.no_grad()
    def _latent_std(self) -> float:
        """The std of the VAE's latents over 16 batches of the main process, on every
        process (each replica must scale its latents the same)."""
        self.vae.eval()
        std = 0.0
        if self.rt.is_main:
            zs = []
            for _ in range(16):
                x = self._batch()
                with self.rt.autocast():
                    zs.append(self.vae.encode((x * 2 - 1).unsqueeze(2)).latent_dist.mode().float())
            std = torch.cat(zs).std().item()
        return self.rt.from_main(std)

    def _set_scaling(self, std: float):
        self.vae.register_to_config(scaling_factor=1.0 / std)
        self.vae.eval().requires_grad_(False)

    def load_vae(self):
        meta = load_stage(self.run / "vae", {"vae": self.vae}, {}, {})
        if "latent_std" not in meta:  # stopped between the last step and the statistics
            meta["latent_std"] = self._latent_std()
            self._save(self.run / "vae", {"vae": self.vae}, {}, {}, meta)
        self._set_scaling(meta["latent_std"])

    @torch.no_grad()
    def _anchor_and_target(self, x: torch.Tensor, level: int, pipe: NextFramePipeline):
        self.codec.train()  # STE rounding = decompress() output; batched entropy path
        out = self.codec(x, rate_level=level, with_bypass=False)
        anchor = out["anchor_frame"].clamp(0, 1)
        return anchor, pipe.encode_latent(anchor), pipe.encode_latent(x)

    # ---- stage I: multi-step next-frame adaptation
    def train_stage1(self):
        pipe = self.pipeline()
        self.codec.requires_grad_(False)
        self.transformer.train()
        params = list(self.transformer.parameters()) + [self.prompt]
        opt = torch.optim.AdamW(params, lr=self.args.lr, weight_decay=0.0)
        ab_all = self.scheduler.alphas_cumprod.float()
        rt, seed = self.rt, self.rt.process_seed(self.args.seed)

        def step(i):
            rng = random.Random(seed * 7919 + i)
            x = self._batch()
            _, a, x0 = self._anchor_and_target(x, rng.choice(self.levels), pipe)
            # t and noise are drawn on the CPU (the same numbers on any device), then moved
            t = torch.randint(0, 1000, (x.shape[0],), generator=torch.Generator().manual_seed(rt.process_seed(i)))
            ab = ab_all[t].view(-1, 1, 1, 1).to(rt.device)
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(rt.process_seed(10**6 + i)))
            noise = noise.to(rt.device)
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
            v_target = ab.sqrt() * noise - (1 - ab).sqrt() * x0
            v = pipe.velocity(a, xt, t)
            loss_v = F.mse_loss(v[:, 2], v_target) + F.mse_loss(v[:, 3], v_target)
            loss_aux = F.mse_loss(v[:, 0], a) + F.mse_loss(v[:, 1], a)
            loss = loss_v + 0.1 * loss_aux
            opt.zero_grad(set_to_none=True)
            rt.backward(loss, params)
            rt.clip_grad_norm_(params, 1.0)
            opt.step()
            return {"v": loss_v.item() / 2, "aux": loss_aux.item() / 2}

        self._loop("stage1", {"transformer": self.transformer}, {"prompt": self.prompt}, {"opt": opt}, step,
                   self.args.steps["stage1"])

    def load_stage1(self):
        load_stage(self.run / "stage1", {"transformer": self.transformer}, {"prompt": self.prompt}, {})

    # ---- stage II: one-step bypass decoding
    def bypass_modules(self, codec=None) -> Dict[str, nn.Module]:
        """The anchor codec's bypass head (of ``self.codec`` unless given): what stage II trains in it."""
        c = self.codec if codec is None else codec
        return {"project_in": c.project_in, "tokens": c.information_transformer_layes, "project_out": c.spatial_ch_projs}

    def train_stage2(self):
        pipe = self.pipeline()
        self.codec.requires_grad_(False)
        bypass = self.bypass_modules()
        for m in bypass.values():
            m.requires_grad_(True)
        self.transformer.train().requires_grad_(True)
        gen_params = [p for m in bypass.values() for p in m.parameters()] + list(self.transformer.parameters()) + [self.prompt]
        opt = torch.optim.AdamW(gen_params, lr=self.args.lr, weight_decay=0.0)
        disc_params = list(self.disc.parameters())
        opt_d = torch.optim.Adam(disc_params, lr=self.args.lr * 2, betas=(0.5, 0.9))
        gan_start = self.args.steps["stage2"] // 5
        rt, seed = self.rt, self.rt.process_seed(self.args.seed)

        def step(i):
            rng = random.Random(seed * 104729 + i)
            x = self._batch()
            level = rng.choice(self.levels)
            self.codec.train()
            out = self.codec(x, rate_level=level, with_bypass=True)  # grads reach the bypass head only
            anchor = out["anchor_frame"].detach().clamp(0, 1)
            with torch.no_grad():
                a = pipe.encode_latent(anchor)
                target_latent = pipe.encode_latent(x)
            z = out["bypass_latent"][:, 0]
            x0 = pipe.predict_clean(a, z, ONE_STEP_TIMESTEP)
            x_hat = pipe.to_image(x0, anchor, a, clamp=False)
            distortion, mse, ms = anchor_distortion(x_hat, x)
            lat = F.mse_loss(x0, target_latent)
            loss = distortion / 50 + lat
            logs = {"psnr": (-10 * torch.log10(mse.detach())).item(), "ms_ssim": ms.item(), "lat": lat.item()}
            if self.args.detail_weight:
                detail = detail_loss(x_hat, x)
                loss = loss + self.args.detail_weight * detail
                logs["detail"] = detail.item()
            if self.args.vif_weight:
                vif = vif_loss(x_hat, x)
                loss = loss + self.args.vif_weight * vif
                logs["vif"] = vif.item()
            if self.args.ssimulacra2_weight:
                ssimu2 = ssimulacra2_loss(x_hat, x)
                loss = loss + self.args.ssimulacra2_weight * ssimu2
                logs["ssimu2"] = 100 * (1 - ssimu2.item())
            if self.args.grid_weight:
                grid = grid_loss(x_hat, x)
                loss = loss + self.args.grid_weight * grid
                logs["grid"] = grid.item()
            if i >= gan_start:
                g_adv = hinge_terms(self.disc, x_hat)
                loss = loss + self.args.adv_weight * g_adv
                logs["g_adv"] = g_adv.item()
            opt.zero_grad(set_to_none=True)
            rt.backward(loss, gen_params)
            rt.clip_grad_norm_(gen_params, 1.0)
            opt.step()
            if i >= gan_start // 2:  # discriminator warms up before it is used
                d_loss = hinge_terms(self.disc, x_hat.detach(), x)
                opt_d.zero_grad(set_to_none=True)
                rt.backward(d_loss, disc_params)
                opt_d.step()
                logs["d"] = d_loss.item()
            return logs

        modules = {"transformer": self.transformer, "disc": self.disc, **bypass}
        self._loop("stage2", modules, {"prompt": self.prompt}, {"opt": opt, "opt_d": opt_d}, step,
                   self.args.steps["stage2"])

    def load_stage2(self):
        modules = {"transformer": self.transformer, "disc": self.disc, **self.bypass_modules()}
        load_stage(self.run / "stage2", modules, {"prompt": self.prompt}, {})

    # ---- export
    def export(self, out: Path):
        from ulbcodec.train.anchor import round_parameters_to_half

        init = getattr(self, "init_package", None)
        stages = ("stage2",) if init is not None else STAGES
        meta = {s: json.loads((self.run / s / "state.json").read_text()) for s in stages}
        for m in (self.codec, self.vae, self.transformer):
            m.cpu()  # the package is built and used on the CPU
        self.codec.eval()
        # Only the new bypass head changes by rounding; the entropy model is the base
        # package's, already float16-exact, so its CDF tables stay valid (no update()).
        round_parameters_to_half(self.codec)
        training = {s: {"steps": m["step"], "minutes": round(m["seconds"] / 60, 1),
                        **training_runtime(m, self.args.batch), "log_tail": m["log"][-5:]}
                    for s, m in meta.items()}
        training.update(command="make generative-model", batch=self.args.batch, crop=self.args.crop,
                        lr=self.args.lr, seed=self.args.seed, adv_weight=self.args.adv_weight,
                        detail_weight=self.args.detail_weight, vif_weight=self.args.vif_weight,
                        ssimulacra2_weight=self.args.ssimulacra2_weight, grid_weight=self.args.grid_weight,
                        disc_scales=self.args.disc_scales, output=self.args.output,
                        anchor_model=self.base.name, anchor_model_digest=self.base.digest)
        if init is not None:  # a continuation: what it continued, then this run's stage II
            training = {"continued": {"package": init.name, "digest": init.digest,
                                      "training": init.extra.get("training", {})},
                        "continuation": training}
        modules = {"anchor_codec": self.codec, "vae": self.vae.eval(), "transformer": self.transformer.eval(),
                   "scheduler": self.scheduler, "prompt_embeds": self.prompt.detach().cpu()}
        pkg = packages.save_package(
            out, "generative", modules, self.base.rate_levels, half_parameters=True,
            diffusers_dtype=torch.bfloat16,
            next_frame={"output": self.args.output} if self.args.output != "latent" else None,
            description="ulbc default generative image model: an anchor codec of ulbcodec.train.anchor plus a next-frame "
            "decoder (CogVideoX classes, small config) trained in-project by ulbcodec.train.generative",
            extra={"training": training, "default_level": self.base.extra.get("default_level")},
        )
        print(f"exported {pkg.root} digest {pkg.digest[:16]} ({pkg.size_bytes / 1e6:.1f} MB)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="Train the ulbc generative decoder (three resumable stages).")
    p.add_argument("--data", default=os.path.expanduser("~/.cache/ulbc"))
    p.add_argument("--run", default="runs/generative")
    p.add_argument("--anchor-model", default="default", help="the (frozen) anchor codec package to build on")
    p.add_argument("--export", default=None, help="write the model package here when all stages are done")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--crop", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--adv-weight", type=float, default=0.05)
    p.add_argument("--detail-weight", type=float, default=0.0,
                   help="weight of the detail loss in stage II (ulbcodec.losses.detail_loss)")
    p.add_argument("--vif-weight", type=float, default=0.0,
                   help="weight of the information-fidelity loss in stage II (ulbcodec.losses.vif_loss)")
    p.add_argument("--ssimulacra2-weight", type=float, default=0.0,
                   help="weight of the SSIMULACRA 2 loss in stage II (ulbcodec.losses.ssimulacra2_loss)")
    p.add_argument("--grid-weight", type=float, default=0.0,
                   help="weight of the block-grid loss in stage II (ulbcodec.losses.grid_loss)")
    p.add_argument("--disc-scales", type=int, default=1, choices=(1, 2, 3),
                   help="scales of the stage II discriminator: 1 PatchGAN, or 2-3 (multi-scale)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output", choices=NEXT_FRAME_SETTINGS["output"], default="latent",
                   help="what the VAE-decoded prediction becomes (models/next_frame.py)")
    p.add_argument("--init-from", default=None, help="start stage II from this generative package (skips vae, stage1)")
    for stage in STAGES:
        p.add_argument(f"--{stage}-steps", type=int, default=DEFAULT_STEPS[stage])
    p.add_argument("--log-every", type=int, default=50)
    p.add_argument("--save-every", type=float, default=300.0, help="seconds between checkpoints")
    add_runtime_arguments(p)
    args = p.parse_args(argv)
    args.steps = {s: getattr(args, f"{s}_steps") for s in STAGES}
    torch.set_num_threads(int(os.environ.get("ULBC_TRAIN_THREADS", torch.get_num_threads())))
    rt = TrainRuntime(args.mixed_precision)
    trainer = Trainer(args, rt)
    run = Path(args.run)
    if args.init_from:
        trainer.init_from(args.init_from)
    else:
        if stage_done(run, "vae"):
            trainer.load_vae()
        else:
            trainer.train_vae()
        if stage_done(run, "stage1"):
            trainer.load_stage1()
        else:
            trainer.train_stage1()
    if stage_done(run, "stage2"):
        trainer.load_stage2()
    else:
        trainer.train_stage2()
    if args.export and rt.is_main:
        trainer.export(Path(args.export))
    rt.end()


if __name__ == "__main__":
    main()
