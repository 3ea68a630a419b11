"""
autoencoder.py -- stage 1 of WildFusion: a 3D-aware autoencoder trained on unposed single images.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570), Sec. 3.1. The encoder compresses an
image into a small latent grid z; the decoder turns z into a triplane, a 3D feature field that is
volume-rendered. From the input camera P0 the render must reproduce the photo (reconstruction
loss) and its monocular depth (depth loss); from random nearby cameras, where no photo exists,
it must look real to a discriminator (adversarial loss). Stage 2 (diffusion.py) then learns to
generate z. No camera poses are ever needed: everything lives in view space, where the input
camera P0 is the same fixed pose for every photo.

    python autoencoder.py --preset tiny                       # a laptop CPU, 32 px
    python autoencoder.py --preset small                      # a laptop CPU, 64 px
    python autoencoder.py --data photos/ --out runs/ae        # one GPU, 256 px
    python autoencoder.py --data photos/ --amp bf16 --compile # bf16 + torch.compile, any device
    torchrun --nproc_per_node=4 autoencoder.py --data photos/ # 4 GPUs, data parallel
    python evaluate.py views runs/ae-tiny/ckpt.pt             # then: novel views vs. the truth

With no --data it renders the synthetic scenes of scenes.py once (cached under data/) and trains on
them, so it runs on a fresh machine with no download.

Map of the file:
    1. building blocks     ResBlock, down/up-sampling
    2. encoder             FPN over the image -> mean and log-variance of z
    3. decoder             transformer over z's tokens + CNN -> triplane
    4. field + upsampler   triplane features -> density, features; low-res render -> RGB
    5. the autoencoder     encode / decode / render, the public API; load()
    6. discriminator       judges (RGB, depth) of novel views against (photo, its depth)
    7. losses              KL, depth loss (aligned for estimates, metric for true depth), GAN, R1
    8. pictures            previews of novel views and depth (scores: evaluate.py)
    9. training            presets, flags, data, the loss of one step, the loop
                           (the plumbing both stages share is training.py's)
"""
import argparse
import copy
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

import data as data_mod
import render
import scenes
import training
from data import UserError
from training import is_main, need, world

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
# 2. Encoder: image -> q(z | x) = N(mean, exp(logvar))
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
    see the whole latent (global context). The convolutions then upsample to half the plane
    resolution and add local detail, which attention over a coarse grid cannot.
    """

    def __init__(self, z_ch, h, dim, depth, heads, plane_ch, plane_res):
        super().__init__()
        self.plane_ch, self.plane_res = plane_ch, plane_res
        self.inp = nn.Conv2d(z_ch, dim, 3, padding=1)
        self.pos = nn.Parameter(torch.randn(1, h * h, dim) * 0.02)          # learned 2D positions
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, depth, enable_nested_tensor=False)
        ups = [ResBlock(dim, dim)]
        c = dim
        # The CNN stops at half the plane resolution, aligned with z's grid, and forward()
        # places that in the central half of each plane (see there).
        for _ in range(int(math.log2(plane_res // h)) - 1):
            c_next = max(c // 2, 3 * plane_ch)
            ups += [upsample(c), ResBlock(c, c_next)]
            c = c_next
        self.cnn = nn.Sequential(*ups, norm(c), nn.SiLU(), nn.Conv2d(c, 3 * plane_ch, 3, padding=1))

    def forward(self, z):
        x = self.inp(z)                                                      # (B, D, h, w)
        B, D, h, w = x.shape
        tokens = self.transformer(x.flatten(2).transpose(1, 2) + self.pos)   # (B, h*w, D)
        x = tokens.transpose(1, 2).reshape(B, D, h, w)
        planes = self.cnn(x)                                                # (B, 3C, R/2, R/2)
        # The image covers roughly the un-contracted unit cube, which the contraction maps to
        # the central half of each plane. Decoding z over the whole plane would make the
        # convolutions learn a 2x zoom from z's grid to the plane's (it cost 2 dB of novel-view
        # PSNR). Instead the CNN output (R/2 texels, aligned with z) *is* the central half,
        # and the contracted outer ring continues its border outwards.
        # Replicate-padding by q texels, written as a gather: index -q..n+q-1 clamped into the
        # CNN's n = R/2 texels (the same numbers as F.pad(mode="replicate"), whose backward
        # fails under torch.compile on a CPU in torch 2.13).
        q, n = self.plane_res // 4, planes.shape[-1]
        idx = torch.arange(-q, n + q, device=planes.device).clamp(0, n - 1)
        planes = planes[..., idx, :][..., idx]                               # (B, 3C, R, R)
        return planes.view(B, 3, self.plane_ch, self.plane_res, self.plane_res)


# ---------------------------------------------------------------------------------------------
# 4. Field MLP and upsampler
# ---------------------------------------------------------------------------------------------
class Field(nn.Module):
    """Triplane features (B, M, C) -> density (B, M, 1) >= 0 and features (B, M, F).

    Two output heads rather than one sliced output (slicing costs a zero-filled gradient of the
    full size per slice in the backward pass). The first 3 features are read as a raw RGB
    colour, so the low-resolution render is itself an image that is exactly 3D-consistent.
    """

    def __init__(self, c_in, hidden, c_out):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(c_in, hidden), nn.ReLU())    # EG3D: one layer of 64
        self.density, self.features = nn.Linear(hidden, 1), nn.Linear(hidden, c_out)

    def forward(self, feats):
        h = self.hidden(feats)
        # softplus keeps the density positive and smooth; the -1 shift starts the scene
        # mostly transparent, so early training does not lock in a wall in front of the camera.
        return F.softplus(self.density(h) - 1.0), self.features(h)


class Upsampler(nn.Module):
    """Low-res feature image (B, F, r, r) -> RGB (B, 3, res, res), as EG3D's super-resolution.

    Predicts a residual over the bilinearly upsampled raw RGB, so it adds detail but starts from
    (and stays close to) the 3D-consistent render.
    """

    def __init__(self, c_in, ch, factor):
        super().__init__()
        layers = [nn.Conv2d(c_in, ch, 3, padding=1), ResBlock(ch, ch)]
        for _ in range(int(math.log2(factor))):
            layers += [upsample(ch), ResBlock(ch, ch)]
        self.net = nn.Sequential(*layers, norm(ch), nn.SiLU(), nn.Conv2d(ch, 3, 3, padding=1))
        self.factor = factor

    def forward(self, feats):
        raw = feats[:, :3]
        base = raw if self.factor == 1 else F.interpolate(raw, scale_factor=self.factor,
                                                          mode="bilinear", align_corners=False)
        return base + self.net(feats)                                        # (B, 3, res, res)


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
        c = self.config = dict(config)
        self.encoder = Encoder(3, c["enc_ch"], c["z_ch"], c["res"] // c["z_res"])
        self.decoder = Decoder(c["z_ch"], c["z_res"], c["dec_dim"], c["dec_depth"],
                               c["dec_heads"], c["plane_ch"], c["plane_res"])
        self.field = Field(c["plane_ch"], c["hidden"], c["feat_ch"])
        self.upsampler = Upsampler(c["feat_ch"], c["up_ch"], c["res"] // c["render_res"])
        self.compile = False                          # set by the training script (--compile)

    def posterior(self, image, depth=None):
        """image (B, 3, H, W) in [-1, 1] -> mean, logvar (B, z_ch, h, w). The encoder sees the
        image alone; `depth` is accepted (and ignored) so callers can pass a batch as it comes."""
        return self.encoder(image)

    def encode(self, image, depth=None):
        """The posterior mean: the latent the diffusion model learns (public API)."""
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


# Model options that older checkpoints carry and this version removed (they were measured and
# not kept), with the one value this code still builds. A key missing from a checkpoint means
# the value it had before the option existed (plane_layout: "full").
REMOVED = dict(plane_layout="centre", plane_decode="grid", field_layers=1, sr_highpass=False,
               depth_input=False)
BEFORE = dict(plane_layout="full", plane_decode="grid", field_layers=1, sr_highpass=False,
              depth_input=False)


def upgrade_config(path, config):
    """An older checkpoint's config -> today's keys, or one line saying why it cannot load.
    Every older checkpoint carries depth_input (it was there from the first); today's do not."""
    config = dict(config)
    if "depth_input" not in config:
        return config
    for key, kept in REMOVED.items():
        value = config.pop(key, BEFORE[key])
        if value != kept:
            flag = f"--{key.replace('_', '-')} {value}"
            raise UserError(f"{path}: was trained with {flag}, an option this version no longer "
                            f"has; retrain it with this version")
    return config


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
    """An autoencoder checkpoint -> AutoEncoder in eval mode (public API), with the EMA weights
    where the run kept them (--ema), else the trained ones."""
    ckpt = training.load_checkpoint(path, CKPT_KIND, "an autoencoder checkpoint "
                                    "(runs/ae/ckpt.pt)")
    model = AutoEncoder(upgrade_config(path, ckpt["config"]))
    model.load_state_dict(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    model.trained_on = ckpt.get("data")              # the image folder it was trained on
    return model.to(device).eval()


# ---------------------------------------------------------------------------------------------
# 6. Discriminator on (RGB, depth) pairs
# ---------------------------------------------------------------------------------------------
class Discriminator(nn.Module):
    """A plain convolutional classifier (strided convolutions, no residual connections) on
    RGB and standardised inverse depth (depth=True), or on RGB alone (when the data has no
    depth maps).

    Seeing depth with colour, it can reject a novel view whose geometry is implausible even if
    its colours are fine (a flat billboard turned sideways, say), which is what pushes the
    autoencoder towards real 3D shape (paper Sec. 3.1).
    """

    def __init__(self, res, ch=32, max_ch=256, depth=True, augment=False):
        super().__init__()
        self.depth = depth
        self.in_ch = 4 if depth else 3
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
        """What the discriminator sees: (B, 4, H, W) = RGB + standardised inverse depth, or
        (B, 3, H, W) = RGB, as it was built. The R1 penalty differentiates with respect to
        exactly this tensor, so it covers every input channel.

        Rendered depth exists only at the volume renderer's size `low` (64 px at 256 px): real
        and fake depth both go down to `low` and back up by nearest neighbour, so that the
        blocks of an upsampled map cannot by themselves tell a fake from a photo."""
        if not self.depth:
            return image
        if depth.shape[-1] != low:
            depth = F.interpolate(depth, size=low, mode="nearest")
        if depth.shape[-2:] != image.shape[-2:]:
            depth = F.interpolate(depth, size=image.shape[-2:], mode="nearest")
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


def depth_loss(rendered, mono, metric=False):
    """The depth loss: the mean absolute difference (L1) of the rendered disparity and the
    target's, both in the target's standardised units -> scalar.

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
    return (s * pred + b - target).abs().mean()


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
def save_image(x, path, safe=data_mod.SAFE):
    """(3, H, W) or (1, 3, H, W) in [-1, 1] -> PNG (all or nothing: data.writing)."""
    from PIL import Image
    x = x.reshape(-1, *x.shape[-2:]) if x.dim() == 4 and x.shape[0] == 1 else x
    x = x[0] if x.dim() == 4 else x
    arr = ((x.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).cpu().numpy()
    with data_mod.writing(path, "a picture", safe) as tmp:
        Image.fromarray(arr).save(tmp)


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
def preview(model, image, depth, yaw, path, safe=data_mod.SAFE):
    """The PNG a person reads while training: one row per image with
    input | reconstruction | rendered depth | novel views at -yaw, 0, +yaw | their depths."""
    view_grid(model, model.decode(model.encode(image, depth)), yaw, path, [image], safe)


@torch.no_grad()
def view_grid(model, planes, yaw, path, first=(), safe=data_mod.SAFE):
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
    save_image(torch.cat([torch.cat(cols, -1)[b] for b in range(B)], -2), path, safe)


@torch.no_grad()
def render_frames(model, planes, cams, chunk=16, res=None):
    """Render scene i from camera i: planes (N, 3, C, R, R), or (1, ...) for one scene seen from
    every camera; cams (N, 4, 4). -> image (N, 3, H, W) in [-1, 1], depth and opacity (N, 1, h,
    w), on the CPU. `chunk` views at a time, so memory stays flat however many frames a video
    has. res: output size (default the model's). Used by sample.py and evaluate.py."""
    images, depths, opacities = [], [], []
    planes = planes.expand(len(cams), -1, -1, -1, -1)        # a view, not a copy, when N = 1
    for lo in range(0, len(cams), chunk):
        out = model.render(planes[lo:lo + chunk], cams[lo:lo + chunk].to(planes.device),
                           res=res)
        images.append(out["image"].clamp(-1, 1).cpu())
        depths.append(out["depth"].cpu())
        opacities.append(out["opacity"].cpu())
    return torch.cat(images), torch.cat(depths), torch.cat(opacities)


# ---------------------------------------------------------------------------------------------
# 9. Training
# ---------------------------------------------------------------------------------------------
# Each preset is a complete set of defaults; any flag given on the command line wins.
PRESETS = {
    # One GPU, 256 px (the paper's resolution): z 4x32x32, triplane 3 x 32 x 128^2, the volume
    # renderer at 64 px and a 4x upsampler, as EG3D and WildFusion. The adversarial loss as it
    # earned its place at small scale: weight 0.02, DiffAugment, novel yaw within +-10 degrees
    # (on tiny: a 41% better novel-view metric for 0.15 dB of PSNR at yaw +-20).
    "base": dict(res=256, render_res=64, z_res=32, z_ch=4, enc_ch=64, dec_dim=256, dec_depth=4,
                 dec_heads=8, plane_ch=32, plane_res=128, hidden=64, feat_ch=32, up_ch=64,
                 n_coarse=48, n_fine=48, batch=16, lr=2e-4, steps=200_000, disc_ch=64,
                 n_scenes=20000, every=1000, adv_weight=0.02, disc_augment=True,
                 yaw_range=10.0, ema=0.9999),
    # A laptop CPU, 32 px, z 4x8x8. 3000 steps: at 1500 two seeds ended 0.75 dB apart, at 3000
    # 0.03 dB. No adversarial loss: here it cost novel-view PSNR and a third more time.
    # The volume render at 16 px, 8 + 8 samples per ray, and the upsampler doubles it: on two
    # seeds the same novel-view PSNR and samples as a 32 px render, from a quarter of the rays.
    "tiny": dict(res=32, render_res=16, z_res=8, z_ch=4, enc_ch=32, dec_dim=96, dec_depth=2,
                 dec_heads=4, plane_ch=16, plane_res=32, hidden=32, feat_ch=16, up_ch=32,
                 n_coarse=8, n_fine=8, batch=8, lr=1e-3, steps=3000, disc_ch=16,
                 n_scenes=1000, every=500, adv_weight=0.0, disc_augment=False, ema=0.999),
    # 64 px on a laptop CPU: the volume render stays at 32 px and the upsampler doubles it (the
    # paper's low-res render + super-resolution, at small scale); z 8x8x8. 6000 steps with a
    # short average of the weights (EMA 0.995) beat 3000 without one by 0.19 dB at yaw +-20.
    "small": dict(res=64, render_res=32, z_res=8, z_ch=8, enc_ch=16, dec_dim=128, dec_depth=2,
                  dec_heads=4, plane_ch=16, plane_res=32, hidden=32, feat_ch=16, up_ch=16,
                  n_coarse=16, n_fine=16, batch=8, lr=1e-3, steps=6000, disc_ch=16,
                  n_scenes=1000, every=500, adv_weight=0.0, disc_augment=False, ema=0.995),
}
MODEL_KEYS = ("res", "render_res", "z_res", "z_ch", "enc_ch", "dec_dim", "dec_depth",
              "dec_heads", "plane_ch", "plane_res", "hidden", "feat_ch", "up_ch", "n_coarse",
              "n_fine")
RAW_WEIGHT = 1.0          # L1 on the low-res raw RGB, beside the L1 on the upsampled image
KL_WEIGHT = 1e-5          # KL on z (summed over the latent): a light VAE regulariser


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Train WildFusion's 3D-aware autoencoder (stage 1).",
                                formatter_class=training.Help,
                                epilog=training.PRESET_EPILOG)
    a = p.add_argument
    a("--preset", default="base", choices=list(PRESETS), help="a complete set of defaults")
    a("--data", help="image folder (default: synthetic scenes rendered into data/scenes-RES)")
    a("--out", default=None, help="run folder (default runs/ae-PRESET)")
    for k in MODEL_KEYS:                              # None: take the preset's value
        a(f"--{k.replace('_', '-')}", type=int, default=None, help=f"model size ({k})")
    a("--fov-deg", type=float, default=None, help="camera field of view (default: scenes.json "
      "of synthetic data, else 40)")
    a("--radius", type=float, default=None, help="camera distance to the pivot (default 2.7)")
    # losses
    a("--depth-metric", action=argparse.BooleanOptionalAction, default=None, help="the depth "
      "maps are in the camera's units: no scale-and-shift alignment in the depth loss "
      "(default: on for synthetic scenes, which carry true depth; off for photos)")
    a("--depth-weight", type=float, default=None, help="depth loss weight; 0 switches it off "
      "(default: 0.5 with --depth-metric, else 1)")
    a("--dist-weight", type=float, default=None, help="distortion loss weight (mip-NeRF 360: "
      "one surface per ray); 0 switches it off (default: 1 with --depth-metric, else 0)")
    a("--adv-weight", type=float, default=None, help="adversarial weight; 0 switches it off")
    a("--adv-start", type=int, default=None, help="step the adversarial loss starts "
      "(default: a third of --steps)")
    a("--lpips-weight", type=float, default=0.0, help="LPIPS weight (needs `pip install lpips`)")
    a("--r1-gamma", type=float, default=1.0, help="R1 penalty on real images")
    a("--disc-augment", action=argparse.BooleanOptionalAction, default=None, help="the "
      "discriminator sees real and fake through the same random translation + cutout "
      "(DiffAugment; default: the preset's)")
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
    a("--ema", type=float, default=None, help="EMA decay of the weights that load() returns "
      "(evaluation, the diffusion model's latents, sampling); 0 keeps only the trained ones")
    a("--every", type=int, default=None, help="preview PNG and checkpoint every N steps")
    training.add_runtime_args(p, "the networks")
    args = training.apply_preset(p.parse_args(argv), PRESETS)
    set_depth_losses(args)
    args.out = args.out or f"runs/ae-{args.preset}"
    if args.adv_start is None:
        args.adv_start = args.steps // 3
    return args


# The depth losses, by what the depth maps are. Photos come with monocular estimates, right only
# up to an unknown scale and shift, so the depth loss aligns them first (depth_loss) and a
# distortion loss would pull every ray's weights towards a surface the estimate cannot place.
# Synthetic scenes (scenes.py) carry true depth in the camera's units: compared as it is, it
# fixes the scene's scale too, and mip-NeRF 360's distortion loss then keeps one surface per
# ray (together +0.4 to +0.5 dB of novel-view PSNR on tiny and small).
DEPTH_LOSSES = {True: dict(depth_weight=0.5, dist_weight=1.0),      # true depth (--depth-metric)
                False: dict(depth_weight=1.0, dist_weight=0.0)}     # estimated depth


def set_depth_losses(args):
    """Fill --depth-metric, --depth-weight and --dist-weight where the flags leave them open:
    metric for synthetic scenes (no --data: data.py renders them; or a folder with their
    scenes.json), aligned for anything else, and each one's weights (DEPTH_LOSSES)."""
    if args.depth_metric is None:
        args.depth_metric = args.data is None or scenes.read_scene_meta(args.data) is not None
    training.fill_open(args, DEPTH_LOSSES[args.depth_metric])


def check_args(args):
    """Out-of-range flags: one clear line each, before anything heavy happens."""
    training.check_runtime_args(args)
    pow2 = lambda x: x > 0 and (x & (x - 1)) == 0
    for big, small in (("res", "z_res"), ("res", "render_res"), ("plane_res", "z_res")):
        B, S = getattr(args, big), getattr(args, small)
        need(B % S == 0 and pow2(B // S), f"--{big.replace('_', '-')} ({B}) must be "
             f"--{small.replace('_', '-')} ({S}) times a power of two")
    need(args.plane_res >= 2 * args.z_res, "--plane-res must be at least twice --z-res (z's "
         "grid decodes into the central half of each plane)")
    need(args.dec_dim % args.dec_heads == 0, "--dec-dim must be divisible by --dec-heads")
    need(args.feat_ch >= 3, "--feat-ch must be at least 3 (the raw RGB)")
    need(0 < (args.fov_deg or 40) < 179, "--fov-deg must be in (0, 179)")
    need(min(args.depth_weight, args.dist_weight, args.adv_weight, args.lpips_weight,
             args.r1_gamma) >= 0, "loss weights must be >= 0")


def model_config(args):
    """What load() needs to rebuild the model (saved in checkpoints)."""
    c = {k: getattr(args, k) for k in MODEL_KEYS}
    c.update(fov_deg=args.fov_deg, radius=args.radius, contraction="linf")
    return c


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
            # Rendering is one process's work; the other processes would wait on it in a
            # collective that times out after 10 minutes.
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
    # The depth loss needs depth maps; without it the discriminator uses them when they exist
    # (it then judges RGB + depth) and judges RGB alone when they do not.
    ds = data_mod.open_folder(root, args.res, depth=True if args.depth_weight > 0 else "auto",
                              verbose=is_main(),
                              depth_help="or train without depth: --depth-weight 0")
    return ds, root


def build(args, device, disc_depth=True):
    """The autoencoder, the discriminator (on RGB + depth, or on RGB alone when the data has
    no depth maps) and their optimisers, freshly initialised from --seed: every rank builds the same
    weights, and so can a test."""
    torch.manual_seed(args.seed)
    model = AutoEncoder(model_config(args)).to(device)
    disc = Discriminator(args.res, args.disc_ch, depth=disc_depth,
                         augment=args.disc_augment).to(device)
    # fused: one kernel updates every weight tensor instead of a loop of per-tensor ops.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.99), weight_decay=0.0,
                            fused=True)
    # Adam with beta1 = 0 for GANs (StyleGAN2): momentum makes the two-player game oscillate.
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.0, 0.99), fused=True)
    return model, disc, opt, opt_d


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


def autoencoder_loss(model, disc, image, depth, args, adv_on, lpips_fn):
    """The autoencoder's (the generator's) loss on one micro-batch -> (loss, logs, novel view).
    logs holds detached tensors (read on the host only when logging); the novel view is the
    discriminator's fake input, or None when the adversarial loss is off."""
    device, B, fake = image.device, image.shape[0], None
    # 1. Encode: q(z | x) = N(mean, exp(logvar)); z = mean + std * noise (the
    #    reparameterisation trick) so the gradient reaches the encoder through z.
    mean, logvar = model.posterior(image)
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
    loss = loss_rgb + RAW_WEIGHT * loss_raw + KL_WEIGHT * loss_kl
    logs = dict(rgb=loss_rgb, raw=loss_raw, kl=loss_kl)
    if lpips_fn is not None:
        logs["lpips"] = lpips_fn(rec["image"], image).mean()
        loss = loss + args.lpips_weight * logs["lpips"]
    if args.depth_weight > 0:
        logs["depth"] = depth_loss(rec["depth"].float(), depth, args.depth_metric)
        loss = loss + args.depth_weight * logs["depth"]
    if args.dist_weight > 0:
        # Expected depth can match the target while the weights are split between a ghost in
        # front and the wall behind; a novel view then shows both. The distortion loss asks
        # each ray for one surface (render.distortion), with or without depth maps.
        logs["dist"] = rec["distortion"].float().mean()
        loss = loss + args.dist_weight * logs["dist"]
    # 3. Novel views around P0: no photo was taken there, so the discriminator judges what
    #    the scene looks like (colour and depth) from the side.
    if adv_on:
        cams = random_cameras(B, args.yaw_range, args.pitch_range, args.radius).to(device)
        nov = model.render(planes, cams, perturb=True)
        fake = disc.inputs(nov["image"], nov["depth"], args.render_res)      # (B, 3|4, H, W)
        logs["g"] = F.softplus(-disc(fake)).mean()                           # non-saturating
        loss = loss + args.adv_weight * logs["g"]
    return loss, {k: v.detach() for k, v in logs.items()}, fake


def autoencoder_step(model, disc, opt, batches, args, adv_on, lpips_fn, autocast):
    """One optimiser step of the autoencoder over the micro-batches [(image, depth), ...].
    Returns (logs, novel views): logs of scalar tensors, and per micro-batch the
    discriminator's fake input (None when the adversarial loss is off)."""
    model.train()
    return training.optimiser_step(opt, batches, lambda image, depth: autoencoder_loss(
        model, disc, image, depth, args, adv_on, lpips_fn), autocast, training.GRAD_CLIP)


def discriminator_step(disc, opt_d, batches, fakes, args, autocast):
    """One optimiser step of the discriminator: (photo, its monocular depth) is real, (novel
    view, its rendered depth) is fake; the autoencoder's step above tried to fool it."""
    def loss_fn(image, depth, fake):
        real = disc.inputs(image, depth, args.render_res)
        loss_d, r1 = d_loss_fn(disc, real, fake, args.r1_gamma)
        return loss_d, dict(d=loss_d.detach(), r1=r1.detach()), None
    return training.optimiser_step(opt_d, [(i, d, f) for (i, d), f in zip(batches, fakes)],
                                   loss_fn, autocast)[0]


def to_device(batch, device):
    """A loader batch -> image (B, 3, H, W), depth (B, 1, H, W) or None, on the device."""
    depth = batch.get("depth")
    return (batch["image"].to(device, non_blocking=True),
            None if depth is None else depth.to(device, non_blocking=True))


def setup(args):
    """Everything the loop needs, built (or resumed) from the flags: data, models, optimisers,
    the EMA copy, the resume step. -> a dict of them."""
    training.start(args)                              # first: check_args counts the processes
    check_args(args)
    device = torch.device(args.device)
    ds, root = load_data(args)
    os.makedirs(args.out, exist_ok=True)
    ckpt_path = os.path.join(args.out, "ckpt.pt")
    config = model_config(args)
    model, disc, opt, opt_d = build(args, device, disc_depth=ds.use_depth)
    # The exponential moving average of the weights is the model that load() returns: with a
    # constant learning rate the last weights jitter around a minimum, their average sits in it.
    ema = copy.deepcopy(model).requires_grad_(False) if args.ema > 0 else None
    averaged = dict(ema=ema) if ema is not None else {}
    torch.manual_seed(args.seed + training.rank())    # each rank its own poses and noise
    step = 0
    if args.resume:
        step = training.resume_from(ckpt_path, CKPT_KIND, config, args.seed,
                                    upgrade=upgrade_config, args=args, model=model, disc=disc,
                                    opt=opt, opt_d=opt_d, **averaged)
    # What the run will cost here, said (or refused in one line) before the first step.
    def random_batch(B):            # B random images (and depth maps, as the data has them)
        image = torch.rand(B, 3, args.res, args.res, device=device) * 2 - 1
        depth = 2 + torch.rand(B, 1, args.res, args.res, device=device) if ds.use_depth else None
        return image, depth

    def loss_at(B):                 # the generator's loss
        return autoencoder_loss(model, disc, *random_batch(B), args, args.adv_weight > 0,
                                None)[0]

    def disc_step_at(B):            # the discriminator's loss and R1 on B reals and B fakes
        real, fake = disc.inputs(*random_batch(2 * B), args.render_res).chunk(2)  # (B, 3|4, ..)
        d_loss_fn(disc, real, fake, args.r1_gamma)[0].backward()
    model.train()
    training.preflight(loss_at, ([model, disc], [m for m in (ema,) if m is not None]),
                       args.batch, args.accum, args.steps - step, device,
                       f"the {args.preset} autoencoder at {args.res} px",
                       disc_step_at if args.adv_weight > 0 else None)
    if args.compile:                                  # CUDA: Triton; CPU: inductor's C++
        model.encoder.compile()                       # in place: state_dict keys unchanged
        model.decoder.compile()
        model.upsampler.compile()
        model.compile = True                          # the renderer's per-sample hot path
    if is_main():
        n_ae = sum(p.numel() for p in model.parameters())
        n_d = sum(p.numel() for p in disc.parameters())
        print(f"data: {root}, {len(ds)} images at {args.res} px, depth maps: {ds.use_depth}")
        if ds.use_depth and args.depth_weight > 0:
            kind = "metric (true depth)" if args.depth_metric else "aligned (scale and shift)"
            print(f"depth loss: {kind}, weight {args.depth_weight:g}; "
                  f"distortion loss weight {args.dist_weight:g}")
        print(f"autoencoder {n_ae / 1e6:.2f} M parameters, discriminator {n_d / 1e6:.2f} M "
              f"(sees {'RGB + depth' if disc.depth else 'RGB only'}); "
              f"z = {args.z_ch}x{args.z_res}x{args.z_res}; {world()} process(es) on {device}; "
              f"batch {args.batch} x {args.accum} accumulated")
        if args.adv_weight > 0:
            print(f"novel views: yaw +-{args.yaw_range:g}, pitch +-{args.pitch_range:g} deg; "
                  f"adversarial weight {args.adv_weight:g} from step {args.adv_start}")
    return argparse.Namespace(device=device, ds=ds, root=root, ckpt_path=ckpt_path,
                              config=config, model=model, disc=disc, opt=opt, opt_d=opt_d,
                              ema=ema, step=step, lpips_fn=make_lpips(args.lpips_weight, device))


def train(args):
    """Stage 1's loop: autoencoder step, discriminator step, EMA; logs, previews, checkpoints."""
    r = setup(args)
    device, ds, model, disc, ema, step = r.device, r.ds, r.model, r.disc, r.ema, r.step
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16")
    fixed = [ds[i] for i in range(min(4, len(ds)))]   # the preview's images, unmirrored
    fixed_img = torch.stack([f["image"] for f in fixed]).to(device)
    fixed_depth = torch.stack([f["depth"] for f in fixed]).to(device) if ds.use_depth else None
    # Every batch of the run, from the resume step on, decoded ahead by the loader's workers.
    batches = iter(training.make_loader(ds, training.StepBatches(
        len(ds), args.batch, args.seed, step, args.steps, args.accum), args.workers, device))
    log = training.StepLog(args.steps, step, args.log_every, args.batch * args.accum, "img/s")
    while step < args.steps:
        # --- data: --accum micro-batches of --batch images ---
        micro = [to_device(next(batches), device) for _ in range(args.accum)]
        adv_on = args.adv_weight > 0 and step >= args.adv_start
        # --- autoencoder (generator) step, then discriminator step, then the average ---
        logs, fakes = autoencoder_step(model, disc, r.opt, micro, args, adv_on, r.lpips_fn,
                                       autocast)
        if adv_on:
            logs.update(discriminator_step(disc, r.opt_d, micro, fakes, args, autocast))
        if ema is not None:
            training.ema_update(ema, model, training.ema_decay(step, args.ema))
        step += 1
        log.add(step, logs)
        # --- checkpoint (every rank calls it), then the preview (rank 0) ---
        if step % args.every == 0 or step == args.steps:
            training.save_on_main(r.ckpt_path, lambda rngs: dict(
                kind=CKPT_KIND, config=r.config, model=model.state_dict(),
                disc=disc.state_dict(), opt=r.opt.state_dict(),
                opt_d=r.opt_d.state_dict(), step=step, args=dict(vars(args)), rng=rngs,
                data=os.path.abspath(r.root),
                **({} if ema is None else dict(ema=ema.state_dict()))))
            if is_main():
                shown = (model if ema is None else ema).eval()   # what load() returns
                preview(shown, fixed_img, fixed_depth, max(args.yaw_range, 20.0),
                        os.path.join(args.out, f"preview_{step:06d}.png"),
                        training.saved(r.ckpt_path, step))
    log.close()
    if is_main():
        print(f"done: {r.ckpt_path}, previews in {args.out}/preview_*.png")
    training.finish()
    return dict(model=model, ema=ema, disc=disc, history=log.history)


def main(argv=None):
    train(get_args(argv))


if __name__ == "__main__":
    data_mod.run_cli(main)
