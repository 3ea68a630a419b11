"""
sample.py -- generate 3D scenes with a trained WildFusion, look at them, and run the paper's
applications (Sec. 4): novel views of a photo, 3D-aware interpolation, generative resampling,
geometry export, and the metrics.

    python sample.py --demo                   # everything, tiny (32 px), on a laptop CPU
    python sample.py --demo --preset small    # the same at 64 px
    python sample.py --ae runs/ae/ckpt.pt --ldm runs/ldm/ckpt.pt --n 16 --out samples/
    python sample.py --ae A --ldm L --class dog --cfg 3             # class-conditional + guidance
    python sample.py --ae A --image photo.jpg                      # novel views of one photo
    python sample.py --ae A --ldm L --interp a.jpg b.jpg           # or --interp-seeds 1 2
    python sample.py --ae A --ldm L --resample photo.jpg --strength 0.3,0.6
    python sample.py --ae A --ldm L --export-ply --metrics         # point clouds, NFS (+ FID/KID)
    python sample.py --ae A --image photo.jpg --export-mesh         # a triangle mesh of a photo

    python sample.py --ae A --ldm L --viewer                       # + viewer.html: orbit by hand

Every mode writes files a person opens (PNG grids, GIF turntables, PLY point clouds, and with
--viewer one self-contained viewer.html to turn the scenes in a browser) and prints where it
wrote them.

Map of the file:
    1. loading             a photo, a class name (the checkpoints: diffusion.load_models)
    2. cameras and frames  turntable cameras, rendering frames in chunks, PNG / GIF writers
    3. the 3D viewer       views on a yaw x pitch grid as sprites in one offline HTML page
    4. modes               generate, novel views of a photo, interpolation, resampling
    5. geometry            coloured point clouds from rendered depth, and triangle meshes by
                           marching cubes over the density, written as PLY
    6. metrics             NFS (non-flatness score), FID / KID through torch-fidelity
    7. the demo            autoencoder -> diffusion -> samples on the synthetic scenes
"""
import argparse
import base64
import io
import json
import math
import os
import time
from html import escape as html_escape

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import autoencoder as ae
import data as data_mod
import diffusion
import evaluate
import render
import scenes
import training
from autoencoder import render_frames
from data import UserError

FPS = 20                  # frames per second of the GIFs
PITCH = 5.0               # degrees: the turntable's pitch wobble (and the metrics' pitch range)
# Sampler steps by default: DPM-Solver++(2M) reaches DDIM-50's sample quality in 15.
STEPS = {"dpm++": 15, "ddim": 50}


# ---------------------------------------------------------------------------------------------
# 1. Loading
# ---------------------------------------------------------------------------------------------
def load_photo(path, ae_model, device):
    """A photo (and its depth map, if DIR/depth/STEM.npy or .png exists beside it) ->
    image (1, 3, res, res) in [-1, 1], depth (1, 1, res, res) or None. Read exactly as the
    training data is (data.load_photo): upright by its EXIF flag, centre-cropped, resized."""
    res = ae_model.config["res"]
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    folder, name = os.path.split(os.path.abspath(path))
    dpath = data_mod.depth_path_for(folder, name)
    try:
        rgb, depth, _ = data_mod.load_photo(path, dpath, res)
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read this image ({type(e).__name__}: {e})")
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    if depth is not None:
        depth = torch.from_numpy(depth)[None, None].to(device)               # (1, 1, res, res)
    return image, depth


def parse_class(text, ldm):
    """--class NAME or INDEX -> label index (int)."""
    names = ldm.config["classes"]
    if not names:
        raise UserError("this diffusion model is unconditional: leave --class out")
    if text in names:
        return names.index(text)
    if text.isdigit() and int(text) < len(names):
        return int(text)
    raise UserError(f"--class {text!r}: this model knows {', '.join(names)} (or 0.."
                    f"{len(names) - 1})")


# ---------------------------------------------------------------------------------------------
# 2. Cameras, frames, files
# ---------------------------------------------------------------------------------------------
def turntable_cameras(frames, yaw, pitch, radius):
    """A yaw sweep -yaw .. +yaw .. -yaw (one sine period) with a slight pitch wobble at twice
    the rate, so the camera traces a figure eight: the parallax shows in both directions while
    staying in the range of views the autoencoder was trained on. -> (frames, 4, 4)."""
    k = torch.arange(frames, dtype=torch.float32) / frames
    return render.orbit_camera(yaw * torch.sin(2 * math.pi * k),
                               pitch * torch.sin(4 * math.pi * k), radius)


def depth_colours(depths, opacities, size):
    """Depth and opacity maps (F, 1, h, w) -> colour images (F, 3, size, size) in [-1, 1] on ONE
    range for the whole sequence, so a change of colour is a change of depth (near = dark)."""
    cmap = ae.colorize_depth(depths, opacities, one_range=True)
    return F.interpolate(cmap, size=size, mode="nearest")


def side_by_side(images, depths, opacities):
    """RGB | colour-mapped depth, one frame each: (F, 3, H, 2W) in [-1, 1]."""
    return torch.cat([images, depth_colours(depths, opacities, images.shape[-1])], -1)


def to_uint8(x):
    """(..., 3, H, W) in [-1, 1] -> uint8 (..., H, W, 3) numpy."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().byte().movedim(-3, -1).cpu().numpy()


def save_gif(frames, path, fps=20, min_size=192):
    """(F, 3, H, W) in [-1, 1] -> looping GIF, upscaled (nearest) to at least min_size px high so
    a 32 px model is visible."""
    scale = max(1, math.ceil(min_size / frames.shape[-2]))
    if scale > 1:
        frames = F.interpolate(frames, scale_factor=scale, mode="nearest")
    imgs = [Image.fromarray(f) for f in to_uint8(frames)]
    with data_mod.writing(path, "a turntable GIF") as tmp:
        imgs[0].save(tmp, save_all=True, append_images=imgs[1:], duration=round(1000 / fps),
                     loop=0)
    return path


def save_grid(images, path, nrow):
    """(N, 3, H, W) in [-1, 1] -> one PNG with nrow images per row."""
    N, C, H, W = images.shape
    pad = (-N) % nrow
    images = torch.cat([images, torch.ones(pad, C, H, W)]) if pad else images
    grid = images.view(-1, nrow, C, H, W).permute(2, 0, 3, 1, 4).reshape(C, -1, nrow * W)
    ae.save_image(grid, path)
    return path


def turntable(ae_model, planes, path, args):
    """One scene -> a GIF of RGB | depth along the turntable path (+ a PNG strip of it)."""
    cams = turntable_cameras(args.frames, args.yaw, PITCH, ae_model.config["radius"])
    frames = side_by_side(*render_frames(ae_model, planes, cams))
    # and a PNG strip of 6 evenly spaced frames, for pages that cannot show a GIF
    save_grid(frames[::math.ceil(len(frames) / 6)], path[:-4] + "_strip.png", 6)
    return save_gif(frames, path, FPS)


# ---------------------------------------------------------------------------------------------
# 3. The 3D viewer: one self-contained HTML page
# ---------------------------------------------------------------------------------------------
# A GIF shows one fixed camera path; a student wants to turn the scene by hand. Real-time
# rendering in the browser would need the triplane and the MLPs in JavaScript, so instead every
# scene is rendered ahead of time on a yaw x pitch grid of cameras and packed into two "sprite"
# images (RGB and depth), cell (row j, column i) = the view from (yaw_i, pitch_j). The page holds
# them as base64 data: URIs and a few lines of JavaScript pick the cell nearest to the mouse
# position. No network: nothing is fetched, so the file opens from disk in any browser.
VIEWER_YAWS = torch.linspace(-30, 30, 13)             # degrees, 5 apart: sprite columns
VIEWER_PITCHES = torch.linspace(15, -15, 5)           # degrees, rows (top row: camera above)


def viewer_cameras(yaws, pitches, radius):
    """The viewer's camera grid, row-major (pitch j, yaw i) -> (P * Y, 4, 4)."""
    pitch, yaw = torch.meshgrid(pitches, yaws, indexing="ij")                  # (P, Y) each
    return render.orbit_camera(yaw.flatten(), pitch.flatten(), radius)


@torch.no_grad()
def viewer_sprites(ae_model, planes, yaws=VIEWER_YAWS, pitches=VIEWER_PITCHES, res=None):
    """One scene (1, 3, C, R, R) -> RGB and depth sprites, uint8 (P * res, Y * res, 3) each."""
    cams = viewer_cameras(yaws, pitches, ae_model.config["radius"])
    images, depths, opacities = render_frames(ae_model, planes, cams, res=res)  # (P*Y, ., H, W)
    P, Y, W = len(pitches), len(yaws), images.shape[-1]

    def sprite(x):                                     # (P*Y, 3, H, W) -> (P*H, Y*W, 3)
        return to_uint8(x).reshape(P, Y, W, W, 3).transpose(0, 2, 1, 3, 4).reshape(
            P * W, Y * W, 3)
    return sprite(images), sprite(depth_colours(depths, opacities, W))


def png_data_uri(arr):
    """uint8 (H, W, 3) -> 'data:image/png;base64,...' (lossless, so a test can compare pixels)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


VIEWER_HTML = """<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>WildFusion: 3D viewer</title>
<style>
  body { margin: 0; padding: 16px; background: #1e1e1e; color: #ddd; font: 15px sans-serif; }
  h1 { font-size: 18px; margin: 0 0 8px; }
  #bar { display: flex; gap: 16px; align-items: center; flex-wrap: wrap; margin: 8px 0; }
  canvas { width: min(90vw, 70vh, 512px); height: auto; image-rendering: pixelated;
           cursor: grab; touch-action: none; display: block; background: #000; }
  canvas:active { cursor: grabbing; }
  #info { font-family: monospace; }
  .help { color: #999; max-width: 512px; }
</style></head>
<body>
<h1>WildFusion: __TITLE__</h1>
<div id="bar">
  <label>scene <select id="scene"></select></label>
  <label><input type="checkbox" id="depth"> depth (near = dark)</label>
  <span id="info"></span>
</div>
<canvas id="view" width="__RES__" height="__RES__"></canvas>
<p class="help">Drag (mouse or touch) to turn the camera about the scene; arrow keys step yaw
and pitch; <b>d</b> toggles depth; <b>n</b> / <b>p</b> next / previous scene. Each view was
rendered ahead of time from the model on a __NY__ x __NP__ grid (yaw __YMIN__..__YMAX__ deg,
pitch __PMIN__..__PMAX__ deg). A link such as <code>#yaw=10&amp;pitch=-5&amp;sample=1</code>
opens a given view.</p>
<div hidden>
__IMAGES__
</div>
<script>
"use strict";
const YAWS = __YAWS__, PITCHES = __PITCHES__, NAMES = __NAMES__, RES = __RES__;
const state = { scene: 0, yi: YAWS.length >> 1, pi: PITCHES.length >> 1, depth: false };
const canvas = document.getElementById("view"), ctx = canvas.getContext("2d");
const pick = document.getElementById("scene"), box = document.getElementById("depth");
NAMES.forEach((name, k) => pick.add(new Option(name, k)));
const clamp = (v, lo, hi) => Math.max(lo, Math.min(hi, v));
const nearest = (arr, v) =>     // index of the entry of arr closest to v
  arr.reduce((b, x, k) => Math.abs(x - v) < Math.abs(arr[b] - v) ? k : b, 0);

function draw(updateUrl) {
  const img = document.getElementById((state.depth ? "depth" : "rgb") + state.scene);
  ctx.imageSmoothingEnabled = false;
  // sprite cell (row = pitch index, column = yaw index), drawn 1:1 into the RES x RES canvas
  ctx.drawImage(img, state.yi * RES, state.pi * RES, RES, RES, 0, 0, RES, RES);
  pick.value = state.scene; box.checked = state.depth;
  document.getElementById("info").textContent =
    "yaw " + YAWS[state.yi] + "\\u00b0  pitch " + PITCHES[state.pi] + "\\u00b0";
  if (updateUrl) history.replaceState(null, "", "#yaw=" + YAWS[state.yi] + "&pitch=" +
    PITCHES[state.pi] + "&sample=" + state.scene + (state.depth ? "&depth=1" : ""));
}

function fromHash() {            // #yaw=..&pitch=..&sample=..&depth=1 sets the view
  const h = new URLSearchParams(location.hash.slice(1));
  if (h.has("yaw")) state.yi = nearest(YAWS, parseFloat(h.get("yaw")));
  if (h.has("pitch")) state.pi = nearest(PITCHES, parseFloat(h.get("pitch")));
  if (h.has("sample")) state.scene = clamp(parseInt(h.get("sample")) || 0, 0, NAMES.length - 1);
  if (h.has("depth")) state.depth = h.get("depth") === "1";
}

// Dragging: every 1/YAWS.length of the canvas width is one yaw step (drag right = camera
// moves right), every 1/PITCHES.length of its height one pitch step (drag up = camera up).
let drag = null;
canvas.addEventListener("pointerdown", e => {
  drag = { x: e.clientX, y: e.clientY, yi: state.yi, pi: state.pi };
  canvas.setPointerCapture(e.pointerId);
});
canvas.addEventListener("pointermove", e => {
  if (!drag) return;
  const r = canvas.getBoundingClientRect();
  const dy = Math.round((e.clientX - drag.x) / r.width * YAWS.length);
  const dp = Math.round((e.clientY - drag.y) / r.height * PITCHES.length);
  state.yi = clamp(drag.yi + dy, 0, YAWS.length - 1);
  state.pi = clamp(drag.pi + dp, 0, PITCHES.length - 1);
  draw(false);
});
canvas.addEventListener("pointerup", () => { drag = null; draw(true); });
document.addEventListener("keydown", e => {
  const step = { ArrowLeft: [-1, 0], ArrowRight: [1, 0],
                 ArrowUp: [0, -1], ArrowDown: [0, 1] }[e.key];
  if (step) {
    state.yi = clamp(state.yi + step[0], 0, YAWS.length - 1);
    state.pi = clamp(state.pi + step[1], 0, PITCHES.length - 1);
    e.preventDefault();
  } else if (e.key === "d") state.depth = !state.depth;
  else if (e.key === "n") state.scene = (state.scene + 1) % NAMES.length;
  else if (e.key === "p") state.scene = (state.scene + NAMES.length - 1) % NAMES.length;
  else return;
  draw(true);
});
pick.addEventListener("change", () => { state.scene = parseInt(pick.value); draw(true); });
box.addEventListener("change", () => { state.depth = box.checked; draw(true); });
window.addEventListener("hashchange", () => { fromHash(); draw(false); });
window.addEventListener("load", () => { fromHash(); draw(false); });
</script>
</body></html>
"""


def write_viewer(ae_model, scenes, path, title="samples", res=None):
    """scenes: list of (name, planes (1, 3, C, R, R)) -> one self-contained viewer.html.
    res: the size the views are rendered at (default the model's, at most 128 px, which keeps
    the file to a few MB)."""
    res = res or min(ae_model.config["res"], 128)
    images = []
    for k, (name, planes) in enumerate(tqdm(scenes, desc="viewer", leave=False)):
        rgb, depth = viewer_sprites(ae_model, planes, res=res)
        images += [f'<img id="rgb{k}" alt="" src="{png_data_uri(rgb)}">',
                   f'<img id="depth{k}" alt="" src="{png_data_uri(depth)}">']
    fmt = lambda t: json.dumps([round(float(v), 2) for v in t])
    html = VIEWER_HTML
    for key, value in dict(TITLE=html_escape(title), RES=str(res), IMAGES="\n".join(images),
                           YAWS=fmt(VIEWER_YAWS), PITCHES=fmt(VIEWER_PITCHES),
                           # (a file name must not be able to close the <script> tag)
                           NAMES=json.dumps([name for name, _ in scenes]).replace("</", "<\\/"),
                           NY=str(len(VIEWER_YAWS)), NP=str(len(VIEWER_PITCHES)),
                           YMIN=f"{VIEWER_YAWS.min():g}", YMAX=f"{VIEWER_YAWS.max():+g}",
                           PMIN=f"{VIEWER_PITCHES.min():g}",
                           PMAX=f"{VIEWER_PITCHES.max():+g}").items():
        html = html.replace(f"__{key}__", value)
    with data_mod.writing(path, "the viewer page", size=len(html)) as tmp:
        with open(tmp, "w") as f:
            f.write(html)
    return path


# ---------------------------------------------------------------------------------------------
# 4. Modes
# ---------------------------------------------------------------------------------------------
def sample_latents(ldm, n, args, device):
    """n new latents with --sampler; labels from --class, else (conditional models) cycling."""
    labels = None
    if ldm.num_classes:
        labels = (torch.full((n,), parse_class(args.cls, ldm)) if args.cls is not None
                  else torch.arange(n) % ldm.num_classes).to(device)
    elif args.cls is not None:
        parse_class(args.cls, ldm)                                      # raises the clear error
    g = torch.Generator(device=device).manual_seed(args.seed)
    z = diffusion.ddim_sample(ldm, (n, *ldm.config["latent_shape"]), args.steps, args.eta,
                              labels, args.cfg, generator=g, progress=True, sampler=args.sampler)
    return z, labels


@torch.no_grad()
def generate(ae_model, ldm, args, device):
    """--n samples: grid.png (P0 views), multiview.png (rows: samples; columns: yaw -yaw..+yaw,
    then depth), turntable_NNN.gif each; optionally PLYs and metrics."""
    z, labels = sample_latents(ldm, args.n, args, device)
    planes = ae_model.decode(z)                                          # (n, 3, C, R, R)
    radius = ae_model.config["radius"]
    written = []
    p0 = render_frames(ae_model, planes, ae_model.P0(args.n))[0]         # (n, 3, H, W)
    written.append(save_grid(p0, os.path.join(args.out, "grid.png"),
                             math.ceil(math.sqrt(args.n))))
    yaws = torch.linspace(-args.yaw, args.yaw, 5)
    rows = []                                  # per sample: 5 views, then their 5 depth maps
    for i in tqdm(range(args.n), desc="rendering", leave=False):
        images, depths, opacities = render_frames(
            ae_model, planes[i:i + 1], render.orbit_camera(yaws, torch.zeros(5), radius))
        cmap = depth_colours(depths, opacities, images.shape[-1])        # (5, 3, H, W)
        rows.append(torch.cat([*images, *cmap], -1))                     # (3, H, 10W)
    written.append(save_grid(torch.stack(rows), os.path.join(args.out, "multiview.png"), 1))
    gifs = [turntable(ae_model, planes[i:i + 1], os.path.join(args.out, f"turntable_{i:03d}.gif"),
                      args) for i in tqdm(range(args.n), desc="turntables", leave=False)]
    if labels is not None:
        names = ldm.config["classes"]
        print("class of each sample: " + ", ".join(f"{i}: {names[int(y)]}"
                                                   for i, y in enumerate(labels)))
    if args.export_ply:
        written += [export_ply(ae_model, planes[i:i + 1], os.path.join(args.out,
                                                                       f"points_{i:03d}.ply"))
                    for i in range(args.n)]
    if args.export_mesh:
        written += [export_mesh(ae_model, planes[i:i + 1], os.path.join(
            args.out, f"mesh_{i:03d}.ply"), args.mesh_res)[0] for i in range(args.n)]
    if args.viewer:
        written.append(write_viewer(ae_model, [(f"sample {i}", planes[i:i + 1])
                                               for i in range(args.n)],
                                    os.path.join(args.out, "viewer.html")))
    print("wrote " + ", ".join(written) + f", {len(gifs)} turntables {args.out}/turntable_*.gif")
    scores = metrics(ae_model, planes, args) if args.metrics else None
    return dict(z=z, planes=planes, gifs=gifs, files=written, metrics=scores)


@torch.no_grad()
def novel_views(ae_model, args, device):
    """--image: encode one photo and show it from other viewpoints (no diffusion involved)."""
    image, depth = load_photo(args.image, ae_model, device)
    planes = ae_model.decode(ae_model.encode(image, depth))
    stem = os.path.splitext(os.path.basename(args.image))[0]
    gif = turntable(ae_model, planes, os.path.join(args.out, f"{stem}_turntable.gif"), args)
    png = os.path.join(args.out, f"{stem}_views.png")
    ae.view_grid(ae_model, planes, args.yaw, png, first=[image])
    pipeline_figure(ae_model, image, os.path.join(args.out, f"{stem}_pipeline.png"))
    if args.export_ply:
        print("wrote " + export_ply(ae_model, planes, os.path.join(args.out, f"{stem}.ply")))
    if args.export_mesh:
        path, verts, faces = export_mesh(ae_model, planes, os.path.join(
            args.out, f"{stem}_mesh.ply"), args.mesh_res)
        print(f"wrote {path} ({len(verts)} vertices, {len(faces)} triangles; a picture of it: "
              f"{os.path.splitext(path)[0]}.png)")
    if args.viewer:
        print("wrote " + write_viewer(ae_model, [(f"photo {stem}", planes)],
                                      os.path.join(args.out, f"{stem}_viewer.html"),
                                      title=f"novel views of {stem}"))
    print(f"wrote {gif} and {png} (input | P0 | depth | yaw -{args.yaw:g}, 0, +{args.yaw:g} | "
          f"depths)")
    return dict(gif=gif, png=png, image=image, planes=planes)


@torch.no_grad()
def interpolate(ae_model, ldm, args, device):
    """3D-aware interpolation: both ends -> noise (inverse DDIM for photos, a seed's Gaussian
    noise otherwise), slerp between the two noises, back to latents with the sampler (DDIM
    for photos: the inverse of their inversion), decode; the camera moves along the turntable
    path meanwhile. One GIF."""
    shape = tuple(ldm.config["latent_shape"])
    # Why not interpolate the latents z directly? A straight line between two latents passes
    # through latents no image ever had (blurry averages of the two scenes). The DDIM noise space
    # is a plain Gaussian, where every point in between is a likely starting point, so each
    # in-between noise denoises to a plausible scene of its own.
    sampler, steps = args.sampler, args.steps
    if args.interp:              # photos: inverse DDIM, so DDIM back (each the other's inverse)
        sampler, steps = "ddim", max(steps, diffusion.SAMPLE_STEPS)
        ends = []
        for path in args.interp:
            image, depth = load_photo(path, ae_model, device)
            ends.append(diffusion.ddim_invert(ldm, ae_model.encode(image, depth), steps))
    else:
        ends = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)).to(device)
                for s in args.interp_seeds]
    w = torch.linspace(0, 1, args.frames)                     # interpolation weight per frame
    noise = torch.cat([diffusion.slerp(ends[0], ends[1], float(x)) for x in w])  # (F, C, h, w)
    # eta = 0: deterministic, so neighbouring noises give neighbouring scenes (a smooth video).
    z = torch.cat([diffusion.ddim_sample(ldm, None, steps, noise=noise[lo:lo + 16],
                                         sampler=sampler)
                   for lo in range(0, args.frames, 16)])
    cams = turntable_cameras(args.frames, args.yaw, PITCH, ae_model.config["radius"])
    frames = side_by_side(*render_frames(ae_model, ae_model.decode(z), cams))  # frame i: z i
    path = save_gif(frames, os.path.join(args.out, "interpolation.gif"), FPS)
    print(f"wrote {path} ({args.frames} frames)")
    return dict(gif=path, z=z, ends=ends)


@torch.no_grad()
def resample_photo(ae_model, ldm, args, device):
    """Generative resampling: one row per strength: input | reconstruction | variants."""
    image, depth = load_photo(args.resample, ae_model, device)
    z = ae_model.encode(image, depth)                                      # (1, C, h, w)
    strengths = args.strengths
    n = args.n or 6
    g = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    P0 = ae_model.P0(1).to(device)
    recon = ae_model.render(ae_model.decode(z), P0)["image"].clamp(-1, 1)
    for s in tqdm(strengths, desc="strengths", leave=False):
        zs = diffusion.resample(ldm, z.expand(n, -1, -1, -1), s, args.steps, args.eta,
                                generator=g, sampler=args.sampler)
        views = ae_model.render(ae_model.decode(zs), ae_model.P0(n).to(device))["image"]
        rows.append(torch.cat([image, recon, views.clamp(-1, 1)]).cpu())
    stem = os.path.splitext(os.path.basename(args.resample))[0]
    path = save_grid(torch.cat(rows), os.path.join(args.out, f"{stem}_resample.png"), n + 2)
    print(f"wrote {path} (rows: strength {', '.join(map(str, strengths))}; columns: input | "
          f"reconstruction | {n} variants)")
    return path


def plane_colours(planes):
    """Triplane features (3, C, R, R) -> three RGB pictures (3, 3, R, R) in [-1, 1]: each
    texel's C features projected on their top three principal components (shared by the
    three planes, so one colour means one feature vector on every plane)."""
    P, C, R, _ = planes.shape
    x = planes.permute(0, 2, 3, 1).reshape(-1, C)                             # (3RR, C)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x, full_matrices=False)                        # v (C, C)
    y = x @ v[:3].T                                                           # (3RR, 3)
    lo, hi = y.quantile(0.02, dim=0), y.quantile(0.98, dim=0)
    y = ((y - lo) / (hi - lo).clamp_min(1e-6)).clamp(0, 1) * 2 - 1
    return y.view(P, R, R, 3).permute(0, 3, 1, 2)                             # (3, 3, R, R)


def latent_tiles(z):
    """A latent (C, h, w) -> one grey picture (3, rows * h, cols * w) in [-1, 1]: its channels
    in a square-ish grid, row by row, each stretched to its own range (empty cells black)."""
    C, h, w = z.shape
    cols = math.ceil(math.sqrt(C))
    lo = z.flatten(1).amin(1)[:, None, None]
    hi = z.flatten(1).amax(1)[:, None, None]
    z = (z - lo) / (hi - lo).clamp_min(1e-6) * 2 - 1
    z = torch.cat([z, -z.new_ones((-C) % cols, h, w)])                      # (rows * cols, h, w)
    tiles = z.view(-1, cols, h, w).permute(0, 2, 1, 3).reshape(-1, cols * w)  # (rows h, cols w)
    return tiles.expand(3, -1, -1)


@torch.no_grad()
def pipeline_figure(ae_model, image, path, ldm=None, seed=0):
    """The method in one picture, drawn from the model's own tensors. Row 1 (stage 1): a photo
    -> its latent z (channels) -> the triplane decoded from z (planes xy, xz, yz) -> renders
    and depth from P0 and from views turned by -20 and +20 degrees. Row 2 (stage 2, with a
    diffusion model): Gaussian noise z_T -> DDIM -> a new z_0 -> its triplane and renders."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    device = image.device
    cams = render.orbit_camera(torch.tensor([0.0, -20.0, 20.0]), torch.zeros(3),
                               ae_model.config["radius"])

    def row(z):                                       # z (1, C, h, w) -> [(title, picture)]
        planes = ae_model.decode(z)                                           # (1, 3, C, R, R)
        images, depths, opacities = render_frames(ae_model, planes, cams)     # (3, 3, H, W)
        depth = depth_colours(depths[:1], opacities[:1], images.shape[-1])[0]
        return ([(f"plane {n}", p) for n, p in zip(("xy", "xz", "yz"),
                                                     plane_colours(planes[0].cpu()))]
                + [("render P0", images[0]), ("depth P0", depth),
                   ("yaw -20", images[1]), ("yaw +20", images[2])])
    z = ae_model.encode(image)                                               # (1, C, h, w)
    rows = [[("photo", image[0].cpu()), (f"z {tuple(z.shape[1:])}", latent_tiles(z[0].cpu()))]
            + row(z)]
    if ldm is not None:
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, *ldm.config["latent_shape"]), generator=g).to(device)
        z0 = diffusion.ddim_sample(ldm, None, 50, noise=noise)
        rows.append([("noise z_T", latent_tiles(ldm.denormalize(noise)[0].cpu())),
                     ("DDIM -> z_0", latent_tiles(z0[0].cpu()))] + row(z0))
    fig, axes = plt.subplots(len(rows), 9, figsize=(18, 2.3 * len(rows)), squeeze=False)
    for r, items in enumerate(rows):
        for ax, (title, pic) in zip(axes[r], items):
            ax.imshow(((pic.clamp(-1, 1) + 1) / 2).permute(1, 2, 0).numpy(),
                      interpolation="nearest")
            ax.set_title(title, fontsize=10)
            ax.axis("off")
    axes[0][0].text(-0.15, 0.5, "stage 1: encode,\ndecode, render", rotation=90,
                    transform=axes[0][0].transAxes, ha="right", va="center", fontsize=10)
    if ldm is not None:
        axes[1][0].text(-0.15, 0.5, "stage 2: sample z,\ndecode, render", rotation=90,
                        transform=axes[1][0].transAxes, ha="right", va="center", fontsize=10)
    fig.tight_layout()
    with data_mod.writing(path, "a picture") as tmp:
        fig.savefig(tmp, dpi=80)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# 5. Geometry: a coloured point cloud from rendered depth, a mesh from the density
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def point_cloud(ae_model, planes, yaws=(-20.0, 0.0, 20.0), min_opacity=0.5):
    """Unproject the rendered depth of a few views into world points (view space: the
    pivot is the origin, P0 sits at (0, 0, -radius)).

    A pixel's ray has unit direction d; z-depth D is the distance along the optical axis f, so
    the point is o + d * D / (d . f). Only pixels whose ray is mostly absorbed (opacity above
    min_opacity) and closer than twice the camera distance (the far field is contracted and its
    depths are not metric) are kept. Returns points (P, 3), colours uint8 (P, 3).
    """
    c = ae_model.config
    cams = render.orbit_camera(torch.tensor(yaws), torch.zeros(len(yaws)), c["radius"])
    out = ae_model.render(planes.expand(len(yaws), -1, -1, -1, -1), cams.to(planes.device))
    low = out["depth"].shape[-1]
    colour = F.interpolate(out["image"].clamp(-1, 1), size=low, mode="area")  # (V, 3, h, w)
    origins, dirs = render.get_rays(cams.to(planes.device), c["fov_deg"], low)  # (V, hw, 3)
    forward = cams[:, None, :3, 2].to(planes.device)                           # (V, 1, 3)
    depth = out["depth"].flatten(1)                                            # (V, hw)
    pts = origins + dirs * (depth / (dirs * forward).sum(-1))[..., None]       # (V, hw, 3)
    keep = (out["opacity"].flatten(1) > min_opacity) & (depth < 2 * c["radius"])
    rgb = to_uint8(colour).reshape(len(yaws), -1, 3)
    return pts[keep].cpu().numpy(), rgb[keep.cpu().numpy()]


def write_ply(path, points, colours, faces=None):
    """ASCII PLY with x y z red green blue per vertex, and triangles (vertex indices) when
    `faces` (T, 3) is given: MeshLab, Blender and Open3D read it."""
    with data_mod.writing(path, "a mesh" if faces is not None else "a point cloud") as tmp, \
            open(tmp, "w") as f:
        f.write("ply\nformat ascii 1.0\n")
        f.write(f"element vertex {len(points)}\n")
        f.write("property float x\nproperty float y\nproperty float z\n")
        f.write("property uchar red\nproperty uchar green\nproperty uchar blue\n")
        if faces is not None:
            f.write(f"element face {len(faces)}\nproperty list uchar int vertex_indices\n")
        f.write("end_header\n")
        for (x, y, z), (r, g, b) in zip(points, colours):
            f.write(f"{x:.5f} {y:.5f} {z:.5f} {r} {g} {b}\n")
        for a, b, c in faces if faces is not None else ():
            f.write(f"3 {a} {b} {c}\n")
    return path


def export_ply(ae_model, planes, path):
    return write_ply(path, *point_cloud(ae_model, planes))


# A triangle mesh from the density field: the level set sigma = MESH_LEVEL, found by marching
# cubes (Lorensen & Cline 1987) over the un-contracted cube [-1, 1]^3 around the pivot, where
# the scene's objects are. The level is the density that absorbs half of the light within
# 1/32 of the cube's width (ln 2 / (2 / 32)): a ray entering a thicker region that dense ends
# there, so the level set is where the renders put surfaces, whatever the grid size.
MESH_LEVEL = math.log(2) * 16


@torch.no_grad()
def density_grid(ae_model, planes, n=64):
    """Density (n, n, n) (axes x, y, z) on an n^3 grid over [-1, 1]^3, read from the
    triplanes (1, 3, C, R, R) the way the renderer reads them."""
    xs = torch.linspace(-1, 1, n, device=planes.device)
    pts = torch.stack(torch.meshgrid(xs, xs, xs, indexing="ij"), -1).view(1, -1, 3)
    sigma = torch.cat([query_field(ae_model, planes, p)[0] for p in pts.split(65536, 1)], 1)
    return sigma.view(n, n, n).cpu().numpy()


def query_field(ae_model, planes, points):
    """Points (1, M, 3) in world units -> density (1, M), raw RGB in [-1, 1] (1, M, 3)."""
    feats = render.sample_triplane(planes, render.contract(points) / 2)     # (1, M, C)
    sigma, out = ae_model.field(feats)
    return sigma[..., 0], out[..., :3].clamp(-1, 1)


def marching_cubes(volume, level, lo=-1.0, hi=1.0):
    """Vertices (V, 3) in world units and triangles (T, 3) of the level set of a density grid
    (n, n, n) sampled on [lo, hi]^3 (scikit-image's marching cubes, imported only here)."""
    try:
        from skimage import measure
    except ImportError:
        raise UserError("--export-mesh needs scikit-image for marching cubes: "
                        "pip install scikit-image")
    if not volume.min() < level < volume.max():
        raise UserError(f"the density never crosses the level {level:.3g} inside the cube "
                        f"(its range is {volume.min():.3g} to {volume.max():.3g}): no surface")
    step = (hi - lo) / (volume.shape[0] - 1)
    verts, faces, _, _ = measure.marching_cubes(volume, level, spacing=(step,) * 3)
    return verts + lo, faces


@torch.no_grad()
def export_mesh(ae_model, planes, path, n=64, level=MESH_LEVEL):
    """A coloured triangle mesh of one scene (planes (1, 3, C, R, R)) -> PLY, plus a picture
    of it (PATH with .png). Returns (path, vertices, faces)."""
    verts, faces = marching_cubes(density_grid(ae_model, planes, n), level)
    pts = torch.from_numpy(verts).float().to(planes.device)[None]          # (1, V, 3)
    colour = query_field(ae_model, planes, pts)[1][0]                      # (V, 3)
    rgb = to_uint8(colour.T.unsqueeze(-1))[:, 0]           # as a (3, V, 1) image -> (V, 3)
    write_ply(path, verts, rgb, faces)
    mesh_picture(verts, faces, rgb, os.path.splitext(path)[0] + ".png")
    return path, verts, faces


def mesh_picture(verts, faces, rgb, path):
    """The mesh from P0 and from 40 degrees to its left and above: triangles in their
    vertices' mean colour, shaded by a light at the viewer, drawn back to front by matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Poly3DCollection
    # World y points down (image rows) and P0 sits on -z; matplotlib's z points up and
    # azim=-90 looks from -y: plot (x, z, -y), and that view is P0's, right side up.
    tri = np.stack([verts[:, 0], verts[:, 2], -verts[:, 1]], 1)[faces]       # (T, 3, 3)
    normal = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normal /= np.linalg.norm(normal, axis=1, keepdims=True) + 1e-12
    fig = plt.figure(figsize=(9, 4.5))
    for k, (elev, azim, title) in enumerate(((0, -90, "from P0"),
                                             (30, -130, "from the left, above"))):
        ax = fig.add_subplot(1, 2, k + 1, projection="3d")
        e, a = np.radians(elev), np.radians(azim)
        eye = np.array([np.cos(e) * np.cos(a), np.cos(e) * np.sin(a), np.sin(e)])
        # Lambert shading, the light at the viewer, either side of a triangle alike.
        shade = 0.35 + 0.65 * np.abs(normal @ eye)
        colours = np.clip(rgb[faces].mean(1) / 255 * shade[:, None], 0, 1)
        ax.add_collection3d(Poly3DCollection(tri, facecolors=colours, edgecolors=colours,
                                             linewidths=0.3))
        ax.set(xlim=(-1, 1), ylim=(-1, 1), zlim=(-1, 1), title=title)
        ax.view_init(elev=elev, azim=azim)
        ax.set_axis_off()
    fig.tight_layout()
    with data_mod.writing(path, "a picture") as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------------------------
# 6. Metrics
# ---------------------------------------------------------------------------------------------
def nfs(depth, near, far, bins=64):
    """Non-flatness score (3DGP, Skorokhodov et al. 2023): per depth map, the entropy H of a
    `bins`-bin histogram of its values within [near, far]; NFS = mean of exp(H). A flat
    billboard puts every pixel in one bin (NFS 1); depth spread evenly over the range gives
    `bins`. depth (B, 1, H, W) -> float."""
    d = depth.flatten(1).clamp(near, far)
    idx = ((d - near) / (far - near) * bins).long().clamp(0, bins - 1)         # (B, HW)
    hist = F.one_hot(idx, bins).sum(1).float()                                 # (B, bins)
    p = hist / hist.sum(1, keepdim=True)
    H = -(p * p.clamp_min(1e-12).log()).sum(1)                                 # nats
    return H.exp().mean().item()


@torch.no_grad()
def metrics(ae_model, planes, args):
    """NFS of the samples' frontal depth (and of the data's own depth maps, for reference); FID /
    KID of their novel views when torch-fidelity is installed (against --real, default the
    autoencoder's training folder). Prints them and returns them as a dict."""
    c = ae_model.config
    near = render.default_bounds(c["radius"])[0]
    far = 2 * c["radius"]
    depth = render_frames(ae_model, planes, ae_model.P0(len(planes)))[1]   # (n, 1, h, w)
    result = dict(nfs=nfs(depth, near, far), n=len(planes))
    print(f"NFS (64 bins, depth in [{near:.2f}, {far:.2f}]): {result['nfs']:.2f}  over "
          f"{len(planes)} samples")
    real = args.real or getattr(ae_model, "trained_on", None)
    if real and os.path.isdir(os.path.join(real, "depth")):
        # The same score on the data's own depth maps, at the rendered depth's resolution:
        # what a model that got the geometry exactly right would score.
        ds = data_mod.ImageFolder(real, depth.shape[-1], depth=True, verbose=False)
        ref = torch.stack([ds[i]["depth"] for i in range(min(len(ds), len(planes)))])
        result["nfs_data"] = nfs(ref, near, far)
        print(f"NFS of the data's depth maps ({real}, {len(ref)} images): "
              f"{result['nfs_data']:.2f}")
    try:
        import torch_fidelity
    except ImportError:
        print("FID/KID: skipped; `pip install torch-fidelity` to score rendered novel views "
              "against real images (--real, default the autoencoder's training folder)")
        return result
    if not real or not os.path.isdir(real):
        raise UserError(f"--metrics with torch-fidelity needs real images to compare with: the "
                        f"autoencoder's training folder ({real}) is gone; pass --real IMAGES_DIR")
    fake_dir = os.path.join(args.out, "fid_views")
    os.makedirs(fake_dir, exist_ok=True)
    torch.manual_seed(args.seed)                          # one random novel view per sample
    views = render_frames(ae_model, planes, ae.random_cameras(len(planes), args.yaw, PITCH,
                                                              c["radius"]))[0]
    for i, im in enumerate(views):
        ae.save_image(im, os.path.join(fake_dir, f"{i:05d}.png"))
    r = torch_fidelity.calculate_metrics(input1=fake_dir, input2=real, fid=True, kid=True,
                                         kid_subset_size=min(1000, len(planes)), verbose=False)
    result.update(fid=r["frechet_inception_distance"], kid=r["kernel_inception_distance_mean"])
    print(f"FID {result['fid']:.2f}, KID {result['kid'] * 1000:.2f} x 1e-3 ({len(planes)} "
          f"novel views vs {real})")
    return result


# ---------------------------------------------------------------------------------------------
# 7. The demo and the command line
# ---------------------------------------------------------------------------------------------
def estimate_demo(ae_args, ldm_args, args, data_root):
    """Seconds each demo stage should take on this machine, from a short timed warm-up: a few
    calls of each network on random tensors of the real shapes (nothing is written).
    -> {stage: (seconds, what it does)}."""
    device = torch.device(args.device)
    plain = torch.autocast("cpu", enabled=False)                     # float32, as the demo
    est = {}
    # 0. the synthetic scenes (rendered once; later demos reuse them)
    meta = scenes.read_scene_meta(data_root)
    if meta is None or meta["n"] < ae_args.n_scenes:
        rng, cam = np.random.default_rng(0), scenes.scene_camera(0, 0)
        per = training.seconds_per_call(lambda: scenes.render_scene(scenes.random_scene(rng), cam,
                                                           res=max(ae_args.res, 64)))
        renders = ae_args.n_scenes + 64 * (1 + len(scenes.parse_views(scenes.DEFAULT_VIEWS)))
        est["scenes"] = (per * renders, f"render {ae_args.n_scenes} + 64 held-out scenes "
                                        f"with exact depth into {data_root}")
    # 1. autoencoder steps on a random batch of the real shape
    warm = argparse.Namespace(**vars(ae_args))
    warm.fov_deg, warm.radius = scenes.SCENE_FOV, scenes.SCENE_RADIUS
    model, disc, opt, _ = ae.build(warm, device)
    B, res = warm.batch, warm.res
    image = torch.rand(B, 3, res, res, device=device) * 2 - 1
    depth = 1 + 3 * torch.rand(B, 1, res, res, device=device)
    per = training.seconds_per_call(lambda: ae.autoencoder_step(
        model, disc, opt, [(image, depth)], warm, warm.adv_weight > 0, None, plain))
    left = ae_args.steps - training.steps_done(os.path.join(ae_args.out, "ckpt.pt"))
    est["autoencoder"] = (per * left, f"train the {args.preset} autoencoder: {left} steps x "
                                      f"{per * 1e3:.0f} ms")
    # 2. diffusion steps on random latents of the autoencoder's latent shape
    shape = (warm.z_ch, warm.z_res, warm.z_res)
    ldm = diffusion.LatentDiffusion(diffusion.model_config(ldm_args, shape, [])).to(device)
    ema = diffusion.LatentDiffusion(diffusion.model_config(ldm_args, shape, [])).to(device)
    opt = diffusion.make_optimizer(ldm, ldm_args.lr)
    x0 = torch.randn(ldm_args.batch, *shape, device=device)
    per = training.seconds_per_call(lambda: diffusion.train_step(
        ldm, ema, opt, [(x0, None)], 0, ldm_args, plain))
    left = ldm_args.steps - training.steps_done(os.path.join(ldm_args.out, "ckpt.pt"))
    est["diffusion"] = (per * left, f"encode the scenes, train the {args.preset} diffusion "
                                    f"model: {left} steps x {per * 1e3:.0f} ms")
    # 3. sampling: count the UNet evaluations (batches of <= 16) and the rendered frames
    ldm.eval()
    t = torch.full((16,), 500, device=device)
    unet = training.seconds_per_call(lambda: torch.no_grad()(ldm.predict)(x0[:16], t))
    model.eval()
    with torch.no_grad():
        planes = model.decode(torch.randn(1, *shape, device=device))
    cams = ae.random_cameras(16, 20.0, 5.0, warm.radius).to(device)
    frame = training.seconds_per_call(lambda: render_frames(model, planes, cams)) / 16
    n, F_, S = args.n, args.frames, args.steps
    evals = (S * math.ceil(n / 16) + S * math.ceil(F_ / 16) +           # samples, interpolation
             sum(math.ceil(s * S) for s in args.strengths))                  # resampling
    frames = (n * (1 + 5 + F_) + (n + 1) * len(VIEWER_YAWS) * len(VIEWER_PITCHES) +  # viewer
              2 * F_ + 64 * 7)                 # interpolation, novel views, held-out evaluation
    est["sampling"] = (evals * unet + frames * frame,
                       f"sample {n} scenes ({S} {args.sampler} steps), GIFs, viewer, "
                       f"interpolation, novel views, resampling, metrics")
    return est


def demo_plan(args):
    """The demo's two training runs (their flags, as if typed), and the printed plan with a
    time per stage from a short warm-up on this machine. -> (ae_args, ldm_args, data_root,
    estimate {stage: (seconds, what)})."""
    # Both training stages run on the demo's device and thread count.
    common = ["--device", args.device] + (["--threads", str(args.threads)] if args.threads else [])
    run = os.path.join("runs", "demo" if args.preset == "tiny" else f"demo-{args.preset}")
    ae_dir, ldm_dir = os.path.join(run, "ae"), os.path.join(run, "ldm")
    ae_path, ldm_path = os.path.join(ae_dir, "ckpt.pt"), os.path.join(ldm_dir, "ckpt.pt")
    args.n = args.n or 8
    args.out = args.out or os.path.join(run, "samples")
    # Each stage resumes from its checkpoint when one exists, so a second --demo only samples.
    ae_args = ae.get_args(["--preset", args.preset, "--out", ae_dir, *common] +
                          (["--resume"] if os.path.isfile(ae_path) else []))
    ldm_args = diffusion.get_args(["--preset", args.preset, "--ae", ae_path, "--out", ldm_dir,
                                   *common] + (["--resume"] if os.path.isfile(ldm_path) else []))
    data_root = ae.default_data_root(ae_args.res)
    print("WildFusion demo: synthetic 3D scenes -> 3D-aware autoencoder -> latent diffusion -> "
          "new 3D scenes.\nTimed warm-up (a few steps of each network on random tensors)...")
    est = estimate_demo(ae_args, ldm_args, args, data_root)
    total = sum(s for s, _ in est.values())
    for k, (stage, (secs, what)) in enumerate(est.items()):
        print(f"  {k + 1}. {stage:12s} ~{secs / 60:4.1f} min  {what}")
    where = (torch.cuda.get_device_name(args.device) if args.device.startswith("cuda")
             else f"{torch.get_num_threads()} CPU threads")
    print(f"  estimated total ~{total / 60:.0f} min on {where} "
          f"(each stage shows a progress bar; Ctrl-C and run again to resume)")
    return ae_args, ldm_args, data_root, est


def demo_samples(args, data_root):
    """The demo's last stage: samples, every application once, the viewer, the pipeline
    figure and the novel-view scores. -> dict of what it wrote and measured."""
    args.metrics, args.viewer = True, False
    device = torch.device(args.device)
    ae_model, ldm = diffusion.load_models(args.ae, args.ldm, device)
    bar = tqdm(total=6, desc="sampling", unit="part")
    out = generate(ae_model, ldm, args, device)                                 # GIFs, grids
    bar.update()
    # Every application once: interpolation between two seeds, novel views and resampling
    # of a held-out photo the autoencoder never trained on.
    args.interp_seeds = [args.seed + 1, args.seed + 2]
    out["interp"] = interpolate(ae_model, ldm, args, device)["gif"]
    bar.update()
    held = os.path.join(data_root, "_heldout")
    photo = sorted(f for f in os.listdir(held) if f.endswith(".png"))[0]
    args.image = args.resample = os.path.join(held, photo)
    nv = novel_views(ae_model, args, device)
    out["novel"] = nv["gif"]
    bar.update()
    resample_photo(ae_model, ldm, args, device)
    pipeline_figure(ae_model, nv["image"], os.path.join(args.out, "pipeline.png"), ldm,
                    seed=args.seed)
    bar.update()
    # One page to turn every scene by hand: the samples, then the held-out photo.
    out["viewer"] = write_viewer(ae_model, [(f"sample {i}", out["planes"][i:i + 1])
                                            for i in range(args.n)] +
                                 [(f"held-out photo {photo}", nv["planes"])],
                                 os.path.join(args.out, "viewer.html"))
    bar.update()
    # How good are the autoencoder's novel views? Held-out scenes against their true views.
    out["eval"] = evaluate.evaluate_views(ae_model, data_root,
                                          save=os.path.join(args.out, "eval_views.png"))
    bar.update()
    bar.close()
    return out


def demo(args):
    """The whole pipeline on the synthetic scenes with the --preset's models (tiny: 32 px,
    small: 64 px): train (or reuse) the autoencoder and the diffusion model under runs/demo/
    (runs/demo-small/), then sample everything, write the viewer, and end with a summary of
    files, metrics and times."""
    ae_args, ldm_args, data_root, est = demo_plan(args)
    args.ae, args.ldm = os.path.join(ae_args.out, "ckpt.pt"), os.path.join(ldm_args.out,
                                                                           "ckpt.pt")
    took = {}
    t0 = time.time()
    if "scenes" in est:
        print(f"== scenes: rendering into {data_root} (python scenes.py) ==")
        ae.default_data(ae_args)                 # the same call autoencoder.py makes itself
        took["scenes"] = time.time() - t0
    print(f"== stage 1: the 3D-aware autoencoder (python autoencoder.py --preset {args.preset} "
          f"--out {ae_args.out}) ==")
    t0 = time.time()
    ae.train(ae_args)
    took["autoencoder"] = time.time() - t0
    print(f"== stage 2: latent diffusion (python diffusion.py --preset {args.preset} "
          f"--ae {args.ae} --out {ldm_args.out}) ==")
    t0 = time.time()
    diffusion.train(ldm_args)
    took["diffusion"] = time.time() - t0
    print(f"== sampling into {args.out} ==")
    t0 = time.time()
    out = demo_samples(args, data_root)
    took["sampling"] = time.time() - t0

    # The summary: where everything is, what was measured, how long it took.
    m, scores = out["metrics"], out["eval"]
    print("\n== done ==")
    print(f"open in a browser:  {out['viewer']}   (drag to turn the scenes)")
    print("GIFs (RGB | depth): " + "\n                    ".join(
        out["gifs"][:3] + ["... " + os.path.join(args.out, "turntable_*.gif"), out["interp"],
                           out["novel"]]))
    print(f"pictures:           {os.path.join(args.out, '*.png')} (pipeline, grid, multiview, "
          f"resampling, eval_views)")
    print(f"checkpoints:        {args.ae}  {args.ldm}")
    print(f"novel views of 64 held-out scenes at yaw +-20 (PSNR, dB): model "
          f"{scores['psnr_model_yaw20']:.2f}, copy the input {scores['psnr_copy_yaw20']:.2f}, "
          f"warp by true depth {scores['psnr_warp_yaw20']:.2f}; depth Pearson "
          f"{scores['depth_pearson']:.3f}")
    print(f"samples' geometry: NFS {m['nfs']:.2f} over {m['n']} samples (the data's own depth: "
          f"{m.get('nfs_data', float('nan')):.2f}; a flat billboard scores 1)")
    print("time per stage (estimate -> actual): " + ", ".join(
        f"{k} {est[k][0] / 60:.1f} -> {v / 60:.1f} min" for k, v in took.items()))
    return dict(took=took, estimate={k: v[0] for k, v in est.items()}, eval=scores, metrics=m,
                viewer=out["viewer"])


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample 3D scenes from a trained WildFusion and run "
                                "its applications.",
                                formatter_class=training.Help)
    a = p.add_argument
    a("--demo", action="store_true", help="train --preset's models on synthetic scenes, then "
      "sample")
    a("--preset", default="tiny", choices=["tiny", "small"], help="--demo's models: tiny (32 "
      "px) or small (64 px)")
    a("--ae", help="autoencoder checkpoint (stage 1)")
    a("--ldm", help="diffusion checkpoint (stage 2)")
    a("--out", default=None, help="output folder (default samples/)")
    a("--n", type=int, default=None, help="samples (default 16; resampling: 6 variants)")
    a("--sampler", default="dpm++", choices=diffusion.SAMPLERS, help="dpm++: DPM-Solver++(2M), "
      "second order; ddim: first order, the only one with --eta > 0")
    a("--steps", type=int, default=None, help=f"sampler steps (default: {STEPS['dpm++']} for "
      f"dpm++, {STEPS['ddim']} for ddim)")
    a("--eta", type=float, default=0.0, help="DDIM eta: 0 deterministic, 1 DDPM-like")
    a("--seed", type=int, default=0)
    a("--class", dest="cls", default=None, help="class name or index (conditional models)")
    a("--cfg", type=float, default=1.0, help="classifier-free guidance scale (1: off)")
    a("--image", help="novel views of this photo (autoencoder only)")
    a("--interp", nargs=2, metavar="PHOTO", help="interpolate between two photos")
    a("--interp-seeds", nargs=2, type=int, metavar="SEED", help="... or two seeds")
    a("--resample", metavar="PHOTO", help="generative resampling of this photo")
    a("--strength", default="0.25,0.5,0.75", help="resampling strength(s) in [0, 1], comma list")
    a("--export-ply", action="store_true", help="write a coloured point cloud per sample")
    a("--export-mesh", action="store_true", help="write a coloured triangle mesh (PLY, and a "
      "PNG of it) per sample, by marching cubes (pip install scikit-image)")
    a("--mesh-res", type=int, default=64, help="marching-cubes grid points per axis")
    a("--metrics", action="store_true", help="print NFS (and FID/KID with torch-fidelity)")
    a("--viewer", action="store_true", help="also write viewer.html: every scene on a yaw x "
      "pitch grid, to turn by hand in a browser (offline; on by default in --demo)")
    a("--real", help="real image folder for FID/KID (default: the autoencoder's training "
      "folder)")
    a("--frames", type=int, default=60, help="frames per GIF")
    a("--yaw", type=float, default=25.0, help="turntable yaw amplitude, degrees")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise UserError("--n must be at least 1")
    args.steps = STEPS[args.sampler] if args.steps is None else args.steps
    if args.frames < 2 or args.steps < 1 or args.mesh_res < 8:
        raise UserError("--frames must be at least 2, --steps at least 1, --mesh-res at least 8")
    if args.eta != 0 and args.sampler != "ddim":
        raise UserError(f"--eta {args.eta} needs --sampler ddim (dpm++ solves the deterministic "
                        f"ODE, eta 0)")
    try:
        args.strengths = [float(s) for s in str(args.strength).split(",")]
        assert all(0 <= s <= 1 for s in args.strengths)
    except (ValueError, AssertionError):
        raise UserError(f"--strength {args.strength!r}: expected numbers in [0, 1], e.g. 0.3,0.6")
    return args


def main(argv=None):
    args = get_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.demo:
        return demo(args)
    device = torch.device(args.device)
    args.out = args.out or "samples"
    needs_ldm = args.interp or args.interp_seeds or args.resample or not args.image
    if needs_ldm and not args.ldm:
        raise UserError("--ldm is required for sampling, --interp and --resample (only --image "
                        "works with the autoencoder alone)")
    ae_model, ldm = diffusion.load_models(args.ae, args.ldm if needs_ldm else None, device)
    if args.image:
        return novel_views(ae_model, args, device)
    if args.interp or args.interp_seeds:
        return interpolate(ae_model, ldm, args, device)
    if args.resample:
        return resample_photo(ae_model, ldm, args, device)
    args.n = args.n or 16
    return generate(ae_model, ldm, args, device)


if __name__ == "__main__":
    data_mod.run_cli(main)
