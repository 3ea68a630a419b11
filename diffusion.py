"""
diffusion.py -- stage 2 of WildFusion: a latent diffusion model on the autoencoder's z.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570), Sec. 3.2. Once the autoencoder of
stage 1 is trained and frozen, every training image becomes a small latent grid z (4 x 32 x 32 at
256 px). A plain DDPM (Ho et al. 2020) learns the distribution of those grids; a new z, decoded
into a triplane and rendered, is a new 3D scene. Nothing here is 3D-specific: the 3D lives in the
decoder. What diffusion buys over a 3D GAN is *coverage*: the model is trained to denoise every
training latent, so it cannot drop modes of the data the way a generator can (paper Sec. 1, 4).

    python diffusion.py --ae runs/ae-tiny/ckpt.pt --preset tiny     # a laptop CPU
    python diffusion.py --ae runs/ae-small/ckpt.pt --preset small   # 64 px, a laptop CPU
    python diffusion.py --ae runs/ae/ckpt.pt --out runs/ldm         # one GPU
    torchrun --nproc_per_node=4 diffusion.py --ae runs/ae/ckpt.pt   # 4 GPUs, data parallel
    python diffusion.py --toy                                       # 8 Gaussians: mode coverage

Map of the file:
    1. the noise schedule      alpha_bar_t for linear / cosine betas, q_sample, eps <-> v
    2. the UNet                timestep embedding, residual blocks, attention, down / up paths
    3. the model               UNet + schedule + latent scale; the training loss; guidance
    4. samplers                DDPM ancestral, DDIM (any steps, eta), inverse DDIM, resampling
    5. latents                 encode the data once with the frozen autoencoder, cached
    6. training                presets, flags, the step, the loop; load()
                               (the plumbing both stages share is training.py's)
    7. the toy                 8 Gaussians on a ring: does the sampler find every mode?

Notation (DDPM / DDIM papers): x_0 is a clean (normalised) latent, x_t its noised version at
step t in 0..T-1, alpha_bar_t = prod_{s<=t} (1 - beta_s) the fraction of signal power left, and

    x_t = sqrt(alpha_bar_t) * x_0 + sqrt(1 - alpha_bar_t) * eps,    eps ~ N(0, I).
"""
import argparse
import copy
import hashlib
import json
import math
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from tqdm import tqdm

import autoencoder as ae
import data as data_mod
import training
from data import UserError
from training import is_main, need, world

CKPT_KIND = "wildfusion-diffusion"
CACHE_KIND = "wildfusion-latents"


# ---------------------------------------------------------------------------------------------
# 1. The noise schedule
# ---------------------------------------------------------------------------------------------
def make_schedule(kind, T=1000):
    """alpha_bar_t for t = 0..T-1, (T,) float64.

    linear (DDPM's): beta_t from 1e-4 to 0.02. (LDM's configs space sqrt(beta_t) linearly
    from sqrt(0.0015) to sqrt(0.0195) instead: a close cousin, alpha_bar ends at 1.4e-4.)
    cosine (Nichol & Dhariwal 2021): alpha_bar(t) = f(t) / f(0), f(t) = cos^2((t/T + s)/(1 + s)
    * pi/2), which destroys information more evenly over t; betas clipped at 0.999 so the last
    step does not divide by zero.
    """
    if kind == "linear":
        # Scaled so that T = 1000 gives DDPM's 1e-4 .. 0.02 and other T keep the same total noise.
        betas = torch.linspace(1e-4 * 1000 / T, 0.02 * 1000 / T, T, dtype=torch.float64)
    elif kind == "cosine":
        s = 0.008
        f = lambda t: torch.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2
        t = torch.arange(T + 1, dtype=torch.float64)
        alpha_bar = f(t) / f(torch.zeros(()))
        betas = (1 - alpha_bar[1:] / alpha_bar[:-1]).clamp(max=0.999)
    else:
        raise UserError(f"unknown schedule {kind!r}; choose linear or cosine")
    return torch.cumprod(1 - betas, 0)


def expand(a, x):
    """A per-sample scalar (B,) -> (B, 1, 1, 1) so it broadcasts against x (B, C, H, W)."""
    return a.reshape(-1, *([1] * (x.dim() - 1)))


def q_sample(x0, a, eps):
    """The forward process in one jump: x_t = sqrt(a) x_0 + sqrt(1 - a) eps, a = alpha_bar_t
    per sample (B,)."""
    a = expand(a, x0)
    return a.sqrt() * x0 + (1 - a).sqrt() * eps


# Two ways to say what the network predicts. eps: the noise. v (Salimans & Ho 2022):
#     v = sqrt(a) eps - sqrt(1 - a) x_0,
# a rotation of (x_0, eps) whose scale stays ~1 at every t, which helps at high noise levels.
# Given x_t, either one determines both eps and x_0:
#     x_0 = sqrt(a) x_t - sqrt(1 - a) v,    eps = sqrt(1 - a) x_t + sqrt(a) v
#     x_0 = (x_t - sqrt(1 - a) eps) / sqrt(a)
def v_from_eps(x0, eps, a):
    a = expand(a, x0)
    return a.sqrt() * eps - (1 - a).sqrt() * x0


def eps_x0_from_v(x_t, v, a):
    a = expand(a, x_t)
    return (1 - a).sqrt() * x_t + a.sqrt() * v, a.sqrt() * x_t - (1 - a).sqrt() * v


def eps_x0_from_eps(x_t, eps, a):
    a = expand(a, x_t)
    return eps, (x_t - (1 - a).sqrt() * eps) / a.sqrt()


# ---------------------------------------------------------------------------------------------
# 2. The UNet (Ho et al. 2020; Dhariwal & Nichol 2021), compact
# ---------------------------------------------------------------------------------------------
def timestep_embedding(t, dim, max_period=10_000):
    """Transformer-style sinusoids of the (float) timestep: (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]                                  # (B, half)
    return torch.cat([torch.cos(args), torch.sin(args)], 1)


def zero(module):
    """Zero-initialise the last layer of a residual branch: each block starts as the identity."""
    nn.init.zeros_(module.weight)
    nn.init.zeros_(module.bias)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, twice, with the timestep (+ class) embedding entering as a
    per-channel scale and shift after the second norm (ADM's "scale-shift norm")."""

    def __init__(self, c_in, c_out, emb_dim, dropout):
        super().__init__()
        self.norm1, self.conv1 = ae.norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.emb = nn.Linear(emb_dim, 2 * c_out)
        self.norm2, self.drop = ae.norm(c_out), nn.Dropout(dropout)
        self.conv2 = zero(nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))                                # (B, C_out, H, W)
        scale, shift = self.emb(F.silu(emb))[:, :, None, None].chunk(2, 1)   # (B, C_out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift
        h = self.conv2(self.drop(F.silu(h)))
        return self.skip(x) + h


class Attention(nn.Module):
    """Multi-head self-attention over the H*W positions (used at low resolutions only, where
    the H*W x H*W attention matrix is cheap). Fused kernel via scaled_dot_product_attention."""

    def __init__(self, ch, heads):
        super().__init__()
        self.heads = heads
        self.norm, self.qkv = ae.norm(ch), nn.Conv2d(ch, 3 * ch, 1)
        self.proj = zero(nn.Conv2d(ch, ch, 1))

    def forward(self, x):
        H, W = x.shape[-2:]
        q, k, v = rearrange(self.qkv(self.norm(x)), "b (three h d) x y -> three b h (x y) d",
                            three=3, h=self.heads)                           # (B, h, HW, d) each
        o = F.scaled_dot_product_attention(q, k, v)
        return x + self.proj(rearrange(o, "b h (x y) d -> b (h d) x y", x=H, y=W))


class Block(nn.Module):
    """One step of the UNet: a ResBlock, then attention if this resolution has it."""

    def __init__(self, c_in, c_out, emb_dim, dropout, attn, heads):
        super().__init__()
        self.res = ResBlock(c_in, c_out, emb_dim, dropout)
        self.attn = Attention(c_out, heads) if attn else nn.Identity()

    def forward(self, x, emb):
        return self.attn(self.res(x, emb))


class Resample(nn.Module):
    """2x down (strided conv) or up (nearest + conv) between UNet levels."""

    def __init__(self, ch, up):
        super().__init__()
        self.up = up
        self.conv = nn.Conv2d(ch, ch, 3, stride=1 if up else 2, padding=1)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest") if self.up else x)


class UNet(nn.Module):
    """x_t (B, C, H, W), t (B,), class y (B,) -> prediction (B, C, H, W).

    ch_mult gives each level's width as a multiple of ch; between levels the resolution halves.
    Every output of the down path is kept and concatenated into the up path (skip connections),
    so fine detail does not have to squeeze through the bottleneck.
    """

    def __init__(self, in_ch, res, ch, ch_mult, num_res, attn_res, heads, dropout, num_classes):
        super().__init__()
        emb_dim = 4 * ch
        self.ch = ch
        self.time = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        # Class embedding with one extra row, index num_classes, for "no class" (the null label
        # of classifier-free guidance; an unconditional model only ever uses that row).
        self.label = nn.Embedding(num_classes + 1, emb_dim)
        self.conv_in = nn.Conv2d(in_ch, ch, 3, padding=1)

        # Down path. `chans` remembers the width of every output kept for a skip connection,
        # so the up path knows how many channels each concatenation brings back.
        self.down, chans, cur, r = nn.ModuleList(), [ch], ch, res
        for i, m in enumerate(ch_mult):
            for _ in range(num_res):
                self.down.append(Block(cur, ch * m, emb_dim, dropout, r in attn_res, heads))
                cur = ch * m
                chans.append(cur)
            if i < len(ch_mult) - 1:
                self.down.append(Resample(cur, up=False))
                chans.append(cur)
                r //= 2
        self.mid = nn.ModuleList([Block(cur, cur, emb_dim, dropout, True, heads),
                                  Block(cur, cur, emb_dim, dropout, False, heads)])
        # Up path: the mirror image, each Block first concatenating the matching skip.
        self.up = nn.ModuleList()
        for i, m in reversed(list(enumerate(ch_mult))):
            for _ in range(num_res + 1):                 # one more: it eats the Resample's skip
                self.up.append(Block(cur + chans.pop(), ch * m, emb_dim, dropout,
                                     r in attn_res, heads))
                cur = ch * m
            if i > 0:
                self.up.append(Resample(cur, up=True))
                r *= 2
        self.norm_out, self.conv_out = ae.norm(cur), zero(nn.Conv2d(cur, in_ch, 3, padding=1))

    def forward(self, x, t, y):
        emb = self.time(timestep_embedding(t, self.ch)) + self.label(y)      # (B, 4ch)
        h = self.conv_in(x)                                                  # (B, ch, H, W)
        skips = [h]
        for block in self.down:
            h = block(h, emb)
            skips.append(h)
        for block in self.mid:
            h = block(h, emb)
        for block in self.up:
            if isinstance(block, Block):
                h = torch.cat([h, skips.pop()], 1)
            h = block(h, emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ---------------------------------------------------------------------------------------------
# 3. The model: UNet + schedule + latent normalisation
# ---------------------------------------------------------------------------------------------
class LatentDiffusion(nn.Module):
    """Everything sampling needs in one module (and so in one checkpoint): the UNet, alpha_bar,
    what the UNet predicts (config["pred"]: eps or v), and the latents' per-channel mean and std.

    The diffusion runs on normalised latents (z - mean) / std: the schedule assumes data of
    roughly unit variance, and an autoencoder's raw z can be far from that (LDM, Rombach 2022).
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = dict(config)
        C, H, W = c["latent_shape"]
        self.num_classes = c["num_classes"]
        self.net = UNet(C, H, c["ch"], c["ch_mult"], c["num_res"], c["attn_res"], c["heads"],
                        c["dropout"], c["num_classes"])
        self.register_buffer("alpha_bar", make_schedule(c["schedule"], c["T"]).float())
        self.register_buffer("latent_mean", torch.zeros(C))
        self.register_buffer("latent_std", torch.ones(C))

    @property
    def T(self):
        return self.config["T"]

    def normalize(self, z):
        return (z - self.latent_mean[:, None, None]) / self.latent_std[:, None, None]

    def denormalize(self, x):
        return x * self.latent_std[:, None, None] + self.latent_mean[:, None, None]

    def null_labels(self, n, device):
        return torch.full((n,), self.num_classes, dtype=torch.long, device=device)

    def loss(self, x0, labels=None, p_uncond=0.0):
        """DDPM's simple loss: pick t uniformly, noise x_0 to x_t, regress the target with MSE.

        x0 (B, C, H, W) normalised latents; labels (B,) or None. With probability p_uncond a
        label is replaced by the null label, so the same network also learns p(z) unconditionally
        and classifier-free guidance can contrast the two at sampling time.
        """
        B = x0.shape[0]
        t = torch.randint(0, self.T, (B,), device=x0.device)
        a = self.alpha_bar[t]                                                # (B,)
        eps = torch.randn_like(x0)
        x_t = q_sample(x0, a, eps)
        y = self.null_labels(B, x0.device) if labels is None else labels.clone()
        if p_uncond > 0:
            y[torch.rand(B, device=x0.device) < p_uncond] = self.num_classes
        target = eps if self.config["pred"] == "eps" else v_from_eps(x0, eps, a)
        return F.mse_loss(self.net(x_t, t, y).float(), target)

    def predict(self, x_t, t, labels=None, cfg=1.0):
        """The network's guess of (eps, x_0) at x_t (B, C, H, W), step t (B,).

        Classifier-free guidance (Ho & Salimans 2022) extrapolates from the unconditional output
        towards the conditional one:  out = out_uncond + cfg * (out_cond - out_uncond).
        cfg = 1 is the plain conditional model (and costs one pass, not two); cfg > 1 trades
        diversity for fidelity to the class. Both outputs are linear in the network's output, so
        guiding eps or v is the same thing.
        """
        B = x_t.shape[0]
        # No labels: the null class, i.e. the unconditional model p(z).
        y = self.null_labels(B, x_t.device) if labels is None else labels
        if cfg == 1.0:
            out = self.net(x_t, t, y)
        else:
            # Conditional and unconditional in one batch of 2B: one network call, not two.
            both = self.net(torch.cat([x_t, x_t]), torch.cat([t, t]),
                            torch.cat([y, self.null_labels(B, x_t.device)]))
            cond, uncond = both.chunk(2)
            out = uncond + cfg * (cond - uncond)
        out = out.float()
        a = self.alpha_bar[t]
        if self.config["pred"] == "eps":
            return eps_x0_from_eps(x_t, out, a)
        return eps_x0_from_v(x_t, out, a)

    def check_labels(self, labels, cfg):
        """Bad sampling requests, one clear line each (before any network call)."""
        if labels is not None:
            if self.num_classes == 0:
                raise UserError("this diffusion model is unconditional: leave --class out")
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise UserError(f"class label out of range: this model knows classes 0.."
                                f"{self.num_classes - 1} ({', '.join(self.config['classes'])})")
        if cfg != 1.0 and self.num_classes == 0:
            raise UserError("classifier-free guidance (--cfg) needs a class-conditional model; "
                            "this one is unconditional (leave --cfg at 1)")
        if cfg != 1.0 and labels is None:
            raise UserError("--cfg needs class labels to guide towards (give --class)")


# ---------------------------------------------------------------------------------------------
# 4. Samplers. All work on normalised latents internally and return autoencoder latents z.
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def ddpm_sample(model, shape, labels=None, cfg=1.0, generator=None, progress=False):
    """Ancestral sampling (DDPM, Ho et al. 2020, eq. 6-7), all T steps. At each t draw
    x_{t-1} ~ q(x_{t-1} | x_t, x_0 = predicted x_0), a Gaussian with

        mean = sqrt(a_prev) beta_t / (1 - a_t) * x_0
               + sqrt(1 - beta_t) (1 - a_prev) / (1 - a_t) * x_t
        var  = beta_t (1 - a_prev) / (1 - a_t),        beta_t = 1 - a_t / a_prev.
    """
    model.check_labels(labels, cfg)
    dev = model.alpha_bar.device
    x = torch.randn(shape, generator=generator, device=dev)
    for t in tqdm(range(model.T - 1, -1, -1), desc="DDPM", disable=not progress, leave=False):
        a_t = model.alpha_bar[t]
        a_prev = model.alpha_bar[t - 1] if t > 0 else torch.ones_like(a_t)
        _, x0 = model.predict(x, torch.full((shape[0],), t, device=dev), labels, cfg)
        beta = 1 - a_t / a_prev
        mean = (a_prev.sqrt() * beta / (1 - a_t) * x0
                + (1 - beta).sqrt() * (1 - a_prev) / (1 - a_t) * x)
        if t > 0:
            var = beta * (1 - a_prev) / (1 - a_t)
            x = mean + var.sqrt() * torch.randn(shape, generator=generator, device=dev)
        else:
            x = mean
    return model.denormalize(x)


def ddim_timesteps(steps, t_max):
    """`steps` timesteps spread evenly over 0..t_max, ascending, (S,) long."""
    return torch.linspace(0, t_max, max(1, min(steps, t_max + 1))).round().long().unique()


@torch.no_grad()
def ddim_loop(model, x, ts, eta=0.0, labels=None, cfg=1.0, generator=None, progress=False):
    """DDIM (Song et al. 2021, eq. 12) from x at step ts[-1] down to a clean sample. Each step,
    from t to the previous grid step s (a_t, a_s their alpha_bar; a_s = 1 after the last):

        x_s = sqrt(a_s) x_0  +  sqrt(1 - a_s - sigma^2) eps  +  sigma * noise,
        sigma = eta * sqrt((1 - a_s) / (1 - a_t)) * sqrt(1 - a_t / a_s).

    eta = 0: deterministic, an ODE solver (the same noise always gives the same sample, and the
    map can be run backwards, see ddim_invert); eta = 1: DDPM's ancestral noise level.
    """
    dev, B = x.device, x.shape[0]
    for i in tqdm(range(len(ts) - 1, -1, -1), desc="DDIM", disable=not progress, leave=False):
        t = ts[i]
        a_t = model.alpha_bar[t]
        a_s = model.alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(a_t)
        eps, x0 = model.predict(x, torch.full((B,), int(t), device=dev), labels, cfg)
        sigma = eta * ((1 - a_s) / (1 - a_t)).sqrt() * (1 - a_t / a_s).sqrt()
        x = a_s.sqrt() * x0 + (1 - a_s - sigma ** 2).clamp_min(0).sqrt() * eps
        if eta > 0 and i > 0:
            x = x + sigma * torch.randn(x.shape, generator=generator, device=dev)
    return x


@torch.no_grad()
def dpm_solver_loop(model, x, ts, labels=None, cfg=1.0, order=2, progress=False):
    """DPM-Solver++(2M) (Lu et al. 2022, "DPM-Solver++", Algorithm 2): the same ODE as DDIM
    with eta = 0, solved to second order by reusing the previous step's x_0 prediction, so it
    costs one network call per step, as DDIM does. In the log-SNR time
    lambda = log(alpha / sigma)  (alpha = sqrt(a), sigma = sqrt(1 - a)), a step from t to s
    with h = lambda_s - lambda_t is

        x_s = (sigma_s / sigma_t) x_t  -  alpha_s (exp(-h) - 1) D,
        D   = (1 + 1 / 2r) x_0(t) - (1 / 2r) x_0(previous t),    r = h_previous / h.

    With D = x_0(t) (order 1, and the first step of order 2) this is exactly DDIM:
    x_s = alpha_s x_0 + sigma_s eps. The last two steps are first order too (the paper's "lower
    order final"): into t = 0, where lambda jumps far beyond the previous step (r << 1) and
    the linear extrapolation of x_0 in lambda would overshoot, and from there to the clean
    sample (sigma_s = 0, h infinite), where x_s = x_0.
    """
    dev, B = x.device, x.shape[0]
    x0_prev = h_prev = None
    for i in tqdm(range(len(ts) - 1, -1, -1), desc="DPM-Solver++", disable=not progress,
                  leave=False):
        t = ts[i]
        _, x0 = model.predict(x, torch.full((B,), int(t), device=dev), labels, cfg)
        if i == 0:                                     # to the clean sample: alpha = 1, sigma = 0
            return x0
        a_t, a_s = model.alpha_bar[t], model.alpha_bar[ts[i - 1]]
        lam_t = 0.5 * (a_t / (1 - a_t)).log()          # log(alpha / sigma)
        h = 0.5 * (a_s / (1 - a_s)).log() - lam_t
        D = x0
        if order == 2 and x0_prev is not None and i > 1:
            r = h_prev / h
            D = (1 + 1 / (2 * r)) * x0 - 1 / (2 * r) * x0_prev
        x = ((1 - a_s) / (1 - a_t)).sqrt() * x - a_s.sqrt() * torch.expm1(-h) * D
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = ("dpm++", "ddim")


@torch.no_grad()
def ddim_sample(model, shape, steps=50, eta=0.0, labels=None, cfg=1.0, noise=None,
                generator=None, progress=False, sampler="ddim"):
    """New latents z (B, C, H, W) from pure noise (public API). noise: a given x_T, e.g.
    from ddim_invert or an interpolation between two of them. sampler "dpm++" solves the same
    ODE as DDIM with eta = 0 to second order (dpm_solver_loop): as good in fewer steps."""
    model.check_labels(labels, cfg)
    if sampler not in SAMPLERS or (sampler == "dpm++" and eta != 0):
        raise UserError(f"sampler {sampler!r} with eta {eta}: choose ddim (any eta) or dpm++ "
                        f"(eta 0: it solves the deterministic ODE)")
    dev = model.alpha_bar.device
    x = noise.to(dev) if noise is not None else torch.randn(shape, generator=generator, device=dev)
    ts = ddim_timesteps(steps, model.T - 1)
    if sampler == "dpm++":
        x = dpm_solver_loop(model, x, ts, labels, cfg, progress=progress)
    else:
        x = ddim_loop(model, x, ts, eta, labels, cfg, generator, progress)
    return model.denormalize(x)


@torch.no_grad()
def ddim_invert(model, z, steps=50, labels=None, cfg=1.0, progress=False):
    """Inverse DDIM: run the eta = 0 update backwards, clean latent z -> its noise x_T.

    The update from grid step s up to t needs eps at x_t, which is what we are computing; as
    usual we use eps at (x_s, s) instead, an error that shrinks with the step size:

        x_0 = (x_s - sqrt(1 - a_s) eps) / sqrt(a_s),    x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps.
    """
    model.check_labels(labels, cfg)
    x = model.normalize(z.to(model.alpha_bar.device))
    ts = ddim_timesteps(steps, model.T - 1)
    B = x.shape[0]
    for i in tqdm(range(len(ts)), desc="inverse DDIM", disable=not progress, leave=False):
        s = ts[max(i - 1, 0)]                          # where x is now (step 0 for the clean z)
        a_s = model.alpha_bar[ts[i - 1]] if i > 0 else torch.ones_like(model.alpha_bar[0])
        a_t = model.alpha_bar[ts[i]]
        eps, _ = model.predict(x, torch.full((B,), int(s), device=x.device), labels, cfg)
        x0 = (x - (1 - a_s).sqrt() * eps) / a_s.sqrt()
        x = a_t.sqrt() * x0 + (1 - a_t).sqrt() * eps
    return x


@torch.no_grad()
def resample(model, z, strength, steps=50, eta=0.0, labels=None, cfg=1.0, generator=None,
             sampler="ddim"):
    """Generative resampling, one of the paper's applications (as SDEdit, Meng et al. 2022):
    noise z part of the way, to step t = strength * (T-1), with the forward process, then
    denoise with DDIM from there. strength 0 returns z; strength 1 forgets it entirely. Higher
    strength strays further from the input."""
    if not 0.0 <= strength <= 1.0:
        raise UserError(f"--strength {strength}: must be in [0, 1]")
    model.check_labels(labels, cfg)
    x0 = model.normalize(z.to(model.alpha_bar.device))
    t_max = round(strength * (model.T - 1))
    if t_max == 0:
        return z.clone()
    eps = torch.randn(x0.shape, generator=generator, device=x0.device)
    x = q_sample(x0, model.alpha_bar[t_max].expand(x0.shape[0]), eps)
    ts = ddim_timesteps(max(1, round(steps * strength)), t_max)
    if sampler == "dpm++":
        return model.denormalize(dpm_solver_loop(model, x, ts, labels, cfg))
    return model.denormalize(ddim_loop(model, x, ts, eta, labels, cfg, generator))


def slerp(a, b, w):
    """Spherical interpolation between two noise tensors (same shape), w in [0, 1]. Gaussian
    noise lives near a sphere of radius sqrt(dim); a straight line between two points dips inside
    it (to norm ~0.71x at the midpoint), off the distribution the model was trained on."""
    af, bf = a.flatten(), b.flatten()
    omega = torch.arccos((af @ bf / (af.norm() * bf.norm())).clamp(-1, 1))
    if omega.abs() < 1e-4:
        return (1 - w) * a + w * b
    return (torch.sin((1 - w) * omega) * a + torch.sin(w * omega) * b) / torch.sin(omega)


# ---------------------------------------------------------------------------------------------
# 5. Latents: the training data of stage 2, made once by the frozen autoencoder
# ---------------------------------------------------------------------------------------------
def file_id(path):
    """A short content hash: ties a latent cache and a diffusion checkpoint to one autoencoder."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


@torch.no_grad()
def encode_folder(ae_model, root, device, path, flip=True, batch=64, workers=0):
    """Every image of ROOT -> z with the autoencoder's posterior *mean*, written into the
    memory-mapped array PATH/z.npy (N, C, h, w) float32, batch by batch, with a progress bar.

    Why the mean and not a sample: the KL weight is tiny (1e-5), so the posterior is nearly a
    point and a sample differs from the mean by noise the decoder has learned to ignore; the mean
    makes the cache deterministic. flip adds each image's mirror image (its own encoding, since
    flipping z is not the same as encoding the flipped image): twice the data for free; a
    batch's mirror images follow the batch. Returns (labels (N,), classes).
    """
    c = ae_model.config
    ds = data_mod.open_folder(root, c["res"], depth=False, verbose=True)
    copies = 2 if flip else 1
    z_shape = (c["z_ch"], c["z_res"], c["z_res"])
    zs = data_mod.open_array(os.path.join(path, "z.npy"), np.float32, (copies * len(ds), *z_shape))
    labels, pos = [], 0
    loader = torch.utils.data.DataLoader(ds, batch_size=batch, num_workers=workers)
    for item in tqdm(loader, desc="encoding latents", unit="batch"):
        image = item["image"].to(device)                                     # (b, 3, H, W)
        for im in [image, image.flip(-1)] if flip else [image]:
            z = ae_model.encode(im).float().cpu().numpy()                    # (b, C, h, w)
            zs[pos:pos + len(z)] = z
            labels.append(item["label"])
            pos += len(z)
    zs.flush()
    del zs                                   # close the map before the folder is renamed
    return torch.cat(labels), list(ds.classes)


def latent_cache(ae_path, ae_model, root, out, device, flip=True, workers=0):
    """OUT/latents/: load it if it was made by this autoencoder from this folder, make it if
    it does not exist, and refuse (one line) if it belongs to another autoencoder.

    The cache is a folder: z.npy (N, C, h, w) float32, read as a memory map so that training
    holds only its batches in memory, labels.npy (N,) and meta.json (which autoencoder, which
    data). It is written into a temporary folder and renamed when complete: a run killed while
    encoding leaves no half cache that a later run would load. Returns dict(z (memory map),
    labels (N,), classes, ae_id, data, flip)."""
    path = os.path.join(out, "latents")
    ae_id, root = file_id(ae_path), os.path.abspath(root)
    if not os.path.isdir(path) and is_main():
        print(f"encoding {root} with {ae_path} into {path} (once; later runs reuse it)")
        with data_mod.writing(path, "the latent cache", safe=f"{ae_path} is untouched; free "
                              f"space and run again (it encodes again)") as tmp:
            os.makedirs(tmp)
            labels, classes = encode_folder(ae_model, root, device, tmp, flip, workers=workers)
            np.save(os.path.join(tmp, "labels.npy"), labels.numpy())
            with open(os.path.join(tmp, "meta.json"), "w") as f:
                json.dump(dict(kind=CACHE_KIND, ae_id=ae_id, data=root, flip=flip,
                               classes=classes), f)
    # The other processes wait for the folder to appear, polling the file system, not in a
    # collective: encoding a large data set in one process can outlast a collective's timeout
    # (10 minutes). (torchrun stops them all if rank 0 fails meanwhile.)
    while not os.path.isdir(path):
        time.sleep(2)
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
        cache = dict(meta, z=np.load(os.path.join(path, "z.npy"), mmap_mode="r"),
                     labels=torch.from_numpy(np.load(os.path.join(path, "labels.npy"))))
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"{path}: not a readable latent cache ({type(e).__name__}); delete the "
                        f"folder and run again to re-encode")
    if meta.get("kind") != CACHE_KIND or meta["ae_id"] != ae_id:
        raise UserError(f"{path}: these latents were made by another autoencoder (not "
                        f"{ae_path}); delete the folder or choose another --out")
    if meta["data"] != root or meta["flip"] != flip:
        raise UserError(f"{path}: these latents were made from {meta['data']} (flip "
                        f"{meta['flip']}); delete the folder or choose another --out")
    return cache


def channel_stats(z, chunk=4096):
    """Per-channel mean and std (C,) of a (N, C, h, w) array read in chunks (float64 sums), so
    a memory-mapped cache is never loaded whole."""
    s = s2 = 0
    for lo in range(0, len(z), chunk):
        x = torch.from_numpy(np.asarray(z[lo:lo + chunk], dtype=np.float64))
        s, s2 = s + x.sum((0, 2, 3)), s2 + x.square().sum((0, 2, 3))
    n = len(z) * z.shape[2] * z.shape[3]
    mean = s / n
    return mean.float(), ((s2 - n * mean.square()) / (n - 1)).clamp_min(0).sqrt().float()


# ---------------------------------------------------------------------------------------------
# 6. Training
# ---------------------------------------------------------------------------------------------
PRESETS = {
    # One GPU, z 4x32x32 (the base autoencoder): 3 levels 32-16-8, attention at 16 and 8.
    # v + cosine as small: predicting eps, both presets measured sampled latents too spread.
    "base": dict(ch=128, ch_mult="1,2,2", num_res=2, attn_res="16,8", heads=4, dropout=0.1,
                 batch=64, lr=1e-4, steps=200_000, ema=0.9999, every=5000, pred="v",
                 schedule="cosine"),
    # A laptop CPU, z 4x8x8 (the tiny autoencoder): two levels, attention at 4x4.
    "tiny": dict(ch=32, ch_mult="1,2", num_res=1, attn_res="4", heads=2, dropout=0.0,
                 batch=64, lr=5e-4, steps=8000, ema=0.999, every=2000, pred="eps",
                 schedule="linear"),
    # z 8x8x8 (the small autoencoder, 64 px): tiny's UNet 1.5x wider for half its steps, the
    # cosine schedule, and v-prediction: predicting eps, the x_0 it implies at high noise
    # multiplies the error by up to 1/sqrt(alpha_bar) ~ 160, and the samples' latents came out
    # ~7x as spread as the data's (colour blobs); v fixed it.
    "small": dict(ch=48, ch_mult="1,2", num_res=1, attn_res="4", heads=2, dropout=0.0,
                  batch=64, lr=5e-4, steps=4000, ema=0.999, every=1000, pred="v",
                  schedule="cosine"),
}
MODEL_KEYS = ("ch", "ch_mult", "num_res", "attn_res", "heads", "dropout")
SAMPLE_STEPS = 50          # DDIM steps of the sample grids written while training


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train WildFusion's latent diffusion model (stage 2).",
                                formatter_class=training.Help,
                                epilog=training.PRESET_EPILOG)
    a = p.add_argument
    a("--ae", help="the trained autoencoder checkpoint (stage 1)")
    a("--data", help="image folder (default: the folder the autoencoder was trained on)")
    a("--preset", default="base", choices=list(PRESETS))
    a("--out", default=None, help="run folder (default runs/ldm-PRESET)")
    a("--toy", action="store_true", help="train on 8 Gaussians on a ring instead and report "
      "how often each mode is sampled (no autoencoder needed)")
    a("--ch", type=int, default=None, help="UNet base width")
    a("--ch-mult", default=None, help="width multiple per level, e.g. 1,2,2")
    a("--num-res", type=int, default=None, help="residual blocks per level")
    a("--attn-res", default=None, help="resolutions with self-attention, e.g. 16,8")
    a("--dropout", type=float, default=None)
    a("--schedule", default=None, choices=["linear", "cosine"], help="the noise schedule "
      "(default: the preset's)")
    a("--pred", default=None, choices=["eps", "v"], help="what the UNet predicts (eps: the "
      "noise, as DDPM and LDM; v: Salimans & Ho's rotation of noise and signal)")
    a("--uncond", action="store_true", help="ignore class labels even if the data has them")
    a("--p-uncond", type=float, default=0.1, help="label dropout, for classifier-free guidance")
    a("--steps", type=int, default=None)
    a("--batch", type=int, default=None, help="latents per micro-batch, over all processes")
    a("--accum", type=int, default=1, help="micro-batches accumulated per optimiser step "
      "(effective batch: --batch x --accum)")
    a("--lr", type=float, default=None)
    a("--ema", type=float, default=None, help="EMA decay of the weights used for sampling")
    a("--every", type=int, default=None, help="sample grid + checkpoint every N steps")
    training.add_runtime_args(p, "the UNet")
    args = training.apply_preset(p.parse_args(argv), PRESETS)
    args.out = args.out or ("runs/toy" if args.toy else f"runs/ldm-{args.preset}")
    return args


def int_list(text, flag):
    try:
        return [int(v) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected comma-separated integers, e.g. 1,2,2")


def check_args(args):
    training.check_runtime_args(args)
    need(0 <= args.p_uncond < 1, "--p-uncond must be in [0, 1)")
    need(args.ch > 0 and args.num_res > 0, "--ch and --num-res must be positive")
    need(args.ch * min(int_list(args.ch_mult, "--ch-mult")) % args.heads == 0,
         f"--ch must be a multiple of the preset's {args.heads} attention heads")


def model_config(args, latent_shape, classes):
    C, H, W = latent_shape
    levels = len(int_list(args.ch_mult, "--ch-mult"))
    if H % 2 ** (levels - 1):
        raise UserError(f"--ch-mult {args.ch_mult}: {levels} levels need the latent size ({H}) "
                        f"to be divisible by {2 ** (levels - 1)}")
    return dict(latent_shape=list(latent_shape), ch=args.ch,
                ch_mult=int_list(args.ch_mult, "--ch-mult"), num_res=args.num_res,
                attn_res=int_list(args.attn_res, "--attn-res"), heads=args.heads,
                dropout=args.dropout, schedule=args.schedule, pred=args.pred, T=1000,
                num_classes=len(classes), classes=list(classes))


def load(path, device="cpu"):
    """A diffusion checkpoint -> LatentDiffusion with the EMA weights, in eval mode (public
    API). model.config["ae_id"] names the autoencoder its latents came from."""
    ckpt = training.load_checkpoint(path, CKPT_KIND, "a diffusion checkpoint "
                                    "(runs/ldm/ckpt.pt)")
    model = LatentDiffusion(ckpt["config"])
    model.load_state_dict(ckpt["ema"])
    return model.to(device).eval()


def load_models(ae_path, ldm_path, device):
    """The autoencoder and (optionally) the diffusion model, refusing a pair that does not belong
    together: the diffusion model learned the latents of one autoencoder, and any other decodes
    its samples into noise."""
    if not ae_path:
        raise UserError("--ae is required: the autoencoder checkpoint (runs/ae/ckpt.pt)")
    ae_model = ae.load(ae_path, device)
    if not ldm_path:
        return ae_model, None
    ldm = load(ldm_path, device)
    if ldm.config.get("ae_id") != file_id(ae_path):
        raise UserError(f"{ldm_path} was trained on the latents of another autoencoder "
                        f"({ldm.config.get('ae_path')}), not {ae_path}; pass that one as --ae")
    return ae_model, ldm


@torch.no_grad()
def sample_grid(model, ae_model, n, steps, path, seed=0, safe=data_mod.SAFE):
    """The PNG a person reads while training: n DDIM samples (fixed noise, so successive grids
    are comparable), decoded to triplanes and rendered: P0 | depth | yaw -20, 0, +20 | depths.
    Class-conditional models cycle through their classes row by row."""
    dev = model.alpha_bar.device
    g = torch.Generator(device=dev).manual_seed(seed)
    labels = (torch.arange(n, device=dev) % model.num_classes) if model.num_classes else None
    z = ddim_sample(model, (n, *model.config["latent_shape"]), steps, labels=labels, generator=g)
    ae.view_grid(ae_model, ae_model.decode(z.to(next(ae_model.parameters()).device)), 20.0, path,
                 safe=safe)


def train_step(model, ema, opt, batches, step, args, autocast):
    """One optimiser step over the micro-batches [(x0, labels), ...] of normalised latents
    x0 (B, C, h, w), then the EMA update. Returns the logged values (scalar tensors)."""
    model.train()

    def loss_fn(x0, labels):
        # t ~ U{0..T-1}, eps ~ N(0, I), x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps,
        # loss = |net(x_t, t, y) - target|^2 with target eps or v (LatentDiffusion.loss).
        loss = model.loss(x0, labels, args.p_uncond)
        return loss, dict(loss=loss.detach()), None
    # Accumulation over micro-batches, one all-reduce across ranks, clipping, the update.
    logs, _ = training.optimiser_step(opt, batches, loss_fn, autocast, training.GRAD_CLIP)
    # EMA with a warm-up (decay grows from 0.1 towards args.ema): early EMA weights are
    # not stuck on the random init.
    training.ema_update(ema, model, training.ema_decay(step, args.ema))
    return logs


def read_batch(cache, model, step, micro, args, device):
    """This rank's micro-batch `micro` of `step`, read from the memory-mapped cache (only these
    rows come off the disk) -> normalised latents (B, C, h, w), labels (B,) or None."""
    idx = np.array([i for i, _ in training.batch_indices(step, len(cache["z"]), args.batch,
                                                         args.seed, micro, args.accum)])
    z = torch.from_numpy(np.ascontiguousarray(cache["z"][idx])).to(device)
    labels = cache["labels"][idx].to(device) if cache["use_labels"] else None
    return model.normalize(z), labels


def make_optimizer(model, lr):
    """AdamW without weight decay, as training uses it (and sample.py's demo times it).
    fused: one kernel updates every weight tensor, instead of a loop of small per-tensor ops
    (the tiny UNet has 129 of them, and on a CPU the loop is a visible part of its step)."""
    return torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, fused=True)


def setup(args):
    """The frozen autoencoder, the latents, the model, its EMA copy and optimiser, resumed
    where a checkpoint says. -> a namespace of them."""
    training.start(args)                              # first: check_args counts the processes
    check_args(args)
    device = torch.device(args.device)
    if not args.ae:
        raise UserError("--ae is required: the autoencoder checkpoint of stage 1 "
                        "(python autoencoder.py --preset tiny makes runs/ae-tiny/ckpt.pt)")
    # Stage 1 is frozen: it only encodes the data here and decodes the sample grids.
    ae_model = ae.load(args.ae, device).requires_grad_(False)
    root = args.data or ae_model.trained_on
    if not root or not os.path.isdir(root):
        raise UserError(f"the autoencoder's data folder {root!r} is gone; give --data")
    os.makedirs(args.out, exist_ok=True)
    # Mirrored images too, as the autoencoder saw them in training: twice the data.
    cache = latent_cache(args.ae, ae_model, root, args.out, device, workers=args.workers)
    z_all = cache["z"]                                       # (N, C, h, w), memory-mapped
    # Class-conditional when the folder has class sub-folders (and --uncond is not given).
    classes = [] if args.uncond else cache["classes"]
    cache["use_labels"] = bool(classes)

    config = model_config(args, z_all.shape[1:], classes)
    config.update(ae_id=cache["ae_id"], ae_path=os.path.abspath(args.ae))
    torch.manual_seed(args.seed)                    # the same initial weights on every rank
    model = LatentDiffusion(config).to(device)
    # The latent scale (and shift), measured once from the data, stored in the checkpoint.
    mean, std = channel_stats(z_all)
    model.latent_mean.copy_(mean)
    model.latent_std.copy_(std.clamp_min(1e-6))
    # The EMA copy is what samples (DDPM, App. B; every diffusion model since): averaging the
    # weights over the last ~1/(1 - decay) steps smooths out the noise of SGD on a noisy loss.
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = make_optimizer(model, args.lr)
    torch.manual_seed(args.seed + training.rank())  # but each rank its own t and noise
    ckpt_path, step = os.path.join(args.out, "ckpt.pt"), 0
    if args.resume:
        step = training.resume_from(ckpt_path, CKPT_KIND, config, args.seed, args=args,
                                    model=model, ema=ema, opt=opt)
    # What the run will cost here, said (or refused in one line) before the first step.
    labels_at = lambda B: (torch.zeros(B, dtype=torch.long, device=device) if classes
                           else None)
    model.train()
    training.preflight(lambda B: model.loss(torch.randn(B, *z_all.shape[1:], device=device),
                                            labels_at(B), args.p_uncond),
                       ([model], [ema]), args.batch, args.accum, args.steps - step, device,
                       f"the {args.preset} diffusion model")
    if args.compile:                                # CUDA: Triton; CPU: inductor's C++
        model.net.compile()                         # in place: state_dict keys unchanged
    if is_main():
        print(f"latents: {len(z_all)} of shape {tuple(z_all.shape[1:])} "
              f"({'with' if cache['flip'] else 'without'} mirrored copies), classes: "
              f"{', '.join(classes) if classes else 'none (unconditional)'}")
        print(f"UNet {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; "
              f"{args.schedule} schedule, predicts {args.pred}; {world()} process(es) on "
              f"{device}; batch {args.batch} x {args.accum} accumulated")
    return argparse.Namespace(device=device, ae_model=ae_model, cache=cache, config=config,
                              model=model, ema=ema, opt=opt, ckpt_path=ckpt_path, step=step)


def train(args):
    """Stage 2's loop: a step on a batch of cached latents, the EMA; logs, grids, checkpoints."""
    r = setup(args)
    model, ema, step = r.model, r.ema, r.step
    autocast = torch.autocast(r.device.type, torch.bfloat16, enabled=args.amp == "bf16")
    log = training.StepLog(args.steps, step, args.log_every, args.batch * args.accum, "z/s")
    while step < args.steps:
        # This rank's slices of the global batch, a pure function of the step (exact resume).
        batches = [read_batch(r.cache, model, step, k, args, r.device) for k in range(args.accum)]
        logs = train_step(model, ema, r.opt, batches, step, args, autocast)
        step += 1
        log.add(step, logs)
        # --- checkpoint (rank 0 writes; every rank hands over its RNG state) + sample grid ---
        if step % args.every == 0 or step == args.steps:
            training.save_on_main(r.ckpt_path, lambda rngs: dict(
                kind=CKPT_KIND, config=r.config, model=model.state_dict(), ema=ema.state_dict(),
                opt=r.opt.state_dict(), step=step, rng=rngs, args=dict(vars(args))))
            if is_main():
                ema.eval()
                sample_grid(ema, r.ae_model, 8, SAMPLE_STEPS,
                            os.path.join(args.out, f"samples_{step:06d}.png"), seed=args.seed,
                            safe=training.saved(r.ckpt_path, step))
    log.close()
    if is_main():
        print(f"done: {r.ckpt_path}, sample grids in {args.out}/samples_*.png "
              f"(rows: P0 | depth | yaw -20, 0, +20 | depths)")
    training.finish()
    return dict(model=model, ema=ema, history=log.history)


# ---------------------------------------------------------------------------------------------
# 7. The toy: mode coverage on 8 Gaussians on a ring
# ---------------------------------------------------------------------------------------------
RING_MODES = 8
RING_WEIGHTS = torch.tensor([1.0, 2.0] * (RING_MODES // 2)) / (1.5 * RING_MODES)  # 1/12, 2/12


def ring_data(n, generator=None, shape=(2, 4, 4), radius=2.0, std=0.1):
    """n latents whose first two channels hold a point of a mixture of 8 Gaussians on a circle
    (weights alternating 1/12 and 2/12, so a sampler must get the proportions right too), the
    same point at every pixel, the other channels zero. Returns x (n, *shape), mode (n,)."""
    mode = torch.multinomial(RING_WEIGHTS, n, replacement=True, generator=generator)
    angle = 2 * math.pi * mode / RING_MODES
    xy = radius * torch.stack([angle.cos(), angle.sin()], 1)
    xy = xy + std * torch.randn(n, 2, generator=generator)                   # (n, 2)
    x = torch.zeros(n, *shape)
    x[:, :2] = xy[:, :, None, None]
    return x, mode


def ring_modes(x, radius=2.0):
    """Which mode each sample fell into (nearest centre), -1 if it is off the ring (further than
    radius / 4 from every centre). x (n, C, H, W) -> (n,)."""
    xy = x[:, :2].mean((2, 3))                                                # (n, 2)
    angle = 2 * math.pi * torch.arange(RING_MODES) / RING_MODES
    centres = radius * torch.stack([angle.cos(), angle.sin()], 1)            # (8, 2)
    dist, mode = torch.cdist(xy, centres).min(1)
    return torch.where(dist < radius / 4, mode, -1)


def toy_model(pred="eps"):
    config = dict(latent_shape=[2, 4, 4], ch=32, ch_mult=[1, 2], num_res=1, attn_res=[2],
                  heads=2, dropout=0.0, schedule="linear", pred=pred, T=1000, num_classes=0,
                  classes=[])
    return LatentDiffusion(config)


def train_toy(steps=1500, batch=128, lr=2e-3, pred="eps", seed=0, progress=False):
    """Fit the toy UNet to the ring; returns (EMA model, loss history)."""
    torch.manual_seed(seed)
    model, g = toy_model(pred), torch.Generator().manual_seed(seed)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    losses = []
    for step in tqdm(range(steps), desc="toy", disable=not progress):
        x, _ = ring_data(batch, g)
        loss = model.loss(x)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        training.ema_update(ema, model, training.ema_decay(step, 0.995))
        losses.append(loss.item())
    return ema.eval(), losses


def toy(args):
    """python diffusion.py --toy: train, sample 2000 points with DDIM-50, report each mode's
    frequency against its true weight and draw data vs samples."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model, _ = train_toy(pred=args.pred, seed=args.seed, progress=True)
    g = torch.Generator().manual_seed(args.seed + 1)
    x = ddim_sample(model, (2000, 2, 4, 4), steps=50, generator=g, progress=True)
    mode = ring_modes(x)
    freq = torch.stack([(mode == k).float().mean() for k in range(RING_MODES)])
    print(f"DDIM-50, 2000 samples; {(mode < 0).float().mean():.1%} fell off the ring")
    print("mode   true   sampled")
    for k in range(RING_MODES):
        print(f"{k:4d}  {RING_WEIGHTS[k]:.3f}   {freq[k]:.3f}")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    real, _ = ring_data(2000, torch.Generator().manual_seed(123))
    fig, axes = plt.subplots(1, 3, figsize=(12, 4))
    for ax, pts, title in ((axes[0], real, "data"), (axes[1], x, "DDIM-50 samples")):
        xy = pts[:, :2].mean((2, 3))
        ax.scatter(xy[:, 0], xy[:, 1], s=2, alpha=0.5)
        ax.set_title(title)
        ax.set_aspect("equal")
        ax.set_xlim(-3, 3)
        ax.set_ylim(-3, 3)
    k = torch.arange(RING_MODES)
    axes[2].bar(k - 0.2, RING_WEIGHTS, 0.4, label="true weight")
    axes[2].bar(k + 0.2, freq, 0.4, label="sampled")
    axes[2].set_title("mode frequencies")
    axes[2].set_ylim(0, 0.22)
    axes[2].legend(loc="upper center", ncol=2)
    path = os.path.join(args.out, "ring.png")
    fig.tight_layout()
    with data_mod.writing(path, "a picture") as tmp:
        fig.savefig(tmp, dpi=80)
    print(f"wrote {path}")


def main(argv=None):
    args = get_args(argv)
    if args.toy:
        toy(args)
    else:
        train(args)


if __name__ == "__main__":
    data_mod.run_cli(main)
