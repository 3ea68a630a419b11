"""
autoencoder.py -- stage 1 of WildFusion: a 3D-aware autoencoder trained on unposed single images.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570), Sec. 3.1. The encoder compresses an
image into a small latent grid z; the decoder turns z into a triplane, a 3D feature field that is
volume-rendered. From the input camera P0 the render must reproduce the photo (reconstruction
loss) and its monocular depth (depth loss); from random nearby cameras, where no photo exists,
it must look real to a discriminator (adversarial loss) and, with --warp-weight (not in the
paper), agree with the photo moved there by its depth. Stage 2 (diffusion.py) then learns to
generate z. No camera poses are ever needed: everything lives in view space (README,
Conventions).

    python autoencoder.py --preset tiny                       # 2-core CPU: 8-27 min (README)
    python autoencoder.py --preset small                      # 64 px, 2-core CPU: 30-51 min
    python autoencoder.py --data photos/ --out runs/ae        # one GPU, 256 px
    python autoencoder.py --data photos/ --amp bf16 --compile # bf16 + torch.compile, any device
    torchrun --nproc_per_node=4 autoencoder.py --data photos/ # 4 GPUs, data parallel
    python autoencoder.py --eval runs/ae/ckpt.pt              # novel-view PSNR (evaluate.py)

With no --data it renders the synthetic scenes of scenes.py once (cached under data/) and trains on
them, so it runs on a fresh machine with no download.

Map of the file:
    1. building blocks     ResBlock, down/up-sampling
    2. encoder             FPN over the image (+ depth) -> mean and log-variance of z
    3. decoder             transformer over z's tokens + CNN -> triplane
    4. field + upsampler   triplane features -> density, features; low-res render -> RGB
    5. the autoencoder     encode / decode / render, the public API; load()
    6. discriminator       judges (RGB, depth) of novel views against (photo, its depth)
    7. losses              KL, depth loss (aligned for estimates, metric for true depth),
                           the photo warped into novel views, GAN, R1
    8. pictures            previews of novel views and depth (scores: evaluate.py)
    9. training            presets, data order, checkpoints, the EMA of the weights, the loop
"""
import argparse
import copy
import functools
import math
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import data as data_mod
import render
import scenes
from data import UserError

CKPT_KIND = "wildfusion-autoencoder"


# ---------------------------------------------------------------------------------------------
# 1. Building blocks
# ---------------------------------------------------------------------------------------------
def norm(c):
    """GroupNorm with up to 32 groups that divide c (small models have few channels)."""
    return nn.GroupNorm(math.gcd(32, c), c)


class ResBlock(nn.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))): the residual block of LDM's autoencoder."""

    def __init__(self, c_in, c_out):
        super().__init__()
        self.body = nn.Sequential(norm(c_in), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1),
                                  norm(c_out), nn.SiLU(), nn.Conv2d(c_out, c_out, 3, padding=1))
        self.skip = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.body(x)


def upsample(c):
    """x2 nearest-neighbour upsampling, then a conv to smooth the blocks away."""
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c, c, 3, padding=1))


# ---------------------------------------------------------------------------------------------
# 2. Encoder: image (+ depth) -> q(z | x) = N(mean, exp(logvar))
# ---------------------------------------------------------------------------------------------
class Encoder(nn.Module):
    """A convolutional feature pyramid, fused FPN-style at the latent resolution.

    The image goes through stages at 1/2, 1/4, ... of its size, one stage *below* the latent
    resolution for global context. Each stage's output is projected (1x1 conv) to a common width
    and resized to the latent grid: finer maps are area-averaged (detail), the coarser map is
    upsampled (context); their sum is refined and mapped to 2 * z_ch channels: the mean and
    log-variance of a diagonal Gaussian per latent cell.
    """

    def __init__(self, in_ch, ch, z_ch, down):
        super().__init__()
        n = int(math.log2(down)) + 1
        widths = [ch * min(2 ** i, 4) for i in range(n)]
        self.stem = nn.Conv2d(in_ch, ch, 3, padding=1)
        self.stages = nn.ModuleList()
        c_prev = ch
        for w in widths:
            self.stages.append(nn.Sequential(ResBlock(c_prev, w), nn.Conv2d(w, w, 3, 2, 1)))
            c_prev = w
        width = widths[-1]
        self.lateral = nn.ModuleList([nn.Conv2d(w, width, 1) for w in widths])
        self.out = nn.Sequential(ResBlock(width, width), norm(width), nn.SiLU(),
                                 nn.Conv2d(width, 2 * z_ch, 3, padding=1))

    def forward(self, x):
        h = self.stem(x)
        size = x.shape[-1] // 2 ** (len(self.stages) - 1)                    # latent grid side
        fused = 0
        for stage, lateral in zip(self.stages, self.lateral):
            h = stage(h)                                                     # (B, w, s, s)
            p = lateral(h)
            fused = fused + (F.adaptive_avg_pool2d(p, size) if p.shape[-1] >= size else
                             F.interpolate(p, size=size, mode="bilinear", align_corners=False))
        mean, logvar = self.out(fused).chunk(2, dim=1)                       # (B, z_ch, h, w)
        return mean, logvar.clamp(-30, 20)


# ---------------------------------------------------------------------------------------------
# 3. Decoder: z -> triplane
# ---------------------------------------------------------------------------------------------
class Decoder(nn.Module):
    """z (B, z_ch, h, w) -> planes (B, 3, C, R, R).

    Why a transformer *and* convolutions: the xy plane is roughly the image itself, but the xz
    and yz planes are seen edge-on from P0 -- one of their texels gathers evidence from a whole
    row or column of the image. Self-attention over the latent tokens lets every output position
    see the whole latent (global context). The convolutions then upsample to the plane
    resolution and add local detail, which attention over a coarse grid cannot.

    axis=True (`--plane-decode axis`) gives the xz and yz planes grids laid out like them
    before the convolutions (axis_grids). On the tiny preset it measured no better than the
    default (README, Results), so the default stays the simpler one.
    """

    def __init__(self, z_ch, h, dim, depth, heads, plane_ch, plane_res, centre=False,
                 axis=False):
        super().__init__()
        self.plane_ch, self.plane_res, self.centre, self.axis = plane_ch, plane_res, centre, axis
        self.inp = nn.Conv2d(z_ch, dim, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, h * h, dim) * 0.02)          # learned 2D positions
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        if axis:
            # axis=True: each plane gets a grid of its own, laid out like the plane (see
            # axis_grids), and one CNN, shared by the three, decodes them in a batch.
            self.lift_xz = nn.Conv1d(dim, dim * h, 1)          # column x -> h cells along z
            self.lift_yz = nn.Conv1d(dim, dim * h, 1)          # row y    -> h cells along z
            self.plane_id = nn.Parameter(torch.zeros(3, dim, 1, 1))   # which plane this is
        ups = [ResBlock(dim, dim)]
        c = dim
        # centre=True: the CNN stops at half the plane resolution, aligned with z's grid, and
        # forward() places that in the central half of each plane (see there).
        for _ in range(int(math.log2(plane_res // h)) - int(centre)):
            c_next = max(c // 2, 3 * plane_ch)
            ups += [upsample(c), ResBlock(c, c_next)]
            c = c_next
        out_ch = plane_ch if axis else 3 * plane_ch
        self.cnn = nn.Sequential(*ups, norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 3, padding=1))

    def forward(self, z):
        x = self.inp(z)                                                      # (B, D, h, w)
        B, D, h, w = x.shape
        tokens = self.transformer(x.flatten(2).transpose(1, 2) + self.pos)   # (B, h*w, D)
        x = tokens.transpose(1, 2).reshape(B, D, h, w)
        if self.axis:
            grids = self.axis_grids(x)                                      # (B, 3, D, h, w)
            planes = self.cnn(grids.flatten(0, 1))                          # (3B, C, R', R')
            planes = planes.unflatten(0, (B, 3)).flatten(1, 2)              # (B, 3C, R', R')
        else:
            planes = self.cnn(x)                                            # (B, 3C, R', R')
        if self.centre:
            # The image covers roughly the un-contracted unit cube, which the contraction maps
            # to the central half of each plane. Decoding z over the whole plane would make the
            # convolutions learn a 2x zoom from z's grid to the plane's (measured: -2 dB at yaw
            # 20 on the tiny preset). Instead the CNN output (R/2 texels, aligned with z) *is*
            # the central half, and the contracted outer ring continues its border outwards.
            # Replicate-padding by q texels, written as a gather: index -q..n+q-1 clamped
            # into the CNN's n = R/2 texels (the same numbers as F.pad(mode="replicate"),
            # whose backward fails under torch.compile on a CPU in torch 2.13).
            q, n = self.plane_res // 4, planes.shape[-1]
            idx = torch.arange(-q, n + q, device=planes.device).clamp(0, n - 1)
            planes = planes[..., idx, :][..., idx]                           # (B, 3C, R, R)
        return planes.view(B, 3, self.plane_ch, self.plane_res, self.plane_res)

    def axis_grids(self, x):
        """Token grid (B, D, h, w) -> one grid per plane, laid out like that plane (B, 3, D, h, w).

        The token grid is laid out like the image: rows are y, columns x (OpenCV axes at P0),
        so it *is* the xy plane's layout (height y, width x). The xz plane is (height z, width
        x) and the yz plane (height z, width y): neither has an image axis along z, and a
        local CNN on the image grid would even find the yz plane's y along its columns,
        transposed. So each image column (all the input saw at that x) is pooled and lifted to
        h cells along z by a 1x1 convolution, and each image row (y) likewise.
        """
        B, D, h, w = x.shape
        xz = self.lift_xz(x.mean(2)).view(B, D, h, w)                       # (B, D, z, x)
        yz = self.lift_yz(x.mean(3)).view(B, D, h, h)                       # (B, D, z, y)
        return torch.stack([x, xz, yz], 1) + self.plane_id                  # (B, 3, D, h, w)


# ---------------------------------------------------------------------------------------------
# 4. Field MLP and upsampler
# ---------------------------------------------------------------------------------------------
class Field(nn.Module):
    """Triplane features (B, M, C) -> density (B, M, 1) >= 0 and features (B, M, F).

    Two output heads rather than one sliced output (slicing costs a zero-filled gradient of the
    full size per slice in the backward pass). The first 3 features are read as a raw RGB
    colour, so the low-resolution render is itself an image that is exactly 3D-consistent.
    """

    def __init__(self, c_in, hidden, c_out, layers=1):
        super().__init__()
        dims = [c_in] + [hidden] * layers              # EG3D: one hidden layer of 64
        self.hidden = nn.Sequential(*[m for a, b in zip(dims, dims[1:])
                                      for m in (nn.Linear(a, b), nn.ReLU())])
        self.density, self.features = nn.Linear(hidden, 1), nn.Linear(hidden, c_out)

    def forward(self, feats):
        h = self.hidden(feats)
        # softplus keeps the density positive and smooth; the -1 shift starts the scene
        # mostly transparent, so early training does not lock in a wall in front of the camera.
        return F.softplus(self.density(h) - 1.0), self.features(h)


class Upsampler(nn.Module):
    """Low-res feature image (B, F, r, r) -> RGB (B, 3, res, res), as EG3D's super-resolution.

    Predicts a residual over the bilinearly upsampled raw RGB, so it adds detail but starts from
    (and stays close to) the 3D-consistent render. With highpass=True (`--sr-highpass`) the
    residual has zero mean over every factor x factor block of output pixels, i.e. over every
    render pixel: the CNN may add detail finer than the render, never change its colours. The
    CNN is trained at P0 only, and a colour correction it learns there is not 3D-consistent: on
    small autoencoders the residual's block means gave +0.3 to +0.6 dB at P0 and cost 0.1 to
    0.3 dB at yaw +-20 (README, Results).
    """

    def __init__(self, c_in, ch, factor, highpass=False):
        super().__init__()
        layers = [nn.Conv2d(c_in, ch, 3, padding=1), ResBlock(ch, ch)]
        for _ in range(int(math.log2(factor))):
            layers += [upsample(ch), ResBlock(ch, ch)]
        self.net = nn.Sequential(*layers, norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        self.factor, self.highpass = factor, highpass

    def forward(self, feats):
        raw = feats[:, :3]
        base = raw if self.factor == 1 else F.interpolate(raw, scale_factor=self.factor,
                                                          mode="bilinear", align_corners=False)
        residual = self.net(feats)                                           # (B, 3, res, res)
        if self.highpass:
            # minus each block's mean: r - up(avg_pool(r)), so avg_pool(residual) = 0 exactly
            block_mean = F.avg_pool2d(residual, self.factor)                 # (B, 3, low, low)
            residual = residual - F.interpolate(block_mean, scale_factor=self.factor)
        return base + residual


# ---------------------------------------------------------------------------------------------
# 5. The autoencoder and its public API
# ---------------------------------------------------------------------------------------------
class AutoEncoder(nn.Module):
    """encode(image, depth) -> z; decode(z) -> planes; render(planes, cam2world) -> images.

    `config` (a plain dict, saved in checkpoints) holds everything needed to rebuild the model,
    including the camera: res, fov_deg, radius.
    """

    def __init__(self, config):
        super().__init__()
        c = self.config = full_config(config)
        down = c["res"] // c["z_res"]
        self.encoder = Encoder(4 if c["depth_input"] else 3, c["enc_ch"], c["z_ch"], down)
        self.decoder = Decoder(c["z_ch"], c["z_res"], c["dec_dim"], c["dec_depth"],
                               c["dec_heads"], c["plane_ch"], c["plane_res"],
                               centre=c["plane_layout"] == "centre",
                               axis=c["plane_decode"] == "axis")
        self.field = Field(c["plane_ch"], c["hidden"], c["feat_ch"], c["field_layers"])
        self.upsampler = Upsampler(c["feat_ch"], c["up_ch"], c["res"] // c["render_res"],
                                   highpass=c["sr_highpass"])
        self.compile = False                          # set by the training script (--compile)

    def posterior(self, image, depth=None):
        """image (B, 3, H, W) in [-1, 1], depth (B, 1, H, W) -> mean, logvar (B, z_ch, h, w)."""
        x = image
        if self.config["depth_input"]:
            if depth is None:
                raise UserError("this autoencoder was trained with --depth-input: give it the "
                                "image's depth map too (ROOT/depth/...)")
            x = torch.cat([image, normalize_depth(depth)], 1)
        return self.encoder(x)

    def encode(self, image, depth=None):
        """The posterior mean: the latent the diffusion model learns (public API, README)."""
        return self.posterior(image, depth)[0]

    def decode(self, z):
        return self.decoder(z)                                               # (B, 3, C, R, R)

    def render(self, planes, cam2world, res=None, perturb=False, with_distortion=False):
        """Render triplanes from cameras (B, 4, 4). res: output size (default config res);
        the volume renderer runs at res * render_res / config res, the upsampler does the rest.
        Returns image (B, 3, res, res), raw (the 3D-consistent low-res RGB), depth, opacity, and
        with with_distortion=True distortion (render.render's maps at its resolution)."""
        c = self.config
        res = res or c["res"]
        low = max(1, res * c["render_res"] // c["res"])
        out = render.render(planes, self.field, cam2world, c["fov_deg"], low, radius=c["radius"],
                            n_coarse=c["n_coarse"], n_fine=c["n_fine"], perturb=perturb,
                            contraction=c["contraction"], compile=self.compile,
                            with_distortion=with_distortion)
        feats = out["features"]                                              # (B, F, low, low)
        image = self.upsampler(feats)
        if image.shape[-1] != res:                                           # odd output sizes
            image = F.interpolate(image, size=res, mode="bilinear", align_corners=False)
        return dict(image=image, raw=feats[:, :3], depth=out["depth"], opacity=out["opacity"],
                    distortion=out.get("distortion"))

    def P0(self, n):
        """The input camera, n times: (n, 4, 4)."""
        return render.p0_camera(n, self.config["radius"])


# Model settings added after the first checkpoints were written, with the value those older
# checkpoints were trained with: they load, and resume, as what they were.
ADDED_LATER = dict(plane_layout="full", plane_decode="grid", field_layers=1, sr_highpass=False)


def full_config(config):
    return {**ADDED_LATER, **config}


def disparity_stats(depth):
    """Depth (B, 1, H, W) -> its inverse, the disparity (B, 1, H, W), and that disparity's
    per-image mean and standard deviation (B, 1, 1, 1)."""
    disp = 1.0 / depth.clamp_min(1e-3)
    mean = disp.mean((1, 2, 3), keepdim=True)
    return disp, mean, disp.std((1, 2, 3), keepdim=True).clamp_min(1e-6)


def normalize_depth(depth):
    """Per-image standardised inverse depth (B, 1, H, W): bounded, so a far background does not
    dominate, and blind to the unknown scale and shift of monocular estimates."""
    disp, mean, std = disparity_stats(depth)
    return (disp - mean) / std


def load(path, device="cpu"):
    """An autoencoder checkpoint -> AutoEncoder in eval mode (public API, README), with the
    EMA weights where the run kept them (--ema), else the trained ones."""
    ckpt = load_checkpoint(path, CKPT_KIND, "an autoencoder checkpoint (runs/ae/ckpt.pt)")
    model = AutoEncoder(ckpt["config"])
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    model.trained_on = ckpt.get("data")              # the image folder it was trained on
    return model.to(device).eval()


def load_checkpoint(path, kind, what):
    """torch.load with weights_only=True (a checkpoint is untrusted input) and a kind check."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                        f"expected {what}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: this is a {found} checkpoint, expected {what}")
    return ckpt


# ---------------------------------------------------------------------------------------------
# 6. Discriminator on (RGB, depth) pairs
# ---------------------------------------------------------------------------------------------
# --disc-sees: what the discriminator judges -> (its input channels, how the log names it)
DISC_SEES = dict(both=(4, "RGB + depth"), rgb=(3, "RGB only"), depth=(1, "depth only"))


class Discriminator(nn.Module):
    """A plain convolutional classifier (strided convolutions, no residual connections) on
    RGB and standardised inverse depth (sees="both"), on RGB alone ("rgb", and always when the
    data has no depth maps) or on depth alone ("depth"; --disc-sees).

    Seeing depth with colour, it can reject a novel view whose geometry is implausible even if
    its colours are fine (a flat billboard turned sideways, say), which is what pushes the
    autoencoder towards real 3D shape (paper Sec. 3.1). Seeing depth alone, it can only judge
    shape, so the generator has no reason to paint colours for it.
    """

    def __init__(self, res, ch=32, max_ch=256, sees="both", augment=False):
        super().__init__()
        self.sees = sees
        self.in_ch = DISC_SEES[sees][0]
        self.augment = augment                        # --disc-augment: see diff_augment
        layers, c = [nn.Conv2d(self.in_ch, ch, 3, padding=1)], ch
        # Each stage: a 3x3 conv, then a strided 4x4 conv that halves the resolution and (up to
        # max_ch) doubles the width, until 4x4 is left; a linear layer then gives one logit.
        while res > 4:
            c_next = min(c * 2, max_ch)
            layers += [nn.LeakyReLU(0.2), nn.Conv2d(c, c_next, 3, padding=1), nn.LeakyReLU(0.2),
                       nn.Conv2d(c_next, c_next, 4, 2, 1)]
            c, res = c_next, res // 2
        self.body = nn.Sequential(*layers, nn.LeakyReLU(0.2))
        self.head = nn.Linear(c * res * res, 1)

    def inputs(self, image, depth, low):
        """What the discriminator sees: (B, 4, H, W) = RGB + standardised inverse depth,
        (B, 3, H, W) = RGB or (B, 1, H, W) = depth, as it was built. The R1 penalty
        differentiates with respect to exactly this tensor, so it covers every input channel.

        Rendered depth exists only at the volume renderer's size `low` (64 px at 256 px): real
        and fake depth both go down to `low` and back up by nearest neighbour, so that the
        blocks of an upsampled map cannot by themselves tell a fake from a photo."""
        if self.sees == "rgb":
            return image
        if depth.shape[-1] != low:
            depth = F.interpolate(depth, size=low, mode="nearest")
        if depth.shape[-2:] != image.shape[-2:]:
            depth = F.interpolate(depth, size=image.shape[-2:], mode="nearest")
        if self.sees == "depth":
            return normalize_depth(depth)
        return torch.cat([image, normalize_depth(depth)], 1)

    def forward(self, x):
        if self.augment:                  # inside D: real, fake, G's step and R1 all see it
            x = diff_augment(x)
        return self.head(self.body(x).flatten(1)).squeeze(1)                # (B,) logits


def diff_augment(x, shift=1 / 8, cut=1 / 2):
    """Differentiable augmentation (DiffAugment, Zhao et al. 2020: translation + cutout) of the
    discriminator's input x (B, C, H, W), fresh for every image: shift it by up to `shift` of
    its size (zero padding), then zero a random square `cut` of its size wide. Colour and depth
    channels move together, so the pair stays aligned. Applied to reals and fakes alike, D
    cannot memorise the few thousand training photos and must judge what survives the
    augmentation; the generator learns through it (both are index gathers and masks) and is
    never asked to produce shifted or cut images."""
    B, C, H, W = x.shape
    dev = x.device
    s = max(1, round(shift * H))
    dy, dx = torch.randint(-s, s + 1, (2, B, 1, 1), device=dev)
    ys, xs = torch.arange(H, device=dev).view(1, H, 1), torch.arange(W, device=dev).view(1, 1, W)
    rows, cols = ys - dy, xs - dx                  # the source pixel of each output pixel
    inside = (rows >= 0) & (rows < H) & (cols >= 0) & (cols < W)             # (B, H, W)
    b = torch.arange(B, device=dev).view(B, 1, 1)
    out = x.permute(0, 2, 3, 1)[b, rows.clamp(0, H - 1), cols.clamp(0, W - 1)]  # (B, H, W, C)
    cy, cx = torch.randint(0, H, (B, 1, 1), device=dev), torch.randint(0, W, (B, 1, 1), device=dev)
    half = max(1, round(cut * H / 2))
    cut_out = (ys - cy >= -half) & (ys - cy < half) & (xs - cx >= -half) & (xs - cx < half)
    kept = ~cut_out                                # the square: 2 * half pixels wide
    return (out * (inside & kept).unsqueeze(-1)).permute(0, 3, 1, 2)        # (B, C, H, W)


# ---------------------------------------------------------------------------------------------
# 7. Losses
# ---------------------------------------------------------------------------------------------
def kl_loss(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) = 1/2 sum(mean^2 + exp(logvar) - 1 - logvar),
    summed over the latent, averaged over the batch (the VAE's regulariser, kept small)."""
    return 0.5 * (mean.square() + logvar.exp() - 1 - logvar).flatten(1).sum(1).mean()


def align_scale_shift(pred, target):
    """Per-image least squares: (s, b) = argmin sum (s * pred + b - target)^2, closed form.

    pred, target (B, N). s = cov(pred, target) / var(pred), b = mean(target) - s mean(pred).
    s is kept positive, |cov| / var: an *inverted* depth map must not fit as well as the right
    one (with s < 0 it would). Not clamped at 0: with s = 0 the aligned prediction is the
    constant b, whose loss has no gradient at all, and a model that starts out anti-correlated
    would stay there; with |cov| the loss pushes it out at once.
    """
    pm, tm = pred.mean(1, keepdim=True), target.mean(1, keepdim=True)
    cov = ((pred - pm) * (target - tm)).mean(1, keepdim=True)
    var = (pred - pm).square().mean(1, keepdim=True)
    s = cov.abs() / var.clamp_min(1e-8)
    return s, tm - s * pm


def depth_residual(rendered, mono, metric=False):
    """What the depth loss penalises: the rendered disparity minus the target's, both in the
    target's standardised units, per pixel -> (B, 1, h, w).

    Scale-and-shift invariant (MiDaS-style), in inverse depth: monocular depth is only known up
    to scale and shift -- for the usual estimators, affine in *disparity* -- so both maps become
    disparity, the monocular one is standardised, and the rendered one is aligned onto it by
    least squares. Aligning the prediction (not the target) means a flat prediction cannot
    score zero: it fits only the mean.
    rendered (B, 1, h, w) z-depth, mono (B, 1, H, W) depth.

    The price of the invariance: a scene rendered with half its true relief fits as well as the
    true one, and nothing else in the loss tells them apart (the GAN is meant to). metric=True
    (`--depth-metric`, for depth maps in the camera's own units, such as the synthetic scenes'
    true depth) drops the alignment: the rendered disparity is standardised with the *target's*
    mean and spread, so the relief must be right as well.
    """
    # Nearest, as in data.py: averaging would invent depths across occlusion edges.
    mono = F.interpolate(mono, size=rendered.shape[-2:], mode="nearest")
    disp, mean, std = disparity_stats(mono)
    target = ((disp - mean) / std).flatten(1)                               # (B, N)
    # Rendered z-depth -> disparity (clamped: a ray that hits nothing near can report ~0).
    pred = 1.0 / rendered.clamp_min(1e-2).flatten(1)
    if metric:
        s = 1.0 / std.flatten(1)                                            # (B, 1)
        b = -mean.flatten(1) * s
    else:
        s, b = align_scale_shift(pred, target)
    return (s * pred + b - target).view_as(rendered)                         # (B, 1, h, w)


def depth_loss(rendered, mono, metric=False):
    """The depth loss: the mean absolute depth_residual (L1) -> scalar."""
    return depth_residual(rendered, mono, metric).abs().mean()


def warp_loss(novel, image, depth, p0_depth, cams, config, metric):
    """L1 between novel views and the photo moved into their cameras by its depth, over the
    pixels the photo saw (render.forward_warp's hits) -> scalar.

    Not in the paper, whose novel views only the discriminator judges. A photo with a depth map
    already says what a turned camera sees of its visible surfaces; this loss asks the rendered
    view to agree, so the colours and the geometry behind them must hold up from the side, not
    only along the input's rays. The photo is moved by its own depth map where that is in the
    camera's units (metric: the synthetic scenes' true depth), else by the model's P0 depth
    (detached: the target must not chase the prediction), as a monocular map's scale and shift
    are unknown. Disoccluded pixels get no target here.
    novel (B, 3, H, W) views from cams (B, 4, 4); image (B, 3, H, W); depth (B, 1, H, W) or
    None; p0_depth (B, 1, h, w) the render's z-depth from P0."""
    if metric and depth is not None:
        by = depth
    else:                                  # nearest: averaging would invent depths at edges
        by = F.interpolate(p0_depth.detach(), size=image.shape[-2:], mode="nearest")
    with torch.no_grad():
        # splat 2: a surface the turn stretches leaves no cracks for the background to fill
        target, hit = render.forward_warp(image.float(), by.float(), cams.float(),
                                          config["fov_deg"], config["radius"], splat=2)
    err = (novel.float() - target).abs().mean(1, keepdim=True)              # (B, 1, H, W)
    return (err * hit).sum() / hit.sum().clamp_min(1)


def depth_grad_loss(residual, scales=3):
    """MiDaS's gradient-matching term (Ranftl et al. 2020, eq. 11) on a depth_residual
    (B, 1, h, w) -> scalar: the mean |d/dx R| + |d/dy R| of the residual R, averaged over
    `scales` scales (every 2^k-th pixel, k = 0 .. scales-1).

    The L1 on the residual's values weighs a pixel by how far off it is; this weighs how its
    error *changes* from pixel to pixel, i.e. the surface's local slope and shape. An error that
    is the same everywhere (an offset) costs nothing here. A wall rendered frontal where it
    slants, or a bump that is not in the scene, costs at every pixel of it.
    """
    terms = []
    for k in range(scales):
        r = residual[..., ::2 ** k, ::2 ** k]                                # (B, 1, h/2^k, .)
        if min(r.shape[-2:]) < 2:                    # too coarse to have a neighbour
            break
        terms.append((r[..., :, 1:] - r[..., :, :-1]).abs().mean()
                     + (r[..., 1:, :] - r[..., :-1, :]).abs().mean())
    return torch.stack(terms).mean()


def d_loss_fn(disc, real, fake, r1_gamma):
    """Non-saturating GAN loss for the discriminator, plus the R1 penalty on reals
    (Mescheder et al. 2018): softplus(D(fake)) + softplus(-D(real)) + gamma/2 |grad_x D(real)|^2.

    real, fake: the discriminator's inputs (B, in_ch, H, W) from disc.inputs(), so the gradient
    in R1 is taken over every channel it sees (colour and depth). The real branch runs in
    float32 even under bf16 autocast: R1 is a squared gradient whose small values bf16 (8 bits
    of mantissa) would round to noise. Returns (loss, r1), both float32 scalars.
    """
    loss_fake = F.softplus(disc(fake.detach()).float()).mean()
    with torch.autocast(real.device.type, enabled=False):
        real = real.detach().float().requires_grad_(r1_gamma > 0)
        real_logits = disc(real)
        loss = loss_fake + F.softplus(-real_logits).mean()
        r1 = torch.zeros((), device=real.device)
        if r1_gamma > 0:
            grad, = torch.autograd.grad(real_logits.sum(), real, create_graph=True)
            r1 = grad.square().flatten(1).sum(1).mean()                  # |grad_x D(x)|^2
            loss = loss + 0.5 * r1_gamma * r1
    return loss, r1


# ---------------------------------------------------------------------------------------------
# 8. Pictures (the numbers are evaluate.py's)
# ---------------------------------------------------------------------------------------------
def save_image(x, path):
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> PNG."""
    from PIL import Image
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() == 4 and x.shape[0] == 1 else x
    x = x[0] if x.dim() == 4 else x
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(arr).save(path)


def hit_disparity(depth, opacity=None):
    """Depth (B, 1, H, W) -> disparity (B, 1, H, W) of the surface each ray hits, NaN where the
    ray hit nothing.

    The renderer composites depth as sum_i w_i z_i, so a ray of opacity a = sum_i w_i < 1 renders
    a times the depth of what it hit: a ray through empty space renders ~0, and a half-opaque
    one (a novel view grazing the edge of what the input saw) half its surface's depth. Drawn
    as it is, either would read as the *nearest* thing in the picture, and a thin strip of them
    stretches a percentile scale until everything else is one colour. With the opacity, each
    ray's depth is divided by it (where its weight sits) and rays under 5% opacity count as
    empty; without it, depth under 5% of the image's median counts as empty."""
    if opacity is not None:
        surface = depth / opacity.clamp_min(1e-6)                   # sum_i w_i z_i / sum_i w_i
        return torch.where(opacity < 0.05, float("nan"), 1.0 / surface.clamp_min(1e-3))
    median = depth.flatten(1).median(1).values[:, None, None, None]
    disp = 1.0 / depth.clamp_min(1e-3)
    return torch.where(depth < 0.05 * median, float("nan"), disp)


def colorize_depth(depth, opacity=None, one_range=False):
    """(B, 1, H, W) depth -> (B, 3, H, W) in [-1, 1] through matplotlib's viridis, near = dark.
    Inverse depth (of the surface hit, when the rays' opacity (B, 1, H, W) is given:
    hit_disparity) is stretched between the 2nd and 98th percentile of the rays that hit
    something: each image's own, or with one_range=True the whole batch's (a video on one
    scale, so a change of colour is a change of depth); empty rays get the far end's colour."""
    import matplotlib
    disp = hit_disparity(depth, opacity)
    flat = disp.flatten() if one_range else disp.flatten(1)         # (B*H*W) or (B, H*W)
    lo, hi = (flat.nanquantile(q, dim=-1).reshape(-1, 1, 1, 1) for q in (0.02, 0.98))
    disp = disp.nan_to_num(0.0)                                     # empty: infinitely far
    x = (1 - ((disp - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1))[:, 0]
    rgb = matplotlib.colormaps["viridis"](x.cpu().numpy())[..., :3]
    return torch.from_numpy(rgb).permute(0, 3, 1, 2).float() * 2 - 1


@torch.no_grad()
def preview(model, image, depth, yaw, path):
    """The PNG a person reads while training: one row per image with
    input | reconstruction | rendered depth | novel views at -yaw, 0, +yaw | their depths."""
    view_grid(model, model.decode(model.encode(image, depth)), yaw, path, first=[image])


@torch.no_grad()
def view_grid(model, planes, yaw, path, first=()):
    """Render triplanes (B, 3, C, R, R) from P0 and from -yaw, 0, +yaw and write one row per
    scene: [first columns] | P0 view | P0 depth | three views | their depths. Also used by
    diffusion.py and sample.py to show generated scenes."""
    B, res = planes.shape[0], model.config["res"]
    views, depths = [], []
    for y in (-yaw, 0.0, yaw):
        out = model.render(planes, render.orbit_camera(torch.full((B,), y), torch.zeros(B),
                                                       model.config["radius"]).to(planes.device))
        views.append(out["image"])
        cmap = colorize_depth(out["depth"], out["opacity"])                 # (B, 3, h, w)
        depths.append(F.interpolate(cmap, size=res, mode="nearest").to(planes.device))
    cols = [*first, views[1], depths[1], *views, *depths]
    save_image(torch.cat([torch.cat(cols, -1)[b] for b in range(B)], -2), path)


# ---------------------------------------------------------------------------------------------
# 9. Training
# ---------------------------------------------------------------------------------------------
# Each preset is a complete set of defaults; any flag given on the command line wins.
PRESETS = {
    # One GPU, 256 px (the paper's resolution): z 4x32x32, triplane 3 x 32 x 128^2, the volume
    # renderer at 64 px and a 4x upsampler, as EG3D and WildFusion do. The adversarial loss
    # as it earned its place on the tiny budget (README, two seeds): weight 0.02, DiffAugment,
    # novel yaw within +-10 deg (at 0.05 it cost 0.5 dB, without DiffAugment one seed of two
    # painted colour fringes, at the photos' full +-30 deg it cost 3.4 dB). Untested at 256 px.
    # Speed, measured on one H100 (README, Benchmarks): 40.3 images/s in float32, 47.5 with
    # --amp bf16 (peak 21.4 / 14.6 GiB at batch 16), so its 200k steps take about 19 hours.
    "base": dict(res=256, render_res=64, z_res=32, z_ch=4, enc_ch=64, dec_dim=256, dec_depth=4,
                 dec_heads=8, plane_ch=32, plane_res=128, hidden=64, feat_ch=32, up_ch=64,
                 n_coarse=48, n_fine=48, batch=16, lr=2e-4, steps=200_000, disc_ch=64,
                 n_scenes=20000, every=1000, warp_weight=0.0, adv_weight=0.02,
                 disc_augment=True, yaw_range=10.0, ema=0.9999),
    # A laptop CPU: 8-27 min on 2 cores (README): 32 px, z 4x8x8, everything small. 3000
    # steps, as at 1500 two seeds differed by 0.75 dB and at 3000 by 0.03 dB; the EMA of the
    # weights adds 0.34 dB at yaw +-20 (two seeds: 1.58 dB over copying the input with the
    # aligned depth loss; on synthetic scenes, whose true depth takes the metric depth loss
    # at 0.5 and the distortion loss at 1 (DEPTH_LOSSES): 2.01 dB, P0 depth Pearson
    # 0.956-0.958; README). No adversarial loss: it costs time (40-42 min per run instead of
    # 26-33, two at a time) and, even in base's setting, 0.15 dB of novel-view PSNR for a
    # sharper metric (README, Results); `--adv-weight 0.02 --disc-augment --yaw-range 10`
    # switches it on as base has it. The EMA's warm-up leaves its decay at 0.997 by step 3000;
    # shorter averages (0.995, 0.99) or longer ones did not lift the novel views (README).
    # 6000 steps (two seeds) add only 0.05 dB at yaw +-20 for twice the time, though they
    # halve the metric (b) and lift pitch +-10 by 0.4 dB: `--steps 6000` (README).
    # With `--warp-weight 1` as well, those 6000 steps reach 21.37 / 21.33 dB at yaw +-20 (two
    # seeds), +2.3 dB over copying with Pearson 0.956 / 0.961: half the gap to the true-depth
    # warp closed, every target set for tiny, at 3.3x the preset's time (a step costs
    # 1.64-1.68x; README).
    "tiny": dict(res=32, render_res=32, z_res=8, z_ch=4, enc_ch=32, dec_dim=96, dec_depth=2,
                 dec_heads=4, plane_ch=16, plane_res=32, hidden=32, feat_ch=16, up_ch=32,
                 n_coarse=16, n_fine=16, batch=8, lr=1e-3, steps=3000, disc_ch=16,
                 n_scenes=1000, every=500, warp_weight=0.0, adv_weight=0.0, disc_augment=False,
                 ema=0.999),
    # 64 px on a laptop CPU (both stages 38.7-66.9 min alone on 2 cores, the autoencoder
    # 30.1-50.5 of them, on different CPUs and days; README): the volume renderer stays at
    # tiny's 32 px and the upsampler doubles it (the paper's low-res render +
    # super-resolution, at small scale); z 8x8x8, so the diffusion model runs on an 8x8 grid
    # like tiny's. The two convolution stacks that run at 64 px are half tiny's width: a step
    # costs 1.4x tiny's.
    # 6000 steps with a short average of the weights (EMA 0.995), against 3000 steps without
    # one (two seeds): +0.19 dB at yaw +-20, +1.1 dB at pitch +-10, P0 reconstruction +2.4
    # dB, metric (b) half (README). At 3000 steps an average did not help (the model still
    # improved fast at its last steps); at 6000 the trained weights alone do not move the
    # novel views. On synthetic scenes the metric depth and distortion losses (DEPTH_LOSSES)
    # take it from 1.57 to 2.03 dB over copying at yaw +-20 (two seeds on an H100), short of
    # 2.5: its reconstruction, 1 dB lower with them, now caps it (README). A 64 px volume
    # render (--render-res 64 with 8+8 samples per ray, twice the step time) scores the same
    # at yaw +-20 (two seeds on the CPU, +0.06 dB; README). 9000 steps (two seeds) lose 0.22
    # dB there for a P0 0.5 dB sharper and a third lower metric (b): `--steps 9000` (README).
    # `--warp-weight 1` (two seeds): +0.25 dB at yaw +-20 (20.25) for a 23-30% worse metric
    # (b) and 1.5x the step time; weight 3 (two seeds, H100) 20.40, 0.05 dB short of +2.5 over
    # copying, for a (b) no longer better than tiny's and 1.65x the step time
    # (--warp-batch 4: 1.3x, scoring as weight 2's 20.36), so it stays off (README).
    "small": dict(res=64, render_res=32, z_res=8, z_ch=8, enc_ch=16, dec_dim=128, dec_depth=2,
                  dec_heads=4, plane_ch=16, plane_res=32, hidden=32, feat_ch=16, up_ch=16,
                  n_coarse=16, n_fine=16, batch=8, lr=1e-3, steps=6000, disc_ch=16,
                  n_scenes=1000, every=500, warp_weight=0.0, adv_weight=0.0, disc_augment=False,
                  ema=0.995),
}
MODEL_KEYS = ("res", "render_res", "z_res", "z_ch", "enc_ch", "dec_dim", "dec_depth",
              "dec_heads", "plane_ch", "plane_res", "hidden", "feat_ch", "up_ch", "n_coarse",
              "n_fine")


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train WildFusion's 3D-aware autoencoder (stage 1).",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--preset", default="base", choices=list(PRESETS), help="a complete set of defaults")
    a("--data", help="image folder (default: synthetic scenes rendered into data/scenes-RES)")
    a("--out", default=None, help="run folder (default runs/ae-PRESET)")
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (from step 0 while "
      "there is none: safe on every launch of a preemptible job)")
    a("--eval", metavar="CKPT", help="evaluate a checkpoint on --data's held-out views and exit")
    # model (None: take the preset's value)
    for k in MODEL_KEYS:
        a(f"--{k.replace('_', '-')}", type=int, default=None, help=f"model size ({k})")
    a("--fov-deg", type=float, default=None, help="camera field of view (default: scenes.json "
      "of synthetic data, else 40)")
    a("--radius", type=float, default=None, help="camera distance to the pivot (default 2.7)")
    a("--contraction", default="linf", choices=["linf", "sphere"])
    a("--depth-input", action="store_true", help="give the encoder the depth map as 4th channel")
    a("--plane-layout", default="centre", choices=["centre", "full"],
      help="centre: z's grid decodes, aligned, into the central half of each plane (the "
      "un-contracted cube the image sees); full: over the whole plane (2x zoom to learn)")
    a("--plane-decode", default="grid", choices=["grid", "axis"],
      help="grid: one CNN on the image-aligned token grid outputs all three planes; axis: the "
      "xz and yz planes are lifted from pooled image columns and rows first (Decoder; on "
      "tiny no better than grid: README)")
    a("--field-layers", type=int, default=1, help="hidden layers of the field MLP (on tiny, 2 "
      "learned slower and lost 1.2 dB at yaw +-20: README)")
    a("--sr-highpass", action="store_true", help="the upsampler may add detail finer than a "
      "render pixel but not change the render's colours (Upsampler; README)")
    # losses
    a("--depth-metric", action=argparse.BooleanOptionalAction, default=None, help="the depth "
      "maps are in the camera's units: no scale-and-shift alignment in the depth loss "
      "(default: on for synthetic scenes, which carry true depth; off for photos)")
    a("--depth-weight", type=float, default=None, help="depth loss weight; 0 switches it off "
      "(default: 0.5 with --depth-metric, else 1)")
    a("--depth-grad-weight", type=float, default=0.0, help="weight of MiDaS's gradient-"
      "matching term on the depth residual (depth_grad_loss: the surfaces' local slope); 0: off")
    a("--dist-weight", type=float, default=None, help="distortion loss weight (mip-NeRF 360: "
      "one surface per ray; render.distortion); 0 switches it off (default: 1 with "
      "--depth-metric, else 0)")
    a("--adv-weight", type=float, default=None, help="adversarial weight; 0 switches it off")
    a("--adv-start", type=int, default=None, help="step the adversarial loss starts "
      "(default: a third of --steps)")
    a("--warp-weight", type=float, default=None, help="L1 weight of novel views against the "
      "photo moved there by its depth, on the pixels it saw (warp_loss); 0: off")
    a("--warp-batch", type=int, default=0, help="how many images of each batch the warp loss "
      "turns (0: all); fewer cost less when the adversarial loss is off")
    a("--raw-weight", type=float, default=1.0, help="L1 weight on the low-res raw RGB")
    a("--kl-weight", type=float, default=1e-5, help="KL weight (summed over the latent)")
    a("--lpips-weight", type=float, default=0.0, help="LPIPS weight (needs `pip install lpips`)")
    a("--r1-gamma", type=float, default=1.0, help="R1 penalty on real images")
    a("--r1-every", type=int, default=1, help="lazy R1 (StyleGAN2): the penalty only on every "
      "Nth discriminator step, weighted N times, so it costs 1/N as much (README)")
    a("--disc-sees", choices=list(DISC_SEES), default="both", help="what the "
      "discriminator judges: RGB + depth, RGB alone, depth alone (without depth maps: RGB)")
    a("--disc-augment", action=argparse.BooleanOptionalAction, default=None, help="the "
      "discriminator sees real and fake through the same random translation + cutout "
      "(DiffAugment; default: the preset's, on at base)")
    a("--yaw-range", type=float, default=None, help="novel views: yaw in +-this, degrees "
      "(default: synthetic scenes' own room-yaw spread, else 30)")
    a("--pitch-range", type=float, default=None, help="novel views: pitch in +-this, degrees "
      "(default: half the synthetic scenes' elevation spread, else 15)")
    # optimisation
    a("--steps", type=int, default=None)
    a("--batch", type=int, default=None, help="images per micro-batch, over all processes")
    a("--accum", type=int, default=1, help="micro-batches accumulated per optimiser step "
      "(effective batch: --batch x --accum; one card with --accum 4 = four cards)")
    a("--lr", type=float, default=None)
    a("--grad-clip", type=float, default=1.0, help="clip the gradient norm; 0 disables")
    a("--lr-decay", default="none", choices=["none", "cosine"],
      help="cosine: the autoencoder's lr falls to lr/10 at --steps (nanoGPT); none: constant "
      "(on tiny, cosine did not help: README)")
    a("--ema", type=float, default=None, help="EMA decay of the weights that load() returns "
      "(evaluation, the diffusion model's latents, sampling); 0 keeps only the trained ones")
    a("--disc-ch", type=int, default=None)
    a("--n-scenes", type=int, default=None, help="synthetic scenes to make when --data is unset")
    a("--every", type=int, default=None, help="preview PNG and checkpoint every N steps")
    add_runtime_args(p, "the networks")
    args = apply_preset(p.parse_args(argv), PRESETS)
    set_depth_losses(args)
    args.out = args.out or f"runs/ae-{args.preset}"
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    if args.adv_start is None:
        args.adv_start = args.steps // 3
    return args


# The depth losses, by what the depth maps are. Photos come with monocular estimates, right only
# up to an unknown scale and shift, so the depth loss aligns them first (depth_loss) and a
# distortion loss would pull every ray's weights towards a surface the estimate cannot place.
# Synthetic scenes (scenes.py) carry true depth in the camera's units: compared as it is, it
# fixes the scene's scale too, and mip-NeRF 360's distortion loss then keeps one surface per
# ray. On tiny and small (two seeds each, 3000 and 6000 steps) the second set gave +0.4 to
# +0.5 dB at yaw +-20 over the first (README, "One surface per ray"); the distortion loss alone,
# with the aligned depth loss, did not help.
DEPTH_LOSSES = {True: dict(depth_weight=0.5, dist_weight=1.0),      # true depth (--depth-metric)
                False: dict(depth_weight=1.0, dist_weight=0.0)}     # estimated depth


def set_depth_losses(args):
    """Fill --depth-metric, --depth-weight and --dist-weight where the flags leave them open:
    metric for synthetic scenes (no --data: data.py renders them; or a folder with their
    scenes.json), aligned for anything else, and each one's weights (DEPTH_LOSSES)."""
    if args.depth_metric is None:
        args.depth_metric = args.data is None or scenes.read_scene_meta(args.data) is not None
    fill_open(args, DEPTH_LOSSES[args.depth_metric])


def add_runtime_args(p, what):
    """Flags every training script shares: seed, device, precision, compilation, threads,
    data loading, logging."""
    a = p.add_argument
    a("--seed", type=int, default=0)
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--amp", default="none", choices=["none", "bf16"],
      help="bf16 autocast on the device (CUDA or CPU)")
    a("--compile", action="store_true", help=f"torch.compile {what} (CUDA or CPU; the first "
      "steps are slow while it compiles)")
    a("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a("--workers", type=int, default=None, help="data-loading processes (default: 4 on CUDA, "
      "0 on a CPU, where they would take cores from training)")
    a("--log-every", type=int, default=10, help="read the losses from the device and show "
      "them every N steps")


def apply_preset(args, presets):
    """Fill every flag left at None with the chosen preset's value."""
    return fill_open(args, presets[args.preset])


def fill_open(args, values):
    """Set each flag named in `values` that the command line left at None."""
    for k, v in values.items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    return args


def check_args(args):
    """Out-of-range flags: one clear line each, before anything heavy happens."""
    def need(ok, msg):
        if not ok:
            raise UserError(msg)
    pow2 = lambda x: x > 0 and (x & (x - 1)) == 0
    for name in ("steps", "batch", "accum", "every", "log_every", "field_layers", "r1_every"):
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive")
    need(args.workers >= 0, "--workers must be >= 0")
    need(args.batch % world() == 0,
         f"--batch {args.batch} must be divisible by the {world()} processes")
    need(args.res % args.z_res == 0 and pow2(args.res // args.z_res),
         f"--res ({args.res}) must be --z-res ({args.z_res}) times a power of two")
    need(args.res % args.render_res == 0 and pow2(args.res // args.render_res),
         f"--res ({args.res}) must be --render-res ({args.render_res}) times a power of two")
    need(args.plane_res % args.z_res == 0 and pow2(args.plane_res // args.z_res),
         f"--plane-res ({args.plane_res}) must be --z-res ({args.z_res}) times a power of two")
    need(args.plane_layout == "full" or args.plane_res >= 2 * args.z_res,
         "--plane-layout centre needs --plane-res at least twice --z-res (or --plane-layout full)")
    need(args.dec_dim % args.dec_heads == 0, "--dec-dim must be divisible by --dec-heads")
    need(args.feat_ch >= 3, "--feat-ch must be at least 3 (the raw RGB)")
    need(not args.sr_highpass or args.res > args.render_res, "--sr-highpass needs an "
         "upsampler that enlarges (--res above --render-res, e.g. --preset small)")
    need(0 < (args.fov_deg or 40) < 179, "--fov-deg must be in (0, 179)")
    need(0 <= args.ema < 1, "--ema must be in [0, 1)")
    need(args.warp_batch >= 0, "--warp-batch must be >= 0 (0: every image of the batch)")
    need(min(args.depth_weight, args.depth_grad_weight, args.dist_weight, args.adv_weight,
             args.warp_weight, args.kl_weight, args.lpips_weight, args.r1_gamma) >= 0,
         "loss weights must be >= 0")
    need(args.device == "cpu" or torch.cuda.is_available(),
         f"--device {args.device}: CUDA is not available here; use --device cpu")


def model_config(args):
    c = {k: getattr(args, k) for k in MODEL_KEYS}
    c.update(fov_deg=args.fov_deg, radius=args.radius, contraction=args.contraction,
             depth_input=args.depth_input)
    c.update(plane_layout=args.plane_layout, plane_decode=args.plane_decode,
             field_layers=args.field_layers, sr_highpass=args.sr_highpass)  # older: ADDED_LATER
    return c


def lr_at(step, args):
    """The autoencoder's learning rate at STEP: --lr, or with --lr-decay cosine a half cosine
    from --lr down to --lr / 10 at --steps (nanoGPT's schedule, without warm-up).

    Decaying lets long runs settle instead of jumping around a minimum; in a 1500-step run of
    the tiny preset it did not help, so it is off by default. A function of the step alone, so
    --resume continues the same curve (as long as --steps is unchanged).
    """
    if args.lr_decay == "none":
        return args.lr
    # lr(t) = lr * (0.1 + 0.9 * (1 + cos(pi t)) / 2), t = step / steps in [0, 1]
    t = min(step / max(args.steps, 1), 1.0)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def default_data_root(res):
    """Where the synthetic scenes for a model of `res` px live: rendered at >= 64 px, so a 32 px
    model's data can be shared with a 64 px one."""
    return os.path.join("data", f"scenes-{max(res, 64)}")


def default_data(args):
    """The synthetic scenes, rendered once at the preset's resolution and reused."""
    root = default_data_root(args.res)
    meta = scenes.read_scene_meta(root)
    if meta is None or meta["n"] < args.n_scenes or meta.get("room_yaw") != scenes.ROOM_YAW:
        if world() > 1:
            # Rendering is one process's work (20k scenes: most of an hour, README); the other
            # processes would wait on it in a collective that times out after 10 minutes.
            raise UserError(f"no --data given and {root} has no scenes yet: render them once "
                            f"before torchrun, `python scenes.py {root} --n {args.n_scenes} "
                            f"--res {max(args.res, 64)} --heldout 64`, or pass --data")
        # Scenes of an older version (no room yaw) are rendered again, all of them: a folder
        # must not mix two cameras.
        n = max(args.n_scenes, meta["n"] if meta else 0)
        print(f"no --data given: rendering {n} synthetic scenes into {root} "
              f"(once; later runs reuse them)")
        scenes.make_scenes(root, n, res=max(args.res, 64), heldout=64)
    return root


# --- processes: one per GPU under torchrun, else just one -------------------------------------
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE set): one process per device, gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"


def all_reduce_grads(params):
    """Data parallelism, written out: average the gradients of all processes with one
    all-reduce over a flat buffer. (nn.parallel.DistributedDataParallel does the same, bucketed
    and overlapped with backward, but it only hooks a module's forward(); our model is called
    through encode/decode/render, so the plain version is both simpler and correct here.)
    Called once per optimiser step, after all --accum micro-batches (optimiser_step)."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    """One epoch's data order, from (seed, epoch) alone: a permutation of 0..n-1 (n,) and a
    mirror bit per position (n,), as numpy arrays (9 bytes per image: 12 MB for ImageNet).
    Cached: a step needs only its epoch (or two at the seam)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).numpy(), (torch.rand(n, generator=g) < 0.5).numpy()


def batch_indices(step, n, batch, seed, micro=0, accum=1):
    """(index, mirror) pairs this process uses in micro-batch `micro` of `step`.

    The data is read epoch by epoch in the order above. Step s covers the positions
    [s * G, (s + 1) * G) of that endless sequence, G = batch * accum; micro-batch k of it the
    k-th run of `batch` positions, split evenly over the processes. A pure function of (seed,
    step, micro, rank): a resumed run -- any number of DataLoader workers -- sees exactly the
    batches, mirror images included, that an uninterrupted one would."""
    per = batch // world()
    first = step * batch * accum + micro * batch + rank() * per
    out = []
    for i in range(first, first + per):
        order, mirror = epoch_order(seed, i // n, n)
        out.append((int(order[i % n]), bool(mirror[i % n])))
    return out


class StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: for each step from `start` to `steps`, the `accum`
    micro-batches of batch_indices in turn, as lists of (index, mirror) keys for ds[key].
    The DataLoader's workers decode them ahead of the training loop."""

    def __init__(self, n, batch, seed, start, steps, accum=1):
        self.n, self.batch, self.seed, self.accum = n, batch, seed, accum
        self.start, self.steps = start, steps

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            for k in range(self.accum):
                yield batch_indices(step, self.n, self.batch, self.seed, k, self.accum)


def make_loader(ds, sampler, workers, device):
    """Batches of dict(image (B, 3, H, W), depth (B, 1, H, W), label (B,)), decoded by
    `workers` processes (0: in this one) and, on CUDA, copied from pinned memory."""
    # Its own generator: a DataLoader draws its workers' seeds when it starts, and from the
    # global RNG that draw would shift every random number after it (no exact resume).
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


def save_checkpoint(path, state):
    """Write atomically: a crash mid-write leaves the previous checkpoint intact."""
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


def resume_from(path, kind, config, seed, upgrade=dict, args=None, **objects):
    """Exact resume: restore each object (model, optimiser, ...) from the entry of the same name,
    and this process's RNG state, so the run continues as if never stopped. Returns the step.

    With another number of processes than the checkpoint's, the data order still continues
    where it stopped (it depends on the step, not the processes), but the saved RNG states (one
    per process) no longer match: each process then draws a fresh one from (seed, step, rank),
    and the run goes on as a correct but no longer bit-exact continuation. `upgrade` fills in
    the config keys an older checkpoint lacks (full_config) before comparing. With `args`, the
    flags that differ from the checkpoint's are named in one line: a loss that changed (say a
    default that changed since the run began) is a different training from here on.

    No checkpoint yet: a fresh start from step 0, so that every launch of a preemptible job
    (SLURM requeue, README) can pass --resume."""
    if not os.path.exists(path):
        if is_main():
            print(f"note: --resume, but no {path} yet: starting from step 0")
        return 0
    ckpt = load_checkpoint(path, kind, f"a {kind} checkpoint to resume")
    if upgrade(ckpt["config"]) != config:
        raise UserError(f"{path}: was trained with another model configuration (or data); "
                        f"use the same flags, or another --out")
    saved, now = ckpt.get("args", {}), vars(args) if args is not None else {}
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in now.items()
               if k in saved and saved[k] != v and k != "resume"]
    if changed and is_main():
        print(f"note: {path} continues with flags other than it was trained with: "
              + ", ".join(changed))
    for name, obj in objects.items():
        if name == "ema" and "ema" not in ckpt:     # saved without one (--ema 0, older runs):
            name = "model"                          # the average starts at today's weights
        try:
            obj.load_state_dict(ckpt[name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{path}: its {name} does not fit this run ({type(e).__name__}; "
                            f"e.g. depth maps or --disc-sees changed since); use another --out")
    if len(ckpt["rng"]) == world():
        set_rng_state(ckpt["rng"][rank()])
    else:
        if is_main():
            print(f"note: {path} was saved by {len(ckpt['rng'])} process(es), this run has "
                  f"{world()}: the random streams restart from (seed, step, rank)")
        torch.manual_seed((seed * 1_000_003 + ckpt["step"]) * 1_009 + rank())
    return ckpt["step"]


def rng_state():
    s = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def random_cameras(n, yaw_range, pitch_range, radius):
    """Novel views around P0: yaw, pitch uniform in +-range degrees -> (n, 4, 4)."""
    yaw = (torch.rand(n) * 2 - 1) * yaw_range
    pitch = (torch.rand(n) * 2 - 1) * pitch_range
    return render.orbit_camera(yaw, pitch, radius)


def make_lpips(weight, device):
    if weight <= 0:
        return None
    try:
        import lpips
    except ImportError:
        raise UserError("--lpips-weight > 0 needs `pip install lpips` (or leave it at 0)")
    return lpips.LPIPS(net="vgg", verbose=False).to(device).eval().requires_grad_(False)


def set_camera(args, meta):
    """Fill the camera flags left open (None) from a synthetic folder's scenes.json `meta`, or
    with defaults for photos (meta None): fov, radius, and the novel poses' yaw/pitch ranges."""
    args.fov_deg = args.fov_deg or (meta["fov_deg"] if meta else 40.0)
    args.radius = args.radius or (meta["radius"] if meta else 2.7)
    # The novel views the discriminator judges should be posed like the photos themselves:
    # a view turned further than any photo is rejected for its pose, not its content, and
    # the GAN then pushes the autoencoder to un-turn novel views (to flatten its geometry).
    # Synthetic scenes know their spread (room yaw; elevation); for photos, +-30 and +-15.
    lo, hi = meta.get("elevation", scenes.ELEVATION) if meta else (-15.0, 15.0)
    if args.yaw_range is None:
        args.yaw_range = meta.get("room_yaw", 0.0) if meta else 30.0
    if args.pitch_range is None:
        args.pitch_range = (hi - lo) / 2


def load_data(args):
    """The training images: --data, or the synthetic scenes. Sets the camera (fov, radius) from
    the scenes' scenes.json when the flags leave it open. -> (ImageFolder, root)."""
    root = args.data or default_data(args)
    set_camera(args, scenes.read_scene_meta(root))
    # Depth maps are needed by the depth loss, the depth input and a discriminator on depth
    # alone; by default the discriminator uses them when they exist (it then judges RGB +
    # depth) and judges RGB alone when they do not.
    need_depth = (args.depth_weight + args.depth_grad_weight > 0 or args.depth_input
                  or args.disc_sees == "depth")
    without = ("--depth-weight 0"
               + (" --depth-grad-weight 0" if args.depth_grad_weight > 0 else "")
               + (" and no --depth-input" if args.depth_input else "")
               + (" and --disc-sees rgb" if args.disc_sees == "depth" else ""))
    ds = data_mod.open_folder(root, args.res, depth=True if need_depth else "auto",
                              verbose=is_main(), depth_help=f"or train without depth: {without}")
    return ds, root


def build(args, device, disc_depth=True):
    """The autoencoder, the discriminator (on --disc-sees; RGB alone when the data has no depth)
    and their optimisers, freshly initialised from --seed: every rank builds the same weights,
    and so can a test."""
    torch.manual_seed(args.seed)
    model = AutoEncoder(model_config(args)).to(device)
    disc = Discriminator(args.res, args.disc_ch, sees=args.disc_sees if disc_depth else "rgb",
                         augment=args.disc_augment).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0)
    # Adam with beta1 = 0 for GANs (StyleGAN2): momentum makes the two-player game oscillate.
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.0, 0.99))
    return model, disc, opt, opt_d


def to_device(batch, device):
    """A loader batch -> image (B, 3, H, W), depth (B, 1, H, W) or None, on the device."""
    depth = batch.get("depth")
    return (batch["image"].to(device, non_blocking=True),
            None if depth is None else depth.to(device, non_blocking=True))


def autoencoder_loss(model, disc, image, depth, args, adv_on, lpips_fn):
    """The autoencoder's (the generator's) loss on one micro-batch -> (loss, logs, novel view).
    logs holds detached tensors (read on the host only when logging); the novel view is the
    discriminator's fake input, or None when the adversarial loss is off."""
    device, B, fake = image.device, image.shape[0], None
    # 1. Encode: q(z | x) = N(mean, exp(logvar)); z = mean + std * noise (the
    #    reparameterisation trick) so the gradient reaches the encoder through z.
    mean, logvar = model.posterior(image, depth)
    z = mean + (0.5 * logvar).exp() * torch.randn_like(mean)                 # (B, Cz, h, w)
    # 2. Decode into a triplane and render it from P0, the input camera: in view space
    #    every photo was taken from the same pose, so no camera is ever estimated.
    planes = model.decode(z)                                                 # (B, 3, C, R, R)
    rec = model.render(planes, model.P0(B).to(device), perturb=True,
                       with_distortion=args.dist_weight > 0)
    loss_rgb = (rec["image"] - image).abs().mean()
    # The raw low-res RGB is the exactly 3D-consistent image: supervise it as well,
    # against the photo area-averaged down to its size.
    low = F.interpolate(image, size=rec["raw"].shape[-2:], mode="area")
    loss_raw = (rec["raw"] - low).abs().mean()
    loss_kl = kl_loss(mean.float(), logvar.float())
    loss = loss_rgb + args.raw_weight * loss_raw + args.kl_weight * loss_kl
    logs = dict(rgb=loss_rgb, raw=loss_raw, kl=loss_kl)
    if lpips_fn is not None:
        logs["lpips"] = lpips_fn(rec["image"], image).mean()
        loss = loss + args.lpips_weight * logs["lpips"]
    if args.depth_weight + args.depth_grad_weight > 0:
        residual = depth_residual(rec["depth"].float(), depth, args.depth_metric)
        logs["depth"] = residual.abs().mean()                                 # depth_loss
        loss = loss + args.depth_weight * logs["depth"]
        if args.depth_grad_weight > 0:
            logs["depth_grad"] = depth_grad_loss(residual)
            loss = loss + args.depth_grad_weight * logs["depth_grad"]
    if args.dist_weight > 0:
        # Expected depth can match the target while the weights are split between a ghost in
        # front and the wall behind; a novel view then shows both. The distortion loss asks
        # each ray for one surface (render.distortion), with or without depth maps.
        logs["dist"] = rec["distortion"].float().mean()
        loss = loss + args.dist_weight * logs["dist"]
    # 3. Novel views around P0. No photo was taken there, but two things can judge them: the
    #    photo itself, moved there by its depth, for the pixels it saw (--warp-weight), and the
    #    discriminator, for what the scene looks like (colour and depth) from the side.
    #    A turned view costs a second render; without the GAN, --warp-batch n gives one to
    #    the batch's first n images only (the loss is a mean, so only its noise grows).
    k = min(B, args.warp_batch or B)                 # images the warp loss judges
    n = B if adv_on else k                           # turned views drawn: D judges all B
    if adv_on or args.warp_weight > 0:
        cams = random_cameras(n, args.yaw_range, args.pitch_range, args.radius).to(device)
        nov = model.render(planes[:n], cams, perturb=True)
    if args.warp_weight > 0:
        logs["warp"] = warp_loss(nov["image"][:k], image[:k],
                                 None if depth is None else depth[:k], rec["depth"][:k],
                                 cams[:k], model.config, args.depth_metric)
        loss = loss + args.warp_weight * logs["warp"]
    if adv_on:
        fake = disc.inputs(nov["image"], nov["depth"], args.render_res)      # (B, 3|4, H, W)
        logs["g"] = F.softplus(-disc(fake)).mean()                           # non-saturating
        loss = loss + args.adv_weight * logs["g"]
    return loss, {k: v.detach() for k, v in logs.items()}, fake


def optimiser_step(opt, batches, loss_fn, autocast, grad_clip=0.0):
    """Gradient accumulation, data parallelism and the update, shared by every training step.

    loss_fn(*batch) -> (loss, logs of scalar tensors, anything else) for one micro-batch.
    The micro-batches are run one at a time (under autocast) and each loss is backpropagated
    at once, divided by their number, so only one micro-batch's activations are alive at a
    time and the summed gradient is that of the mean loss over all of them: with per-image
    losses averaged over the batch, exactly the gradient of one --accum times larger batch
    (tests/test_autoencoder.py checks it). The processes' gradients are then averaged by one
    all-reduce (all_reduce_grads), once per optimiser step and not per micro-batch: what
    DistributedDataParallel's no_sync() does for accumulation.
    Returns (the micro-batches' mean logs, plus gnorm when clipping; the list of extras)."""
    opt.zero_grad(set_to_none=True)
    logs_list, extras = [], []
    for batch in batches:
        with autocast:
            loss, logs, extra = loss_fn(*batch)
        (loss / len(batches)).backward()
        logs_list.append(logs)
        extras.append(extra)
    logs = {k: torch.stack([l[k] for l in logs_list]).mean() for k in logs_list[0]}
    params = [p for group in opt.param_groups for p in group["params"]]
    all_reduce_grads(params)
    if grad_clip > 0:
        logs["gnorm"] = nn.utils.clip_grad_norm_(params, grad_clip).detach()
    opt.step()
    return logs, extras


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied.
    Both training scripts keep such an average: it smooths out the last steps' noise, which a
    constant learning rate leaves in the weights (on tiny, +0.30 to +0.46 dB at yaw +-20 in
    eight of nine runs, -0.04 in one, for a 10-27% higher novel-view KID: README)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_decay(step, decay):
    """The EMA's decay after STEP optimiser steps, with a warm-up: (1 + step) / (10 + step)
    until it reaches `decay`, so the early average is not dominated by the random start.
    It gets there at step (10 decay - 1) / (1 - decay): 0.999 at step 8990, so tiny's 3000-step
    run ends at 0.997 and any --ema of 0.997 or more gives it the same average (README)."""
    return min(decay, (1 + step) / (10 + step))


def add_logs(sums, logs):
    """Add a step's logs (scalar tensors) to running sums kept on the device, with a count per
    key (a loss may start mid-way, like the adversarial one)."""
    for k, v in logs.items():
        total, count = sums.get(k, (0, 0))
        sums[k] = (total + v, count + 1)


def read_logs(sums):
    """The running sums' means, read from the device in one transfer: one sync with the GPU
    per --log-every steps, instead of one per loss term and step."""
    values = torch.stack([total for total, _ in sums.values()]).tolist()
    return {k: v / count for (k, (_, count)), v in zip(sums.items(), values)}


def autoencoder_step(model, disc, opt, batches, args, adv_on, lpips_fn, autocast):
    """One optimiser step of the autoencoder over the micro-batches [(image, depth), ...].
    Returns (logs, novel views): logs of scalar tensors, and per micro-batch the
    discriminator's fake input (None when the adversarial loss is off)."""
    model.train()
    return optimiser_step(opt, batches, lambda image, depth: autoencoder_loss(
        model, disc, image, depth, args, adv_on, lpips_fn), autocast, args.grad_clip)


def discriminator_step(disc, opt_d, batches, fakes, args, autocast, step=0):
    """4. One optimiser step of the discriminator: (photo, its monocular depth) is real,
    (novel view, its rendered depth) is fake; the autoencoder's step above tried to fool it.

    Lazy R1 (Karras et al. 2020, StyleGAN2 Sec. 3.1): the penalty's double backward through the
    discriminator is a quarter of a `base` step, and it changes slowly, so with --r1-every N it
    is taken on every Nth step only (step % N == 0), N times as strong: the same penalty on
    average, at 1/N of its cost."""
    lazy = args.r1_every
    gamma = args.r1_gamma * lazy if step % lazy == 0 else 0.0

    def loss_fn(image, depth, fake):
        real = disc.inputs(image, depth, args.render_res)
        loss_d, r1 = d_loss_fn(disc, real, fake, gamma)
        logs = dict(d=loss_d.detach())
        if gamma > 0:                      # logged only where taken: its mean stays honest
            logs["r1"] = r1.detach()
        return loss_d, logs, None
    return optimiser_step(opt_d, [(i, d, f) for (i, d), f in zip(batches, fakes)], loss_fn,
                          autocast)[0]


def save_on_main(path, make_state):
    """Every rank calls this at the same step. Each hands its RNG state to rank 0 (a collective:
    if one rank skipped it the others would wait forever), and rank 0 writes the checkpoint
    make_state(rngs) atomically."""
    rngs = gather_rng()
    if is_main():
        save_checkpoint(path, make_state(rngs))


def train(args):
    setup_distributed(args)
    check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    # --- data, models, optimisers, resume ---
    ds, root = load_data(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    config = model_config(args)
    model, disc, opt, opt_d = build(args, device, disc_depth=ds.use_depth)
    # The exponential moving average of the weights is the model that load() returns: with a
    # constant learning rate the last weights jitter around a minimum, their average sits in it.
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    averaged = dict(ema=ema) if ema is not None else {}
    torch.manual_seed(args.seed + rank())             # each rank its own poses and noise
    step = 0
    if args.resume:
        step = resume_from(ckpt_path, CKPT_KIND, config, args.seed, upgrade=full_config,
                           args=args, model=model, disc=disc, opt=opt, opt_d=opt_d, **averaged)
    if args.compile:                                  # CUDA: Triton; CPU: inductor's C++
        model.encoder.compile()                       # in place: state_dict keys unchanged
        model.decoder.compile()
        model.upsampler.compile()
        model.compile = True                          # the renderer's per-sample hot path
    lpips_fn = make_lpips(args.lpips_weight, device)
    if is_main():
        n_ae = sum(p.numel() for p in model.parameters())
        n_d = sum(p.numel() for p in disc.parameters())
        print(f"data: {root}, {len(ds)} images at {args.res} px, depth maps: {ds.use_depth}")
        if ds.use_depth and args.depth_weight + args.depth_grad_weight > 0:
            kind = "metric (true depth)" if args.depth_metric else "aligned (scale and shift)"
            print(f"depth loss: {kind}, weight {args.depth_weight:g}"
                  + (f", gradient matching {args.depth_grad_weight:g}"
                     if args.depth_grad_weight > 0 else "")
                  + f"; distortion loss weight {args.dist_weight:g}")
        print(f"autoencoder {n_ae / 1e6:.2f} M parameters, discriminator {n_d / 1e6:.2f} M "
              f"(sees {DISC_SEES[disc.sees][1]}); "
              f"z = {args.z_ch}x{args.z_res}x{args.z_res}; {world()} process(es) on {device}; "
              f"batch {args.batch} x {args.accum} accumulated")
        if args.lpips_weight == 0:
            print("note: LPIPS off (--lpips-weight 0); reconstruction uses L1 only")
        if args.warp_weight > 0 or args.adv_weight > 0:
            judged = min(args.warp_batch or args.batch, args.batch)
            print(f"novel views: yaw +-{args.yaw_range:g}, pitch +-{args.pitch_range:g} deg; "
                  f"warp loss weight {args.warp_weight:g} on {judged} of {args.batch} "
                  f"images (moved by "
                  f"{'its depth map' if args.depth_metric and ds.use_depth else 'P0 depth'}), "
                  f"adversarial weight {args.adv_weight:g}")
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16")
    fixed = [ds[i] for i in range(min(4, len(ds)))]   # the preview's images, unmirrored
    fixed_img = torch.stack([f["image"] for f in fixed]).to(device)
    fixed_depth = torch.stack([f["depth"] for f in fixed]).to(device) if ds.use_depth else None
    # Every batch of the run, from the resume step on, decoded ahead by the loader's workers.
    batches = iter(make_loader(ds, StepBatches(len(ds), args.batch, args.seed, step, args.steps,
                                               args.accum), args.workers, device))

    bar = tqdm(total=args.steps, initial=step, disable=not is_main(), dynamic_ncols=True)
    t_last, step_last, history, sums = time.time(), step, [], {}
    while step < args.steps:
        # --- data: --accum micro-batches of --batch images ---
        micro = [to_device(next(batches), device) for _ in range(args.accum)]
        adv_on = args.adv_weight > 0 and step >= args.adv_start
        # The schedule is set every step from the step number alone (exact after --resume).
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        # --- autoencoder (generator) step, then discriminator step ---
        logs, fakes = autoencoder_step(model, disc, opt, micro, args, adv_on, lpips_fn, autocast)
        if adv_on:
            logs.update(discriminator_step(disc, opt_d, micro, fakes, args, autocast,
                                           step))
        if ema is not None:
            ema_update(ema, model, ema_decay(step, args.ema))
        step += 1
        # Losses stay on the device and are summed there; the host reads them (one sync)
        # only every --log-every steps, so the GPU never waits for the Python loop.
        add_logs(sums, logs)
        bar.update(1)

        # --- logging ---
        if step % args.log_every == 0 or step == args.steps:
            means, now = read_logs(sums), time.time()
            means["img/s"] = args.batch * args.accum * (step - step_last) / max(now - t_last,
                                                                                 1e-9)
            t_last, step_last, sums = now, step, {}
            history.append(dict(step=step, **means))
            bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})
        # --- preview (rank 0) and checkpoint (every rank calls it) ---
        if step % args.every == 0 or step == args.steps:
            if is_main():
                shown = (model if ema is None else ema).eval()   # what load() returns
                preview(shown, fixed_img, fixed_depth, max(args.yaw_range, 20.0),
                        os.path.join(args.out, f"preview_{step:06d}.png"))
            save_on_main(ckpt_path, lambda rngs: dict(
                kind=CKPT_KIND, config=config, model=model.state_dict(),
                disc=disc.state_dict(), opt=opt.state_dict(), opt_d=opt_d.state_dict(),
                step=step, args=dict(vars(args)), rng=rngs, data=os.path.abspath(root),
                **{k: v.state_dict() for k, v in averaged.items()}))
    bar.close()
    if is_main():
        print(f"done: {ckpt_path}, previews in {args.out}/preview_*.png")
    if dist.is_initialized():
        dist.destroy_process_group()
    return dict(model=model, ema=ema, disc=disc, history=history)


def gather_rng():
    """Every process's RNG state (rank 0 writes them all, so each rank resumes its own)."""
    s = rng_state()
    if world() == 1:
        return [s]
    out = [None] * world()
    dist.all_gather_object(out, s)
    return out


def main(argv=None):
    args = get_args(argv)
    if args.eval:
        if args.threads:
            torch.set_num_threads(args.threads)
        model = load(args.eval)
        root = args.data or default_data_root(model.config["res"])
        out = os.path.join(os.path.dirname(args.eval), "eval_views.png")
        import evaluate                               # it imports this file
        r = evaluate.evaluate_views(model, root, save=out)
        print(f"held-out novel views of {root} ({r['scenes']} scenes):")
        for k, v in r.items():
            if k != "scenes":
                print(f"  {k:24s} {v:.3f}")
        print(f"wrote {out} (rows: input | truth | model | depth-warp, at yaw +-20)")
        return
    train(args)


if __name__ == "__main__":
    data_mod.run_cli(main)
