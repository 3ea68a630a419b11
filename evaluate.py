"""
evaluate.py -- every number in docs/RESULTS.md: novel views scored against held-out truth,
and a distribution metric for the synthetic scenes, for samples as well as for novel views.

Not a stage of WildFusion, its measuring tape. 3D-aware generators are usually scored with
FID/KID on Inception features; those need weights from the internet and mean little at 32-64
px. Here the scenes of scenes.py come with their parameters (objects, colours, layout, light,
camera), so a small CNN can be trained, in minutes on a CPU, to predict them from an image; its
penultimate features (plus the image's edge energy, which it is blind to) then play Inception's
part -- the way FVD or domain-specific FIDs are built. The metric is validated before it is
used (`python evaluate.py validate`: a few minutes on a laptop CPU the first time, then
cached).

    python evaluate.py validate                       # train (once) and check the metric network
    python evaluate.py views runs/ae-tiny/ckpt.pt     # (b) novel views, (c) reconstructions, PSNR
    python evaluate.py samples runs/ae-tiny/ckpt.pt runs/ldm-tiny/ckpt.pt   # (a) samples
    python evaluate.py samples AE LDM --data data/classes-64 --cfg 4   # + the kind asked for
    python evaluate.py samplers runs/ldm-tiny/ckpt.pt # each sampler's error against the ODE

Map of the file:
    1. novel views      PSNR, the copy and depth-warp baselines, which pixels the input saw
                        (the warping itself is render.py's: forward_warp, seen_by_input)
    2. metric network   a small CNN that predicts a scene's parameters; its features; the
                        kind of object it sees (for class-conditional samples)
    3. distances        Frechet distance, KID (unbiased, jackknife standard error), precision
                        and recall (k-NN manifolds)
    4. validation       disjoint real sets ~ 0; blur, noise and colour shift ladders; empty rooms
    5. scoring          (a) samples, (b) novel views, (c) reconstructions; empty samples;
                        the samplers' distance from the exact ODE solution
    6. command line
"""
import argparse
import json
import os
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import autoencoder as ae
import data as data_mod
import diffusion
import render
import scenes
import training
from data import UserError


# ---------------------------------------------------------------------------------------------
# 1. Novel views against held-out truth
# ---------------------------------------------------------------------------------------------
def psnr(a, b, mask=None):
    """PSNR in dB of images in [-1, 1] (computed on [0, 1]), per image (B,). With a mask
    (B, 1, H, W) the mean squared error is over the masked pixels only (nan where none are)."""
    se = ((a - b) / 2).square().mean(1, keepdim=True)                       # (B, 1, H, W)
    if mask is None:
        mse = se.flatten(1).mean(1)
    else:
        m = mask.float().flatten(1)
        mse = (se.flatten(1) * m).sum(1) / m.sum(1)                          # nan: no pixels
    return -10 * torch.log10(mse.clamp_min(1e-10))


def pearson(a, b):
    """Pearson correlation per image of (B, ...) tensors."""
    a, b = a.flatten(1) - a.flatten(1).mean(1, keepdim=True), b.flatten(1) - b.flatten(1).mean(
        1, keepdim=True)
    return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1)).clamp_min(1e-12)


def relief(pred, true):
    """Least-squares slope of predicted on true depth per image of (B, ...) tensors: 1 when the
    scene has its true depth relief, 0.5 when it is squeezed to half as deep. Pearson cannot
    tell these apart, and a novel view turned about the pivot moves a point by its depth."""
    a, b = true.flatten(1) - true.flatten(1).mean(1, keepdim=True), pred.flatten(1)
    return (a * b).sum(1) / a.square().sum(1).clamp_min(1e-12)


def enlarge(raw, like):
    """The raw low-res RGB (B, 3, r, r) bilinearly enlarged to the size of `like`, in [-1, 1]."""
    return F.interpolate(raw, size=like.shape[-2:], mode="bilinear",
                         align_corners=False).clamp(-1, 1)


def load_view(stem, res):
    """A held-out novel view's true image (1, 3, res, res) in [-1, 1] and z-depth (1, 1, res,
    res), resized like data.py resizes photos (bicubic) and depth maps (nearest)."""
    rgb = torch.from_numpy(data_mod.load_rgb(stem + ".png", res)[0]).permute(2, 0, 1)
    depth = torch.from_numpy(np.load(stem + ".npy", allow_pickle=False))[None, None]
    return rgb[None].float() / 127.5 - 1, F.interpolate(depth, size=res, mode="nearest")


def candidates(model, planes, cam, image, depth, recon, own_depth):
    """Every image scored against a held-out view from camera `cam` (1, 4, 4): the model's
    render, its raw low-res RGB, and the baselines made from the input. -> {key: (1, 3, H, W)}.
    image, depth (1, ., H, W) the input and its true depth; recon the model's P0 render;
    own_depth the model's P0 depth at the input's size."""
    c = model.config
    out = model.render(planes, cam)
    pred = out["image"].clamp(-1, 1)
    warp = lambda img, d: render.forward_warp(img, d, cam, c["fov_deg"], c["radius"])[0]
    return dict(
        model=pred,
        copy=image,                          # the input as it is: a view that did not turn
        warp=warp(image, depth),             # the input moved by its true depth
        # The model's P0 reconstruction moved by the true depth: its texture with perfect
        # geometry. Against the model, the cost of its geometry; against the warp, the cost of
        # its texture (the reconstruction is not the photo).
        recwarp=warp(recon, depth),
        # ... and moved by the model's own P0 depth, as if its volume were a crisp surface
        # there: against recwarp the cost of its depth, against the model the cost of
        # rendering a soft volume (and the refinement CNN) instead of that surface.
        ownwarp=warp(recon, own_depth),
        # The raw RGB is the volume render itself, before the 2D refinement CNN: exactly
        # 3D-consistent (bilinearly enlarged where the renderer runs below the image size).
        raw=enlarge(out["raw"], pred))


@torch.no_grad()
def evaluate_views(model, root, max_scenes=None, yaw_only=20.0, pitch_only=10.0, save=None,
                   keep=False):
    """Score novel-view synthesis on ROOT/_heldout (made by `scenes.py --heldout`).

    For every held-out scene: PSNR of the reconstruction at P0 (the ceiling of the novel
    views) and of the raw low-res RGB there (raw_recon). For every held-out view: PSNR of each
    of `candidates` against the true render; at |yaw| = yaw_only (pitch 0) also split into the
    pixels the input saw and the disoccluded ones (seen_by_input), and at |pitch| = pitch_only
    (yaw 0) on its own; the Pearson correlation of the model's P0 depth with the true depth,
    and the slope of one on the other (relief: 1 = as deep as the true scene).
    Returns a dict of means; with keep=True also the images at P0 and at yaw +-yaw_only
    (key "images": input, recon, true, model, warp, copy, recwarp, ownwarp, raw;
    (N, 3, H, W) each) for the metric.
    """
    meta = scenes.read_scene_meta(root)
    held = os.path.join(root, "_heldout")
    if meta is None or not meta.get("heldout"):
        raise UserError(f"{root}: no held-out views; make them with `python scenes.py "
                        f"{root} --heldout 64` (the training scenes stay the same)")
    c = model.config
    if abs(meta["fov_deg"] - c["fov_deg"]) > 1e-6 or abs(meta["radius"] - c["radius"]) > 1e-6:
        print(f"note: the scenes were rendered with fov {meta['fov_deg']}, radius "
              f"{meta['radius']}; the model uses fov {c['fov_deg']}, radius {c['radius']}")
    ds = data_mod.ImageFolder(held, c["res"], depth=True, labels=False, verbose=False)
    n = min(len(ds), max_scenes or len(ds))
    rows, corr, slopes, grid = {}, [], [], []
    images = {k: [] for k in ("input", "recon", "true", "model", "warp", "copy", "recwarp",
                              "ownwarp", "raw")}
    add = lambda key, x: rows.setdefault(key, []).append(x)
    for i in tqdm(range(n), desc="evaluating", leave=False):
        item = ds[i]
        image, depth = item["image"][None], item["depth"][None]              # (1, 3, H, W) ...
        planes = model.decode(model.encode(image, depth))
        p0 = model.render(planes, model.P0(1))
        true_depth = F.interpolate(depth, size=p0["depth"].shape[-2:], mode="nearest")
        own_depth = F.interpolate(p0["depth"], size=depth.shape[-2:], mode="nearest")
        corr.append(pearson(p0["depth"], true_depth))
        slopes.append(relief(p0["depth"], true_depth))
        images["input"].append(image)
        images["recon"].append(p0["image"].clamp(-1, 1))
        add("psnr_recon", psnr(images["recon"][-1], image).item())         # P0: the ceiling
        # ... and of the raw render alone: what the 2D refinement adds at P0 (at yaw: "raw")
        add("psnr_raw_recon", psnr(enlarge(p0["raw"], image), image).item())
        name = os.path.splitext(os.path.basename(ds.files[i]))[0]
        for v in meta["views"]:
            yaw, pitch = v["yaw_deg"], v["pitch_deg"]
            gt, gt_depth = load_view(scenes.view_stem(held, name, yaw, pitch), c["res"])
            cam = render.orbit_camera(torch.tensor([float(yaw)]), torch.tensor([float(pitch)]),
                                      c["radius"])
            shown = candidates(model, planes, cam, image, depth, images["recon"][-1], own_depth)
            the_yaw = abs(abs(yaw) - yaw_only) < 1e-6 and pitch == 0
            the_pitch = abs(abs(pitch) - pitch_only) < 1e-6 and yaw == 0
            seen = render.seen_by_input(gt_depth, cam, depth, c["fov_deg"], c["radius"])
            for key, img in shown.items():
                score = psnr(img, gt).item()
                add(f"psnr_{key}", score)
                if the_pitch:
                    add(f"psnr_{key}_pitch{pitch_only:g}", score)
                if the_yaw:
                    add(f"psnr_{key}_yaw{yaw_only:g}", score)
                    add(f"psnr_{key}_yaw{yaw_only:g}_seen", psnr(img, gt, seen).item())
                    add(f"psnr_{key}_yaw{yaw_only:g}_unseen", psnr(img, gt, ~seen).item())
                    images[key].append(img)
            if the_yaw:
                add(f"unseen_fraction_yaw{yaw_only:g}", 1 - seen.float().mean().item())
                images["true"].append(gt)
                if save is not None and i < 6:
                    grid.append(torch.cat([image, gt, shown["model"], shown["warp"]], -1))
    # Means over the images that have such pixels (a view may have no disoccluded pixel).
    result = {k: float(np.nanmean(v)) for k, v in rows.items()}
    result["depth_pearson"] = torch.cat(corr).mean().item()
    result["depth_relief"] = torch.cat(slopes).mean().item()
    result["scenes"] = n
    if save and grid:
        ae.save_image(torch.cat(grid, -2), save)
    if keep:
        result["images"] = {k: torch.cat(v) for k, v in images.items() if v}
    return result


# ---------------------------------------------------------------------------------------------
# 2. The metric network: predict a scene's parameters from its image
# ---------------------------------------------------------------------------------------------
# A plain CNN: four stride-2 stages, global average pooling to `feat` features (most of the
# metric's feature space), then two heads: the scene's parameters (standardised; regression) and its
# number of objects (0-4; classification, so "no object" is a class of its own). GroupNorm, not
# BatchNorm: an image's features must not depend on the other images in its batch.
METRIC_KIND = "wildfusion-metricnet"
MAX_OBJECTS = 4


class MetricNet(nn.Module):
    def __init__(self, n_params, res=64, width=16, feat=64):
        super().__init__()
        self.config = dict(n_params=n_params, res=res, width=width, feat=feat)
        # A stride-2 stem (full-resolution layers would cost most of the time), then stages
        # of a stride-2 and a 3x3 convolution: res -> res / 16, width -> 4 x width.
        layers, c = [nn.Conv2d(3, width, 4, 2, 1), nn.GroupNorm(4, width), nn.SiLU()], width
        for c_next in (width * 2, width * 4, width * 4):
            layers += [nn.Conv2d(c, c_next, 4, 2, 1), nn.GroupNorm(4, c_next), nn.SiLU(),
                       nn.Conv2d(c_next, c_next, 3, padding=1), nn.GroupNorm(4, c_next),
                       nn.SiLU()]
            c = c_next
        self.body = nn.Sequential(*layers)
        self.proj = nn.Linear(c, feat)
        self.params_head = nn.Linear(feat, n_params)
        self.count_head = nn.Linear(feat, MAX_OBJECTS + 1)

    def resize(self, x):
        res = self.config["res"]
        if x.shape[-1] != res:
            x = F.interpolate(x, size=res, mode="bilinear", align_corners=False, antialias=True)
        return x

    def hidden(self, x):
        """Images (B, 3, H, W) in [-1, 1], any size -> the penultimate layer (B, feat)."""
        return F.silu(self.proj(self.body(self.resize(x)).mean((2, 3))))

    def forward(self, x):
        h = self.hidden(x)
        return self.params_head(h), self.count_head(h)


LOW_LEVEL_DIMS = 9                                  # 3 colour channels x 3 scales


def low_level(x, scales=3):
    """log of the standard deviation of each colour channel's Laplacian, at `scales` octaves
    (B, 3 * scales): an image's edge energy. Blur lowers it, noise raises it, and the log makes
    it a relative change, so bright and dark scenes weigh the same."""
    k = torch.tensor([[0.0, 1, 0], [1, -4, 1], [0, 1, 0]]).view(1, 1, 3, 3).repeat(3, 1, 1, 1)
    out = []
    for _ in range(scales):
        lap = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="reflect"), k.to(x), groups=3)
        out.append(lap.std((2, 3)).clamp_min(1e-4).log())
        x = F.avg_pool2d(x, 2)
    return torch.cat(out, 1)


def read_images(root, res, files=None):
    """Every image of a folder (sorted, as data.py lists them) -> (N, 3, res, res) in [-1, 1]."""
    files = files or data_mod.scan_images(root)
    out = torch.empty(len(files), 3, res, res)
    for i, f in enumerate(files):
        out[i] = torch.from_numpy(data_mod.load_rgb(os.path.join(root, f), res)[0]).permute(
            2, 0, 1).float() / 127.5 - 1
    return out


def scene_set(root, name, n, seed, meta, empty=False):
    """A set of scenes rendered for the metric alone, under ROOT/_metric/NAME (once, cached):
    scenes.py's scenes with another seed, drawn like ROOT's (room yaw, resolution)."""
    out = os.path.join(root, "_metric", name)
    have = scenes.read_scene_meta(out) or {}
    want = dict(n=n, seed=seed, res=meta["res"], room_yaw=meta.get("room_yaw", 0.0), empty=empty)
    if any(have.get(k) != v for k, v in want.items()):
        scenes.make_scenes(out, n, res=meta["res"], seed=seed, radius=meta["radius"],
                           fov_deg=meta["fov_deg"], room_yaw=meta.get("room_yaw", 0.0),
                           empty=empty, verbose=False)
    return out


def metric_path(root, res):
    return os.path.join(root, "_metric", f"metricnet-{res}.pt")


def train_metric_net(root, res=64, steps=2000, batch=64, seed=0, n_empty=250, verbose=True):
    """Train the metric network on ROOT's *training* scenes (never the held-out ones), plus
    the same rooms with their objects removed (so "no object" is seen), and cache it in
    ROOT/_metric/metricnet-RES.pt. A few minutes on a laptop CPU."""
    meta = scenes.read_scene_meta(root)
    if meta is None or not os.path.isfile(os.path.join(root, "params.npy")):
        raise UserError(f"{root}: the metric needs synthetic scenes with their parameters "
                        f"(params.npy); render them with `python scenes.py {root} --heldout 64`")
    torch.manual_seed(seed)
    t0 = time.time()
    # The first n_empty training rooms again, bare: same seed, so no held-out scene leaks in.
    empty = scene_set(root, f"empty-{n_empty}", n_empty, meta["seed"], meta, empty=True)
    x = torch.cat([read_images(root, res), read_images(empty, res)])          # (N, 3, r, r)
    p = np.concatenate([np.load(os.path.join(root, "params.npy")),
                        np.load(os.path.join(empty, "params.npy"))])
    p = torch.from_numpy(p)                                                  # (N, P)
    count = p[:, 0].long()                                                   # objects 0-4
    mean, std = p.mean(0), p.std(0).clamp_min(1e-3)
    target = (p - mean) / std
    net = MetricNet(p.shape[1], res)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, 2e-3, total_steps=steps, pct_start=0.1)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(range(steps), desc=f"training the metric network ({len(x)} images)",
               disable=not verbose)
    for _ in bar:
        idx = torch.randint(len(x), (batch,), generator=g)
        pred, logits = net(x[idx])
        loss = F.mse_loss(pred, target[idx]) + F.cross_entropy(logits, count[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    ckpt = dict(kind=METRIC_KIND, config=net.config, state=net.state_dict(), mean=mean, std=std,
                names=list(scenes.PARAM_NAMES), trained_on=os.path.abspath(root), seed=seed,
                scenes=scene_key(meta), seconds=time.time() - t0)
    path = metric_path(root, res)
    training.save_checkpoint(path, ckpt, data_mod.SAFE)                 # atomic, checksummed
    return load_metric_net(path)


def scene_key(meta):
    """What identifies a set of training scenes (a cached network is stale when it changes)."""
    return "n={n} seed={seed} res={res} room_yaw={room_yaw}".format(
        **{"room_yaw": 0.0, **meta}) + (" classes" if meta.get("classes") else "")


def load_metric_net(path):
    ckpt = training.load_checkpoint(path, METRIC_KIND, "a metric network (ROOT/_metric/*.pt)")
    net = MetricNet(**ckpt["config"])
    net.load_state_dict(ckpt["state"])
    net.mean, net.std, net.seconds = ckpt["mean"], ckpt["std"], ckpt["seconds"]
    net.scenes = ckpt["scenes"]
    return net.eval().requires_grad_(False)


def metric_net(root, res=64, verbose=True):
    """The cached metric network of ROOT, trained first if there is none, or if the scenes
    were rendered again since (another seed, count or room yaw)."""
    path = metric_path(root, res)
    if os.path.isfile(path):
        net = load_metric_net(path)
        if net.scenes == scene_key(scenes.read_scene_meta(root)):
            return net
        print(f"note: {path} was trained on other scenes ({net.scenes}); training it again")
    return train_metric_net(root, res, verbose=verbose)


@torch.no_grad()
def features(net, images, batch=256):
    """Images (N, 3, H, W) in [-1, 1], any size -> the metric's features (N, feat + 9) float64
    and the predicted object count (N,). The features are the network's penultimate layer,
    then the image's low-level statistics (low_level). The first is what the scene is -- and is
    blind to blur and noise, which change no scene parameter (the validation checks it) -- the
    second sees exactly those."""
    feats, counts = [], []
    for i in range(0, len(images), batch):
        x = net.resize(images[i:i + batch].float())
        h = net.hidden(x)
        feats.append(torch.cat([h, low_level(x)], 1).double())
        counts.append(net.count_head(h).argmax(1))
    return torch.cat(feats), torch.cat(counts)


KIND_COLUMNS = [scenes.PARAM_NAMES.index(k) for k in scenes.KIND_PARAMS]  # kind counts


@torch.no_grad()
def kinds(net, images, batch=256):
    """Images (N, 3, H, W) -> the kind of object (N,) the metric network sees most of: the
    index into scenes.KINDS of the largest predicted count of spheres, boxes and cylinders.
    For --classes scenes (one kind each) this is the scene's class."""
    out = []
    for i in range(0, len(images), batch):
        pred = net.params_head(net.hidden(images[i:i + batch].float()))   # normalised params
        out.append((pred * net.std + net.mean)[:, KIND_COLUMNS].argmax(1))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# 3. Distances between two sets of features
# ---------------------------------------------------------------------------------------------
def sqrtm_psd(a):
    """The symmetric square root of a symmetric positive semi-definite matrix, by its eigen-
    decomposition (eigenvalues clamped at 0: round-off can make the smallest slightly < 0)."""
    w, v = torch.linalg.eigh(a)
    return (v * w.clamp_min(0).sqrt()) @ v.T


def frechet_distance(x, y):
    """Frechet distance between Gaussians fitted to two feature sets (N, d), (M, d), float64:
    |mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2).

    The usual scipy sqrtm(S_x S_y) takes the root of a non-symmetric matrix and can return
    complex round-off; S_x^1/2 S_y S_x^1/2 is symmetric PSD with the same trace root, so two
    symmetric eigendecompositions do it stably. Biased upwards for small N (like FID)."""
    x, y = x.double(), y.double()
    mx, my = x.mean(0), y.mean(0)
    sx, sy = torch.cov(x.T), torch.cov(y.T)
    r = sqrtm_psd(sx)
    cross = torch.linalg.eigvalsh(r @ sy @ r).clamp_min(0).sqrt().sum()
    return ((mx - my).square().sum() + sx.trace() + sy.trace() - 2 * cross).item()


def kid(x, y, paired=False):
    """Kernel Inception Distance on these features: the unbiased estimate of MMD^2 with the
    cubic polynomial kernel k(a, b) = (a.b / d + 1)^3 (Binkowski et al. 2018), and its standard
    error by the delete-one jackknife (cheap: each leave-one-out MMD^2 is the full one minus
    one row of the kernel matrices). Unbiased: two sets from one distribution score ~0, and may
    score below 0. x (N, d), y (M, d) -> (kid, standard error).

    paired=True when y[i] is a rendering of the same scene as x[i] (a reconstruction of photo
    i, a novel view of scene i against its true view). The cross term sum_ij k(x_i, y_j) then
    holds N pairs that look alike by construction, so the plain estimate credits each pair's
    likeness to the distributions and comes out too low: a set of samples, unpaired with the
    photos, could not reach it even if it were drawn from the same distribution. The paired
    estimate (Gretton et al. 2012, MMD^2_u) leaves those pairs out:
        sum_{i != j} [k(x_i, x_j) + k(y_i, y_j) - k(x_i, y_j) - k(x_j, y_i)] / (N (N - 1)),
    and its jackknife deletes a pair at a time."""
    x, y = x.double(), y.double()
    n, m, d = len(x), len(y), x.shape[1]
    kxx, kyy, kxy = [(a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y))]
    if paired:
        if n != m:
            raise ValueError(f"paired KID needs sets of one size, got {n} and {m}")
        h = kxx + kyy - kxy - kxy.T                                           # (N, N)
        h.fill_diagonal_(0)
        full = h.sum() / (n * (n - 1))
        # Without pair i: its row and column leave h.
        loo = (h.sum() - 2 * h.sum(1)) / ((n - 1) * (n - 2))                  # (N,)
        var = (n - 1) / n * (loo - loo.mean()).square().sum()
        return full.item(), var.sqrt().item()
    kxx.fill_diagonal_(0)
    kyy.fill_diagonal_(0)
    sxx, syy, sxy = kxx.sum(), kyy.sum(), kxy.sum()

    def mmd(sxx, syy, sxy, n, m):
        return sxx / (n * (n - 1)) + syy / (m * (m - 1)) - 2 * sxy / (n * m)
    full = mmd(sxx, syy, sxy, n, m)
    # Without x_i: its row and column leave kxx (2 * row sum), its row leaves kxy.
    without_x = mmd(sxx - 2 * kxx.sum(1), syy, sxy - kxy.sum(1), n - 1, m)   # (n,)
    without_y = mmd(sxx, syy - 2 * kyy.sum(1), sxy - kxy.sum(0), n, m - 1)  # (m,)
    var = ((n - 1) / n * (without_x - without_x.mean()).square().sum()
           + (m - 1) / m * (without_y - without_y.mean()).square().sum())
    return full.item(), var.sqrt().item()


def precision_recall(real, fake, k=3):
    """Improved precision and recall (Kynkaanniemi et al. 2019). Each set's manifold is the
    union of balls around its points with radius the distance to their k-th nearest neighbour.
    precision: the fraction of fakes inside the real manifold (are the samples realistic?);
    recall: the fraction of reals inside the fake manifold (is all of the data covered?)."""
    real, fake = real.double(), fake.double()

    def radii(a):                                  # k + 1: itself at distance 0 (k < N)
        return torch.cdist(a, a).kthvalue(min(k, len(a) - 1) + 1, dim=1).values

    def inside(points, centres, r):
        return (torch.cdist(points, centres) <= r[None]).any(1).double().mean().item()
    return inside(fake, real, radii(real)), inside(real, fake, radii(fake))


def distances(real, fake, paired=False):
    """All four numbers between two sets of metric features (N, feat + 9), as a dict; and KID on
    each part alone: "content" (the network's features: objects, colours, layout) and
    "texture" (low_level: edge energy). Blurry renders and renders with
    high-frequency artefacts can score alike on the whole and far apart on the parts, so both
    are reported. paired: fake[i] renders the scene of real[i] (kid; precision and recall do
    not correct for it and read high for paired sets)."""
    k, k_se = kid(real, fake, paired)
    p, r = precision_recall(real, fake)
    out = dict(fd=frechet_distance(real, fake), kid=k, kid_se=k_se, precision=p, recall=r)
    cut = real.shape[1] - LOW_LEVEL_DIMS
    for part, sl in (("content", slice(0, cut)), ("texture", slice(cut, None))):
        out[f"kid_{part}"], out[f"kid_{part}_se"] = kid(real[:, sl], fake[:, sl], paired)
    return dict(out, n_real=len(real), n_fake=len(fake))


# ---------------------------------------------------------------------------------------------
# 4. Validation: a metric that does not pass these is not used
# ---------------------------------------------------------------------------------------------
def gaussian_blur(x, sigma):
    """Separable Gaussian blur of (B, C, H, W) with standard deviation sigma pixels."""
    r = max(1, int(3 * sigma + 0.5))
    t = torch.arange(-r, r + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = (k / k.sum()).view(1, 1, 1, -1).repeat(x.shape[1], 1, 1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode="reflect"), k, groups=x.shape[1])
    return F.conv2d(F.pad(x, (0, 0, r, r), mode="reflect"), k.transpose(2, 3), groups=x.shape[1])


DEGRADATIONS = dict(
    # name: (strengths, function of (images in [-1, 1], strength, generator))
    blur=((0.5, 1.0, 2.0), lambda x, s, g: gaussian_blur(x, s)),
    noise=((0.05, 0.1, 0.2), lambda x, s, g: (x + 2 * s * torch.randn(x.shape, generator=g))
           .clamp(-1, 1)),                                   # s: std in [0, 1] units
    colour=((0.05, 0.1, 0.2), lambda x, s, g: (x + 2 * s * torch.tensor([1.0, 0.0, -1.0])
                                              .view(1, 3, 1, 1)).clamp(-1, 1)),  # red up, blue down
)


def validate(net, root, n=250, res=None, seed=0, verbose=True):
    """Score a second set of real scenes, and degraded copies of it, against a first one.
    Both are new scenes (another seed than ROOT's training and held-out ones), drawn like them;
    "empty" is the second set's rooms with every object removed. -> list of rows (dicts)."""
    meta = scenes.read_scene_meta(root)
    res = res or net.config["res"]
    ref = scene_set(root, f"ref-{2 * n}", 2 * n, meta["seed"] + 1, meta)
    bare = scene_set(root, f"ref-{2 * n}-empty", 2 * n, meta["seed"] + 1, meta, empty=True)
    files = data_mod.scan_images(ref)
    a, b = read_images(ref, res, files[:n]), read_images(ref, res, files[n:])
    fa = features(net, a)[0]
    g = torch.Generator().manual_seed(seed)
    sets = [("real (disjoint)", 0.0, b)]
    for name, (strengths, fn) in DEGRADATIONS.items():
        sets += [(name, s, fn(b, s, g)) for s in strengths]
    sets.append(("empty rooms", 0.0, read_images(bare, res, data_mod.scan_images(bare)[n:])))
    rows = []
    for name, s, imgs in tqdm(sets, desc="validating the metric", disable=not verbose):
        fb, counts = features(net, imgs)
        rows.append(dict(set=name, strength=s, **distances(fa, fb),
                         no_object=(counts == 0).double().mean().item()))
    return rows


def count_accuracy(net, root):
    """How often the network's object count is right on ROOT's held-out scenes (never trained
    on): whether "no object" in a sample can be believed depends on it."""
    held = os.path.join(root, "_heldout")
    truth = torch.from_numpy(np.load(os.path.join(held, "params.npy"))[:, 0]).long()
    counts = features(net, read_images(held, net.config["res"]))[1]
    return (counts == truth).double().mean().item()


# ---------------------------------------------------------------------------------------------
# 5. Scoring: (a) samples, (b) novel views, (c) reconstructions
# ---------------------------------------------------------------------------------------------
def score_views(net, root, model, max_scenes=None, save=None):
    """(b) the autoencoder's novel views at yaw +-20 against the true views there, with the
    copy and depth-warp baselines scored the same way; (c) its reconstructions at P0 against
    the input photos: the ceiling for samples decoded from its latents. Plus evaluate_views'
    PSNR table."""
    r = evaluate_views(model, root, max_scenes, save=save, keep=True)
    imgs = r.pop("images")
    true = features(net, imgs["true"])[0]
    # Every set here is paired with its reference, scene by scene (kid's paired estimate).
    # (In (b) each scene gives two views, -20 and +20: the pair across them stays counted,
    # 1 of the 127 others in each row.)
    for key in ("model", "copy", "warp"):
        r.update({f"{k}_{key}_yaw20": v for k, v in distances(true, features(
            net, imgs[key])[0], paired=True).items() if not k.startswith("n_")})
    rec = distances(features(net, imgs["input"])[0], features(net, imgs["recon"])[0],
                    paired=True)
    r.update({f"{k}_recon": v for k, v in rec.items() if not k.startswith("n_")})
    return r


@torch.no_grad()
def score_samples(net, root, ae_model, ldm, n=256, seed=0, steps=50, yaw=20.0, eta=0.0,
                  sampler="ddim", cfg=1.0):
    """(a) n samples, rendered at P0 and at yaw +-yaw, against the held-out scenes' real views
    at the same poses; the fraction of samples with no object (the metric network's object
    count, at P0); and the samples' latent spread: the standard deviation of their latents in
    the diffusion model's normalised units, where the data's latents have 1 (a sampler that
    overshoots shows here before anything is decoded). A class-conditional model samples its
    classes in turn, guided with scale cfg; when its classes are scenes.py's kinds (--classes
    scenes), class_accuracy is how often the metric network sees the kind asked for, and
    class_accuracy_real how often it sees the true kind in the held-out scenes (its ceiling)."""
    c = ae_model.config
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % ldm.num_classes if ldm.num_classes else None
    z = diffusion.ddim_sample(ldm, (n, *ldm.config["latent_shape"]), steps, eta, labels, cfg,
                              generator=g, progress=True, sampler=sampler)
    planes = ae_model.decode(z)

    def views(y):                                # all samples from yaw y: (n, 3, res, res)
        cams = render.orbit_camera(torch.full((n,), y), torch.zeros(n), c["radius"])
        return ae.render_frames(ae_model, planes, cams)[0].clamp(-1, 1)
    # The real views: the held-out inputs, and their true views at -yaw and +yaw.
    held = os.path.join(root, "_heldout")
    files = data_mod.scan_images(held)
    real_images = read_images(held, c["res"], files)                       # (M, 3, res, res)
    real_p0, real_counts = features(net, real_images)
    real_side = features(net, torch.cat([
        load_view(scenes.view_stem(held, os.path.splitext(f)[0], y, 0.0), c["res"])[0]
        for f in files for y in (-yaw, yaw)]))[0]
    p0 = views(0.0)
    fake_p0, counts = features(net, p0)
    fake_side = features(net, torch.cat([views(-yaw), views(yaw)]))[0]
    out = {f"{k}_p0": v for k, v in distances(real_p0, fake_p0).items()}
    if labels is not None and set(ldm.config["classes"]) <= set(scenes.KINDS):
        asked = torch.tensor([scenes.KINDS.index(ldm.config["classes"][k]) for k in labels])
        out["class_accuracy"] = (kinds(net, p0) == asked).double().mean().item()
        truth = torch.from_numpy(np.load(os.path.join(held, "params.npy"))[:, KIND_COLUMNS]
                                 ).argmax(1)
        out["class_accuracy_real"] = (kinds(net, real_images) == truth).double().mean().item()
    out.update({f"{k}_yaw{yaw:g}": v for k, v in distances(real_side, fake_side).items()})
    out["no_object_fraction"] = (counts == 0).double().mean().item()
    out["no_object_fraction_real"] = (real_counts == 0).double().mean().item()
    out["latent_spread"] = ldm.normalize(z).std().item()
    return out


@torch.no_grad()
def sampler_errors(ldm, n=64, seed=0, budgets=(5, 10, 15, 20, 30, 50), reference=1000):
    """How far each sampler lands from the exact solution of the sampling ODE, at each step
    budget: the RMS distance between its latents and those of a `reference`-step DDIM run from
    the same noise, in the model's normalised units (where the data's latents have std 1).
    Paired, so it separates samplers far more finely than a distribution metric can.
    -> rows [{sampler, steps, rms}]."""
    noise = torch.randn((n, *ldm.config["latent_shape"]), generator=torch.Generator().manual_seed(
        seed))
    labels = torch.arange(n) % ldm.num_classes if ldm.num_classes else None

    def run(sampler, steps):
        return ldm.normalize(diffusion.ddim_sample(ldm, None, steps, labels=labels, noise=noise,
                                                   sampler=sampler))
    exact = run("ddim", reference)
    return [dict(sampler=s, steps=k, rms=(run(s, k) - exact).square().mean().sqrt().item())
            for s in diffusion.SAMPLERS for k in budgets]


# ---------------------------------------------------------------------------------------------
# 6. Command line
# ---------------------------------------------------------------------------------------------
def print_rows(rows, keys):
    print("  ".join(f"{k:>16s}" for k in keys))
    for row in rows:
        print("  ".join(f"{row[k]:>16.4g}" if isinstance(row[k], float) else f"{row[k]!s:>16s}"
                        for k in keys))


def write_json(path, obj):
    with data_mod.writing(path, "the results") as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=1)
    print(f"wrote {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description="Novel-view and sample metrics for synthetic scenes.")
    p.add_argument("what", choices=["validate", "views", "samples", "samplers"])
    p.add_argument("ckpt", nargs="*", help="views: AE_CKPT; samples: AE_CKPT LDM_CKPT; "
                   "samplers: LDM_CKPT")
    p.add_argument("--data", default=None, help="synthetic scenes with held-out views "
                   "(default: the autoencoder's default data, data/scenes-64)")
    p.add_argument("--res", type=int, default=64, help="the metric network's input size")
    p.add_argument("--n", type=int, default=256, help="samples to score (samples)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (samples)")
    p.add_argument("--sampler", default="ddim", choices=diffusion.SAMPLERS,
                   help="samples: ddim (the reference) or dpm++, as sample.py")
    p.add_argument("--cfg", type=float, default=1.0, help="classifier-free guidance scale "
                   "(samples, class-conditional models)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (samples): 0 deterministic, "
                   "1 DDPM-like, as sample.py")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--json", default=None, help="write the numbers here too")
    args = p.parse_args(argv)
    need = dict(validate=0, views=1, samples=2, samplers=1)[args.what]
    if len(args.ckpt) != need:
        raise UserError(f"evaluate.py {args.what} takes {need} checkpoint path(s), got "
                        f"{len(args.ckpt)}")
    if args.steps < 1 or not 0 <= args.eta <= 1 or args.cfg < 0:
        raise UserError(f"--steps must be >= 1, --eta in [0, 1] and --cfg >= 0, got "
                        f"{args.steps}, {args.eta} and {args.cfg}")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.what == "samplers":                  # the ODE error alone: no metric network
        rows = sampler_errors(diffusion.load(args.ckpt[0]), seed=args.seed)
        print_rows(rows, ["sampler", "steps", "rms"])
        if args.json:
            write_json(args.json, rows)
        return rows
    # The checkpoints first: a bad one fails in a second, not after the metric network trained.
    if args.what == "views":
        model = ae.load(args.ckpt[0])
    elif args.what == "samples":
        ae_model, ldm = diffusion.load_models(args.ckpt[0], args.ckpt[1], torch.device("cpu"))
    root = args.data or ae.default_data_root(64)
    net = metric_net(root, args.res)
    if args.what == "validate":
        rows = validate(net, root, seed=args.seed)
        acc = count_accuracy(net, root)
        print(f"metric network: {root}, {args.res} px, trained in {net.seconds:.0f} s; object "
              f"count right on {100 * acc:.1f}% of the held-out scenes; first real set vs:")
        rows.append(dict(set="held-out object count accuracy", value=acc))
        print_rows(rows[:-1], ["set", "strength", "fd", "kid", "kid_se", "precision", "recall",
                               "no_object"])
        result = rows
    elif args.what == "views":
        result = score_views(net, root, model, save=os.path.join(
            os.path.dirname(args.ckpt[0]), "eval_views.png"))
        for k, v in result.items():
            print(f"  {k:28s} {v:.4g}")
    else:
        result = score_samples(net, root, ae_model, ldm, args.n, args.seed, args.steps,
                               eta=args.eta, sampler=args.sampler, cfg=args.cfg)
        for k, v in result.items():
            print(f"  {k:28s} {v:.4g}")
    if args.json:
        write_json(args.json, result)
    return result


if __name__ == "__main__":
    data_mod.run_cli(main)
