"""
sample.py -- generate 3D scenes with a trained WildFusion, look at them, and run the paper's
applications (Sec. 4): novel views of a photo, 3D-aware interpolation, generative resampling,
geometry export, and the metrics.

    python sample.py --demo                                        # everything, tiny, CPU ~15 min
    python sample.py --ae runs/ae/ckpt.pt --ldm runs/ldm/ckpt.pt --n 16 --out samples/
    python sample.py --ae A --ldm L --class dog --cfg 3             # class-conditional + guidance
    python sample.py --ae A --image photo.jpg                      # novel views of one photo
    python sample.py --ae A --ldm L --interp a.jpg b.jpg           # or --interp-seeds 1 2
    python sample.py --ae A --ldm L --resample photo.jpg --strength 0.3,0.6
    python sample.py --ae A --ldm L --export-ply --metrics         # point clouds, NFS (+ FID/KID)

Every mode writes files a person opens (PNG grids, GIF turntables, PLY point clouds) and prints
where it wrote them.

Map of the file:
    1. loading             the two checkpoints, and that they belong together; a photo
    2. cameras and frames  turntable cameras, rendering frames in chunks, PNG / GIF writers
    3. modes               generate, novel views of a photo, interpolation, resampling
    4. geometry            coloured point clouds from rendered depth, written as PLY
    5. metrics             NFS (non-flatness score), FID / KID through torch-fidelity
    6. the demo            autoencoder -> diffusion -> samples on the synthetic scenes
"""
import argparse
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import autoencoder as ae
import data as data_mod
import diffusion
import render
from data import UserError


# ---------------------------------------------------------------------------------------------
# 1. Loading
# ---------------------------------------------------------------------------------------------
def load_models(ae_path, ldm_path, device):
    """The autoencoder and (optionally) the diffusion model, refusing a pair that does not belong
    together: the diffusion model learned the latents of one autoencoder, and any other decodes
    its samples into noise."""
    if not ae_path:
        raise UserError("--ae is required: the autoencoder checkpoint (runs/ae/ckpt.pt)")
    ae_model = ae.load(ae_path, device)
    if not ldm_path:
        return ae_model, None
    ldm = diffusion.load(ldm_path, device)
    if ldm.config.get("ae_id") != diffusion.file_id(ae_path):
        raise UserError(f"{ldm_path} was trained on the latents of another autoencoder "
                        f"({ldm.config.get('ae_path')}), not {ae_path}; pass that one as --ae")
    return ae_model, ldm


def load_photo(path, ae_model, device):
    """A photo (and its depth map, if ROOT/depth/STEM.npy or .png exists next to it) ->
    image (1, 3, res, res) in [-1, 1], depth (1, 1, res, res) or None."""
    res = ae_model.config["res"]
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such image file")
    try:
        rgb, _ = data_mod.load_rgb(path, res)
        with Image.open(path) as im:
            size = im.size
    except UserError:
        raise
    except Exception as e:
        raise UserError(f"{path}: cannot read this image ({type(e).__name__}: {e})")
    image = torch.from_numpy(rgb).permute(2, 0, 1)[None].float().to(device) / 127.5 - 1
    folder, name = os.path.split(os.path.abspath(path))
    dpath = data_mod.depth_path_for(folder, name)
    depth = None
    if dpath:
        depth = torch.from_numpy(data_mod.load_depth(dpath, res, size))[None, None].to(device)
    if ae_model.config["depth_input"] and depth is None:
        raise UserError(f"{path}: this autoencoder needs the image's depth map; make it with "
                        f"`python data.py depth {folder}` (it writes {folder}/depth/)")
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


@torch.no_grad()
def render_frames(ae_model, planes, cams, chunk=16):
    """Render scene i from camera i: planes (N, 3, C, R, R), or (1, ...) for one scene seen from
    every camera; cams (N, 4, 4). -> image (N, 3, H, W) in [-1, 1], depth (N, 1, h, w), on the
    CPU. `chunk` views at a time, so memory stays flat however many frames a video has."""
    images, depths = [], []
    planes = planes.expand(len(cams), -1, -1, -1, -1)        # a view, not a copy, when N = 1
    for lo in range(0, len(cams), chunk):
        out = ae_model.render(planes[lo:lo + chunk], cams[lo:lo + chunk].to(planes.device))
        images.append(out["image"].clamp(-1, 1).cpu())
        depths.append(out["depth"].cpu())
    return torch.cat(images), torch.cat(depths)


def side_by_side(images, depths):
    """RGB | colour-mapped depth, one frame each: (F, 3, H, 2W) in [-1, 1]. The depth colours
    use one range for the whole sequence, so a change of colour is a change of depth."""
    disp = 1.0 / depths.clamp_min(1e-3)
    cmap = ae.colorize_depth(depths, disp.quantile(0.02), disp.quantile(0.98))
    return torch.cat([images, F.interpolate(cmap, size=images.shape[-1], mode="nearest")], -1)


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
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    imgs[0].save(path, save_all=True, append_images=imgs[1:], duration=round(1000 / fps), loop=0)
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
    cams = turntable_cameras(args.frames, args.yaw, args.pitch, ae_model.config["radius"])
    images, depths = render_frames(ae_model, planes, cams)
    frames = side_by_side(images, depths)
    # and a PNG strip of 6 evenly spaced frames, for pages that cannot show a GIF
    save_grid(frames[::math.ceil(len(frames) / 6)], path[:-4] + "_strip.png", 6)
    return save_gif(frames, path, args.fps)


# ---------------------------------------------------------------------------------------------
# 3. Modes
# ---------------------------------------------------------------------------------------------
def sample_latents(ldm, n, args, device):
    """n new latents with DDIM; labels from --class, else (conditional models) cycling."""
    labels = None
    if ldm.num_classes:
        labels = (torch.full((n,), parse_class(args.cls, ldm)) if args.cls is not None
                  else torch.arange(n) % ldm.num_classes).to(device)
    elif args.cls is not None:
        parse_class(args.cls, ldm)                                      # raises the clear error
    g = torch.Generator(device=device).manual_seed(args.seed)
    z = diffusion.ddim_sample(ldm, (n, *ldm.config["latent_shape"]), args.steps, args.eta,
                              labels, args.cfg, generator=g, progress=True)
    return z, labels


@torch.no_grad()
def generate(ae_model, ldm, args, device):
    """--n samples: grid.png (P0 views), multiview.png (rows: samples; columns: yaw -yaw..+yaw,
    then depth), turntable_NNN.gif each; optionally PLYs and metrics."""
    z, labels = sample_latents(ldm, args.n, args, device)
    planes = ae_model.decode(z)                                          # (n, 3, C, R, R)
    radius = ae_model.config["radius"]
    written = []
    p0, _ = render_frames(ae_model, planes, ae_model.P0(args.n))         # (n, 3, H, W)
    written.append(save_grid(p0, os.path.join(args.out, "grid.png"),
                             math.ceil(math.sqrt(args.n))))
    yaws = torch.linspace(-args.yaw, args.yaw, 5)
    rows = []                                  # per sample: 5 views, then their 5 depth maps
    for i in tqdm(range(args.n), desc="rendering", leave=False):
        images, depths = render_frames(ae_model, planes[i:i + 1],
                                       render.orbit_camera(yaws, torch.zeros(5), radius))
        both = side_by_side(images, depths)                              # (5, 3, H, 2W)
        W = images.shape[-1]
        rows.append(torch.cat([*both[..., :W], *both[..., W:]], -1))     # (3, H, 10W)
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
    print("wrote " + ", ".join(written) + f", {len(gifs)} turntables {args.out}/turntable_*.gif")
    if args.metrics:
        metrics(ae_model, planes, args)
    return dict(z=z, gifs=gifs, files=written)


@torch.no_grad()
def novel_views(ae_model, args, device):
    """--image: encode one photo and show it from other viewpoints (no diffusion involved)."""
    image, depth = load_photo(args.image, ae_model, device)
    planes = ae_model.decode(ae_model.encode(image, depth))
    stem = os.path.splitext(os.path.basename(args.image))[0]
    gif = turntable(ae_model, planes, os.path.join(args.out, f"{stem}_turntable.gif"), args)
    png = os.path.join(args.out, f"{stem}_views.png")
    ae.view_grid(ae_model, planes, args.yaw, png, first=[image])
    if args.export_ply:
        print("wrote " + export_ply(ae_model, planes, os.path.join(args.out, f"{stem}.ply")))
    print(f"wrote {gif} and {png} (input | P0 | depth | yaw -{args.yaw:g}, 0, +{args.yaw:g} | "
          f"depths)")
    return gif


@torch.no_grad()
def interpolate(ae_model, ldm, args, device):
    """3D-aware interpolation: both ends -> noise (inverse DDIM for photos, a seed's Gaussian
    noise otherwise), slerp between the two noises, DDIM back to latents, decode; the camera
    moves along the turntable path meanwhile. One GIF."""
    shape = tuple(ldm.config["latent_shape"])
    # Why not interpolate the latents z directly? A straight line between two latents passes
    # through latents no image ever had (blurry averages of the two scenes). The DDIM noise space
    # is a plain Gaussian, where every point in between is a likely starting point, so each
    # in-between noise denoises to a plausible scene of its own.
    if args.interp:
        ends = []
        for path in args.interp:
            image, depth = load_photo(path, ae_model, device)
            ends.append(diffusion.ddim_invert(ldm, ae_model.encode(image, depth), args.steps))
    else:
        ends = [torch.randn((1, *shape), generator=torch.Generator().manual_seed(s)).to(device)
                for s in args.interp_seeds]
    w = torch.linspace(0, 1, args.frames)                     # interpolation weight per frame
    noise = torch.cat([diffusion.slerp(ends[0], ends[1], float(x)) for x in w])  # (F, C, h, w)
    # eta = 0: deterministic, so neighbouring noises give neighbouring scenes (a smooth video).
    z = torch.cat([diffusion.ddim_sample(ldm, None, args.steps, noise=noise[lo:lo + 16])
                   for lo in range(0, args.frames, 16)])
    cams = turntable_cameras(args.frames, args.yaw, args.pitch, ae_model.config["radius"])
    images, depths = render_frames(ae_model, ae_model.decode(z), cams)    # frame i: latent i
    path = save_gif(side_by_side(images, depths), os.path.join(args.out, "interpolation.gif"),
                    args.fps)
    print(f"wrote {path} ({args.frames} frames)")
    return path


@torch.no_grad()
def resample_photo(ae_model, ldm, args, device):
    """Generative resampling: one row per strength: input | reconstruction | variants."""
    image, depth = load_photo(args.resample, ae_model, device)
    z = ae_model.encode(image, depth)                                      # (1, C, h, w)
    try:
        strengths = [float(s) for s in str(args.strength).split(",")]
    except ValueError:
        raise UserError(f"--strength {args.strength!r}: expected numbers in [0, 1], e.g. 0.3,0.6")
    n = args.n or 6
    g = torch.Generator(device=device).manual_seed(args.seed)
    rows = []
    P0 = ae_model.P0(1).to(device)
    recon = ae_model.render(ae_model.decode(z), P0)["image"].clamp(-1, 1)
    for s in tqdm(strengths, desc="strengths", leave=False):
        zs = diffusion.resample(ldm, z.expand(n, -1, -1, -1), s, args.steps, args.eta,
                                generator=g)
        views = ae_model.render(ae_model.decode(zs), ae_model.P0(n).to(device))["image"]
        rows.append(torch.cat([image, recon, views.clamp(-1, 1)]).cpu())
    stem = os.path.splitext(os.path.basename(args.resample))[0]
    path = save_grid(torch.cat(rows), os.path.join(args.out, f"{stem}_resample.png"), n + 2)
    print(f"wrote {path} (rows: strength {', '.join(map(str, strengths))}; columns: input | "
          f"reconstruction | {n} variants)")
    return path


# ---------------------------------------------------------------------------------------------
# 4. Geometry: a coloured point cloud from rendered depth
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def point_cloud(ae_model, planes, yaws=(-20.0, 0.0, 20.0), min_opacity=0.5):
    """Unproject the rendered depth of a few views into world points (view space, DESIGN.md).

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


def write_ply(path, points, colours):
    """ASCII PLY with x y z red green blue per vertex: MeshLab, Blender and Open3D read it."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        f.write("ply\nformat ascii 1.0\n")
        f.write(f"element vertex {len(points)}\n")
        f.write("property float x\nproperty float y\nproperty float z\n")
        f.write("property uchar red\nproperty uchar green\nproperty uchar blue\nend_header\n")
        for (x, y, z), (r, g, b) in zip(points, colours):
            f.write(f"{x:.5f} {y:.5f} {z:.5f} {r} {g} {b}\n")
    return path


def export_ply(ae_model, planes, path):
    return write_ply(path, *point_cloud(ae_model, planes))


# ---------------------------------------------------------------------------------------------
# 5. Metrics
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
    """NFS of the samples' frontal depth; FID / KID of their novel views when torch-fidelity is
    installed (against --real, default the autoencoder's training folder)."""
    c = ae_model.config
    near, mid, _ = render.default_bounds(c["radius"])
    _, depth = render_frames(ae_model, planes, ae_model.P0(len(planes)))   # (n, 1, h, w)
    print(f"NFS (64 bins, depth in [{near:.2f}, {2 * c['radius']:.2f}]): "
          f"{nfs(depth, near, 2 * c['radius']):.2f}  over {len(planes)} samples")
    real = args.real or getattr(ae_model, "trained_on", None)
    if real and os.path.isdir(os.path.join(real, "depth")):
        # The same score on the data's own depth maps, at the rendered depth's resolution:
        # what a model that got the geometry exactly right would score.
        ds = data_mod.ImageFolder(real, depth.shape[-1], depth=True, verbose=False)
        ref = torch.stack([ds[i]["depth"] for i in range(min(len(ds), len(planes)))])
        print(f"NFS of the data's depth maps ({real}, {len(ref)} images): "
              f"{nfs(ref, near, 2 * c['radius']):.2f}")
    try:
        import torch_fidelity
    except ImportError:
        print("FID/KID: skipped; `pip install torch-fidelity` and pass --real IMAGES_DIR to "
              "score rendered novel views against real images")
        return
    if not args.real:
        raise UserError("--metrics with torch-fidelity needs --real IMAGES_DIR to compare with")
    fake_dir = os.path.join(args.out, "fid_views")
    os.makedirs(fake_dir, exist_ok=True)
    torch.manual_seed(args.seed)                          # one random novel view per sample
    views, _ = render_frames(ae_model, planes, ae.random_cameras(len(planes), args.yaw,
                                                                 args.pitch, c["radius"]))
    for i, im in enumerate(views):
        ae.save_image(im, os.path.join(fake_dir, f"{i:05d}.png"))
    r = torch_fidelity.calculate_metrics(input1=fake_dir, input2=args.real, fid=True, kid=True,
                                         kid_subset_size=min(1000, len(planes)), verbose=False)
    print(f"FID {r['frechet_inception_distance']:.2f}, KID "
          f"{r['kernel_inception_distance_mean'] * 1000:.2f} x 1e-3 ({len(planes)} novel views "
          f"vs {args.real})")


# ---------------------------------------------------------------------------------------------
# 6. The demo and the command line
# ---------------------------------------------------------------------------------------------
def demo(args):
    """The whole pipeline on the synthetic scenes with the tiny presets: train (or reuse) the
    autoencoder and the diffusion model under runs/demo/, then sample everything."""
    threads = ["--threads", str(args.threads)] if args.threads else []
    ae_dir, ldm_dir = os.path.join("runs", "demo", "ae"), os.path.join("runs", "demo", "ldm")
    ae_path, ldm_path = os.path.join(ae_dir, "ckpt.pt"), os.path.join(ldm_dir, "ckpt.pt")
    # Each stage resumes from its checkpoint when one exists, so a second --demo only samples.
    print("== stage 1: the 3D-aware autoencoder (python autoencoder.py --preset tiny) ==")
    ae.train(ae.get_args(["--preset", "tiny", "--out", ae_dir, *threads] +
                         (["--resume"] if os.path.isfile(ae_path) else [])))
    print("== stage 2: latent diffusion (python diffusion.py --preset tiny) ==")
    diffusion.train(diffusion.get_args(["--preset", "tiny", "--ae", ae_path, "--out", ldm_dir,
                                        *threads] +
                                       (["--resume"] if os.path.isfile(ldm_path) else [])))
    print("== sampling ==")
    args.ae, args.ldm = ae_path, ldm_path
    args.n = args.n or 8
    args.out = args.out or os.path.join("runs", "demo", "samples")
    device = torch.device(args.device)
    ae_model, ldm = load_models(ae_path, ldm_path, device)
    args.metrics = True
    out = generate(ae_model, ldm, args, device)
    # Then every application once: interpolation between two seeds, novel views and
    # resampling of a held-out photo the autoencoder never trained on.
    args.interp_seeds = [args.seed + 1, args.seed + 2]
    gif = interpolate(ae_model, ldm, args, device)
    root = ae_model.trained_on
    photo = sorted(f for f in os.listdir(os.path.join(root, "_heldout")) if f.endswith(".png"))[0]
    args.image = args.resample = os.path.join(root, "_heldout", photo)
    nv = novel_views(ae_model, args, device)
    resample_photo(ae_model, ldm, args, device)
    print("\nGIFs to open:\n  " + "\n  ".join(out["gifs"][:4] + [gif, nv]))


def get_args(argv=None):
    p = argparse.ArgumentParser(description="Sample 3D scenes from a trained WildFusion and run "
                                "its applications.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    a = p.add_argument
    a("--demo", action="store_true", help="train tiny models on synthetic scenes, then sample")
    a("--ae", help="autoencoder checkpoint (stage 1)")
    a("--ldm", help="diffusion checkpoint (stage 2)")
    a("--out", default=None, help="output folder (default samples/)")
    a("--n", type=int, default=None, help="samples (default 16; resampling: 6 variants)")
    a("--steps", type=int, default=50, help="DDIM steps")
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
    a("--metrics", action="store_true", help="print NFS (and FID/KID with torch-fidelity)")
    a("--real", help="real image folder for FID/KID")
    a("--frames", type=int, default=60, help="frames per GIF")
    a("--fps", type=int, default=20)
    a("--yaw", type=float, default=25.0, help="turntable yaw amplitude, degrees")
    a("--pitch", type=float, default=5.0, help="turntable pitch wobble, degrees")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    args = p.parse_args(argv)
    if args.n is not None and args.n < 1:
        raise UserError("--n must be at least 1")
    if args.frames < 2 or args.steps < 1:
        raise UserError("--frames must be at least 2 and --steps at least 1")
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
    ae_model, ldm = load_models(args.ae, args.ldm if needs_ldm else None, device)
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
