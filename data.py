"""
data.py -- from a folder of photos to tensors, and synthetic 3D scenes with exact ground truth.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570) trains on plain, unposed image folders
(Sec. 3, "in-the-wild" data) plus a monocular depth estimate per image (Sec. 3.1, the depth loss).
This file provides both, and a procedural data set where the 3D truth is known exactly.

    python data.py scenes data/scenes --n 2000 --res 64            # synthetic training scenes
    python data.py scenes data/scenes --n 2000 --heldout 64        # + held-out novel views
    python data.py depth my_photos/                                # monocular depth -> depth/
    python data.py info my_photos/ --res 128                         # load and summarise a folder

Map of the file:
    1. errors        UserError: one clear line for the user instead of a traceback
    2. images        load_rgb: any file mode -> RGB, square centre crop, antialiased resize
    3. depth maps    load_depth: .npy / 16-bit PNG, checked, resized without blurring edges
    4. ImageFolder   the dataset: recursive scan, optional depth/ and class sub-folders
    5. depth prep    `python data.py depth DIR`: a monocular estimator over a folder
    6. scenes        an analytic ray caster (independent of render.py) for ground-truth scenes

Folder layout. Images anywhere below ROOT (jpg, jpeg, png, webp, bmp). The depth map of
ROOT/a/b.jpg is ROOT/depth/a/b.npy (or .png). Folders named `depth`, or starting with `_` or `.`,
hold side data and are not scanned for images. If every image sits in a first-level sub-folder
(ROOT/cat/x.jpg, ROOT/dog/y.jpg, ImageNet style), the sub-folder names are the class labels.
"""
import argparse
import json
import math
import os
import sys
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from PIL import Image, ImageOps
from tqdm import tqdm

IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
DEPTH_EXTS = (".npy", ".png")


# ---------------------------------------------------------------------------------------------
# 1. Errors the user can fix get one line, not a traceback
# ---------------------------------------------------------------------------------------------
class UserError(Exception):
    """Bad input that the user can fix: the message names the file and the fix."""


def run_cli(main):
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


# ---------------------------------------------------------------------------------------------
# 2. Images: any mode -> RGB uint8, square centre crop, antialiased resize
# ---------------------------------------------------------------------------------------------
def to_rgb(img, background=(255, 255, 255)):
    """Convert a PIL image of any mode to 8-bit RGB.

    Transparent images (RGBA, LA, palette with transparency) are composited on a plain white
    background rather than having their alpha dropped (which shows whatever colour the
    invisible pixels happened to store). 16/32-bit grayscale is rescaled to 8 bits by its range
    (PIL's own convert() would clip everything above 255 to white).
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        img = img.convert("RGBA")
        canvas = Image.new("RGBA", img.size, background + (255,))
        return Image.alpha_composite(canvas, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(img, dtype=np.float64)
        hi = 65535.0 if img.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    return img.convert("RGB")


def center_crop_box(w, h):
    """The largest centred square of a w x h image, as a PIL box (left, top, right, bottom)."""
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return left, top, left + s, top + s


def load_rgb(path, res):
    """Read an image file -> (uint8 array (res, res, 3), was_upsampled). Raises on a bad file."""
    with Image.open(path) as img:
        img = ImageOps.exif_transpose(img)          # honour the camera's rotation flag
        if img.format == "JPEG":
            img.draft("RGB", (res, res))            # let libjpeg decode at a smaller scale
        img.load()                                  # decode now: truncated files fail here
        rgb = to_rgb(img)
    box = center_crop_box(*rgb.size)
    small = box[2] - box[0] < res
    # PIL's bicubic resize widens its kernel when shrinking, i.e. it antialiases.
    # Crop first: resize(box=...) would let the kernel read pixels from outside the crop.
    rgb = rgb.crop(box).resize((res, res), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8), small              # a writable copy


# ---------------------------------------------------------------------------------------------
# 3. Depth maps: z-depth (larger = farther), never disparity
# ---------------------------------------------------------------------------------------------
def load_depth(path, res, image_size):
    """Read a depth map -> float32 array (res, res). Raises UserError naming the file if bad.

    The map must cover the same field of view as its image (same aspect ratio); it gets the same
    centre crop and is resized with nearest-neighbour sampling: averaging neighbours (bilinear,
    bicubic) would invent depths *between* a foreground edge and the background behind it,
    i.e. floating points in mid-air that the depth loss would then teach the model.
    """
    if path.endswith(".npy"):
        d = np.load(path, allow_pickle=False)      # never unpickle: the file is untrusted
    else:
        with Image.open(path) as img:
            d = np.asarray(img)
    d = np.asarray(d, dtype=np.float32).squeeze()
    if d.ndim != 2:
        raise UserError(f"{path}: depth map must be a single-channel (H, W) array, got shape "
                        f"{d.shape}; write one float32 .npy (or 16-bit PNG) per image")
    if not np.isfinite(d).all():
        raise UserError(f"{path}: depth map contains NaN or inf values; regenerate it with "
                        f"`python data.py depth` or clean it (e.g. np.nan_to_num)")
    (h, w), (iw, ih) = d.shape, image_size
    if abs(w / h - iw / ih) > 0.02 * (iw / ih):
        raise UserError(f"{path}: depth map is {w}x{h} but its image is {iw}x{ih} (another "
                        f"aspect ratio); the depth map must cover the same view as the image")
    box = center_crop_box(w, h)
    img = Image.fromarray(d, mode="F").crop(box).resize((res, res), Image.Resampling.NEAREST)
    return np.array(img, dtype=np.float32)                 # a writable copy


# ---------------------------------------------------------------------------------------------
# 4. The dataset
# ---------------------------------------------------------------------------------------------
def _skip_dir(name):
    return name == "depth" or name.startswith(("_", "."))


def scan_images(root):
    """All image files below root (sorted, relative paths), skipping side-data folders."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not _skip_dir(d))
        found += [os.path.relpath(os.path.join(dirpath, f), root) for f in filenames
                  if f.lower().endswith(IMAGE_EXTS)]
    return sorted(found)


def depth_path_for(root, rel):
    """ROOT/a/b.jpg -> the existing ROOT/depth/a/b.{npy,png}, or None."""
    stem = os.path.splitext(os.path.join(root, "depth", rel))[0]
    for ext in DEPTH_EXTS:
        if os.path.isfile(stem + ext):
            return stem + ext
    return None


class ImageFolder(torch.utils.data.Dataset):
    """A folder of photos as a dataset of dict(image, depth, label).

    image: float (3, res, res) in [-1, 1]; depth: float (1, res, res) z-depth, only when depth
    maps are used; label: int class index, or -1 for an unconditional data set.

    depth="auto" uses ROOT/depth/ when it exists, True requires it, False ignores it.
    labels="auto" uses first-level sub-folders as classes when every image is inside one and
    there are at least two; True requires that layout, False gives -1 everywhere.
    All images are decoded once, here, with a progress bar, and kept in memory as uint8
    (3 * res^2 bytes each: 10k images at 256 px are 2 GB). That checks every file up front and
    makes every epoch after the first free of JPEG decoding.
    """

    def __init__(self, root, res, depth="auto", labels="auto", flip=False, max_images=None,
                 verbose=True):
        self.root, self.res, self.flip = root, res, flip
        if not os.path.isdir(root):
            raise UserError(f"{root}: no such folder; pass --data a folder of images "
                            f"(or leave --data out to use the synthetic scenes)")
        files = scan_images(root)
        if not files:
            raise UserError(f"{root}: no images found (searched recursively for "
                            f"{', '.join(IMAGE_EXTS)}; folders named depth or starting with _ "
                            f"or . are skipped)")
        if max_images:
            files = files[:max_images]

        # Class labels from first-level sub-folders.
        tops = sorted({f.split(os.sep)[0] for f in files if os.sep in f})
        in_sub = all(os.sep in f for f in files)
        if labels is True and not (in_sub and len(tops) >= 2):
            raise UserError(f"{root}: class labels need every image in a first-level "
                            f"sub-folder (ROOT/class_name/image.jpg), at least two classes")
        self.classes = tops if (labels is not False and in_sub and len(tops) >= 2) else []

        # Depth maps under ROOT/depth/.
        has_depth_dir = os.path.isdir(os.path.join(root, "depth"))
        if depth is True and not has_depth_dir:
            raise UserError(f"{root}: depth maps are required but {root}/depth/ does not exist; "
                            f"run `python data.py depth {root}` first")
        self.use_depth = bool(depth) and has_depth_dir
        depth_files = [depth_path_for(root, f) for f in files] if self.use_depth else []
        missing = [f for f, d in zip(files, depth_files) if d is None]
        if missing:
            raise UserError(f"{root}: {len(missing)} of {len(files)} images have no depth map "
                            f"under {root}/depth/ (first: {missing[0]}); run `python data.py "
                            f"depth {root}` or train without depth")

        # Decode everything in parallel threads (PIL releases the GIL while decoding).
        def work(i):
            path = os.path.join(root, files[i])
            try:
                rgb, small = load_rgb(path, res)
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                return None, None, False, f"{path}: {e}"
            d = None
            if self.use_depth:
                with Image.open(path) as im:
                    size = ImageOps.exif_transpose(im).size
                d = load_depth(depth_files[i], res, size)   # bad depth: UserError, stops
            return rgb, d, small, None

        # Collect in file order; an unreadable file is skipped, named and counted, never silent.
        images, depths, labels_, bad, n_small = [], [], [], [], 0
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            results = pool.map(work, range(len(files)))
            for i, (rgb, d, small, err) in enumerate(tqdm(results, total=len(files),
                                                          desc=f"loading {root}", unit="img",
                                                          disable=not verbose, leave=False)):
                if err:
                    warnings.warn(f"skipping unreadable image {err}")
                    bad.append(files[i])
                    continue
                n_small += small
                images.append(torch.from_numpy(rgb).permute(2, 0, 1))   # (3, res, res) uint8
                if d is not None:
                    depths.append(torch.from_numpy(d)[None])                # (1, res, res)
                labels_.append(self.classes.index(files[i].split(os.sep)[0])
                               if self.classes else -1)
        if len(bad) * 2 > len(files):
            raise UserError(f"{root}: {len(bad)} of {len(files)} images could not be read "
                            f"(first: {bad[0]}); check the files (corrupt or not images)")
        if bad:
            warnings.warn(f"{root}: skipped {len(bad)} unreadable image(s) of {len(files)}")
        if n_small:
            warnings.warn(f"{root}: {n_small} image(s) are smaller than {res}x{res} after "
                          f"cropping and were upsampled (they will look blurry)")
        bad = set(bad)
        self.files = [f for f in files if f not in bad]
        self.images = torch.stack(images)                                   # (N, 3, res, res)
        self.depths = torch.stack(depths) if depths else None               # (N, 1, res, res)
        self.labels = torch.tensor(labels_, dtype=torch.long)               # (N,)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i].float() / 127.5 - 1                          # (3, res, res)
        item = dict(image=image, label=int(self.labels[i]))
        if self.depths is not None:
            item["depth"] = self.depths[i]                                  # (1, res, res)
        # A mirrored photo is as plausible as the photo, and mirroring keeps view space intact.
        if self.flip and torch.rand(()) < 0.5:
            item = {k: v.flip(-1) if torch.is_tensor(v) else v for k, v in item.items()}
        return item


# ---------------------------------------------------------------------------------------------
# 5. Monocular depth for a folder of photos (the paper uses an off-the-shelf estimator)
# ---------------------------------------------------------------------------------------------
def load_estimator(name):
    """A pretrained monocular depth estimator: PIL image -> (array (H, W), kind) where kind is
    "depth" or "disparity". Needs internet (or a warm cache) the first time; optional packages."""
    if name == "depth-anything":
        try:
            from transformers import pipeline
        except ImportError:
            raise UserError("the depth-anything estimator needs `pip install transformers`; or "
                            "use --model midas, or put precomputed maps in ROOT/depth/")
        try:
            pipe = pipeline("depth-estimation", model="LiheYoung/depth-anything-small-hf")
        except Exception as e:  # no internet, no cache, ...: say what to do in one line
            raise UserError(f"could not load Depth Anything ({type(e).__name__}); it is "
                            f"downloaded on first use, so this needs internet once")
        # The pipeline's predicted_depth is relative inverse depth (larger = closer).
        return lambda img: (pipe(img)["predicted_depth"].squeeze().numpy(), "disparity")
    if name == "midas":
        try:
            model = torch.hub.load("intel-isl/MiDaS", "DPT_Hybrid", trust_repo=True).eval()
            tf = torch.hub.load("intel-isl/MiDaS", "transforms", trust_repo=True).dpt_transform
        except Exception as e:
            raise UserError(f"could not load MiDaS through torch.hub ({type(e).__name__}: "
                            f"{str(e)[:80]}); it needs internet once and `pip install timm`; "
                            f"or put precomputed maps in ROOT/depth/")

        def run(img):
            with torch.no_grad():
                pred = model(tf(np.asarray(img)))                           # (1, h, w) disparity
                pred = torch.nn.functional.interpolate(pred[None], size=img.size[::-1],
                                                       mode="bicubic")[0, 0]
            return pred.numpy(), "disparity"
        return run
    raise UserError(f"unknown depth model {name!r}; choose midas or depth-anything")


def disparity_to_depth(disp, max_ratio=100.0):
    """Relative inverse depth (MiDaS, DPT, Depth Anything) -> relative depth, larger = farther.

    Such estimators predict disparity only up to an unknown scale *and shift*, so no exact
    conversion exists. We normalise by the largest disparity (the nearest point gets depth 1)
    and clamp so that the sky or a zero disparity becomes `max_ratio` instead of infinity.
    The autoencoder's depth loss aligns scale and shift per image, which absorbs the rest.
    """
    disp = np.asarray(disp, dtype=np.float64)
    disp = disp / max(disp.max(), 1e-8)
    return (1.0 / np.clip(disp, 1.0 / max_ratio, None)).astype(np.float32)


def prepare_depth(root, estimator, overwrite=False):
    """Run `estimator` (PIL image -> (array, "depth"|"disparity")) on every image under root
    and write ROOT/depth/<same relative path>.npy (float32 z-depth, larger = farther)."""
    files = scan_images(root)
    if not files:
        raise UserError(f"{root}: no images found (searched for {', '.join(IMAGE_EXTS)})")
    written = 0
    for rel in tqdm(files, desc="estimating depth", unit="img"):
        out = os.path.splitext(os.path.join(root, "depth", rel))[0] + ".npy"
        if os.path.exists(out) and not overwrite:
            continue
        with Image.open(os.path.join(root, rel)) as img:
            img = to_rgb(ImageOps.exif_transpose(img))
        pred, kind = estimator(img)
        d = disparity_to_depth(pred) if kind == "disparity" else np.asarray(pred, np.float32)
        os.makedirs(os.path.dirname(out), exist_ok=True)
        np.save(out, d.astype(np.float32))
        written += 1
    return written


# ---------------------------------------------------------------------------------------------
# 6. Synthetic scenes with exact ground truth: a small analytic ray caster in numpy
# ---------------------------------------------------------------------------------------------
# Each scene: 2-4 primitives (spheres, boxes turned about the vertical axis, upright cylinders)
# resting on a chequered floor, in front of a striped back wall, lit by one directional light
# with hard shadows plus ambient light. Everything is in view space (DESIGN.md): the input
# camera P0 sits at (0, 0, -radius) looking down +z at the pivot, y points down, so the floor is
# the plane y = +floor_y and "up" is -y. The caster is independent of render.py on purpose: the
# data must not share a bug with the renderer it is used to test.
SCENE_RADIUS, SCENE_FOV = 2.7, 40.0   # camera distance from the pivot [world units], FOV [deg]


def _rot_y(deg):
    """The same yaw/pitch convention as render.orbit_camera, in numpy (checked by a test)."""
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])


def scene_camera(yaw_deg, pitch_deg, radius=SCENE_RADIUS):
    """cam2world (4, 4) numpy; must agree with render.orbit_camera (tests/test_data.py)."""
    p = math.radians(pitch_deg)
    R_pitch = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    R = _rot_y(yaw_deg) @ R_pitch
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, -radius * R[:, 2]
    return c2w


def random_scene(rng):
    """A random scene description (plain dict of numbers), drawn from a numpy Generator."""
    def colour():
        h = rng.uniform(0, 1)
        s, v = rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95)
        k = (np.array([5, 3, 1]) + h * 6) % 6          # HSV -> RGB without colorsys
        return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    floor_y = rng.uniform(0.45, 0.75)
    objects, placed = [], []
    for _ in range(rng.integers(2, 5)):
        kind = rng.choice(["sphere", "box", "cylinder"])
        size = rng.uniform(0.18, 0.38)
        for _try in range(20):                         # avoid overlapping footprints
            xz = rng.uniform(-0.75, 0.75, size=2)
            if all(np.hypot(*(xz - q)) > size + s + 0.05 for q, s in placed):
                break
        placed.append((xz, size))
        height = size if kind == "sphere" else rng.uniform(0.6, 1.6) * size
        objects.append(dict(kind=kind, center=np.array([xz[0], floor_y - height, xz[1]]),
                            size=size,
                            height=height, yaw=rng.uniform(0, 90), colour=colour()))
    # Direction *towards* the light: from above (-y), a little to a side, mostly from the front.
    light = np.array([rng.uniform(-0.8, 0.8), -1.0, rng.uniform(-0.9, 0.3)])
    return dict(floor_y=floor_y, wall_z=rng.uniform(1.6, 2.6), objects=objects,
                floor_colours=[colour(), colour()], wall_colours=[colour(), colour()],
                checker=rng.uniform(2.0, 4.0), stripes=rng.uniform(2.0, 5.0),
                light=light / np.linalg.norm(light), ambient=rng.uniform(0.25, 0.45),
                elevation=rng.uniform(5.0, 25.0))


# Each primitive has a hit function (rays -> nearest distance t > 0, inf on a miss) and a
# normal function (surface points -> outward unit normals). Normals are only computed for the
# rays that end on that primitive, which makes shadow rays (t only) cheap.
def _hit_sphere(o, d, ob):
    """Nearest t > 0 of |o + t d - c| = r for unit directions d. o, d (N, 3) -> (N,)."""
    oc = o - ob["center"]
    b = (oc * d).sum(-1)
    disc = b * b - (oc * oc).sum(-1) + ob["size"] ** 2
    sq = np.sqrt(np.maximum(disc, 0))
    t = np.where(-b - sq > 1e-4, -b - sq, -b + sq)
    return np.where((disc > 0) & (t > 1e-4), t, np.inf)


def _normal_sphere(p, ob):
    return (p - ob["center"]) / ob["size"]


def _box_frame(ob):
    """Rotation box frame -> world (yaw about the vertical axis) and the half-sizes."""
    return _rot_y(ob["yaw"]), np.array([ob["size"], ob["height"], ob["size"]])


def _hit_box(o, d, ob):
    """Slab method in the box's own frame: t_in = max of the entry distances over the 3 axes,
    t_out = min of the exit distances; a hit iff t_in <= t_out."""
    R, half = _box_frame(ob)
    ol, dl = (o - ob["center"]) @ R, d @ R                                  # into the box frame
    with np.errstate(divide="ignore", invalid="ignore"):
        t1, t2 = (-half - ol) / dl, (half - ol) / dl
    t_in = np.nanmax(np.minimum(t1, t2), -1)
    t_out = np.nanmin(np.maximum(t1, t2), -1)
    t = np.where(t_in > 1e-4, t_in, t_out)
    return np.where((t_in <= t_out) & (t > 1e-4), t, np.inf)


def _normal_box(p, ob):
    R, half = _box_frame(ob)
    pl = (p - ob["center"]) @ R / half                                      # in [-1, 1]^3
    axis = np.abs(pl).argmax(-1)                                            # the face hit
    n = np.zeros_like(p)
    n[np.arange(len(p)), axis] = np.sign(pl[np.arange(len(p)), axis])
    return n @ R.T


def _hit_cylinder(o, d, ob):
    """Upright (along y) capped cylinder: side wall x^2 + z^2 = r^2 and two caps."""
    r, half_h = ob["size"], ob["height"]
    oc = o - ob["center"]
    a = d[:, 0] ** 2 + d[:, 2] ** 2
    b = oc[:, 0] * d[:, 0] + oc[:, 2] * d[:, 2]
    disc = b * b - a * (oc[:, 0] ** 2 + oc[:, 2] ** 2 - r * r)
    with np.errstate(divide="ignore", invalid="ignore"):
        t_side = (-b - np.sqrt(np.maximum(disc, 0))) / a
        t_cap = (-np.sign(d[:, 1]) * half_h - oc[:, 1]) / d[:, 1]          # cap facing the ray
    y = oc[:, 1] + t_side * d[:, 1]
    t_side = np.where((disc > 0) & (a > 1e-12) & (np.abs(y) <= half_h) & (t_side > 1e-4),
                      t_side, np.inf)
    pc = oc + np.nan_to_num(t_cap, posinf=0, neginf=0)[:, None] * d
    t_cap = np.where((pc[:, 0] ** 2 + pc[:, 2] ** 2 <= r * r) & (t_cap > 1e-4), t_cap, np.inf)
    return np.minimum(t_side, t_cap)


def _normal_cylinder(p, ob):
    q = p - ob["center"]
    on_cap = np.abs(q[:, 1]) >= ob["height"] - 1e-4
    side = q * np.array([1.0, 0.0, 1.0]) / ob["size"]
    cap = np.zeros_like(q)
    cap[:, 1] = np.sign(q[:, 1])
    return np.where(on_cap[:, None], cap, side)


PRIMITIVES = dict(sphere=(_hit_sphere, _normal_sphere), box=(_hit_box, _normal_box),
                  cylinder=(_hit_cylinder, _normal_cylinder))


def _cast(scene, o, d, shading=True):
    """Closest hit of rays o, d (N, 3) -> t (N,) and, with shading, normal and albedo (N, 3).

    Candidates: the floor plane y = floor_y, the wall plane z = wall_z, then each object; the
    nearest positive distance wins."""
    with np.errstate(divide="ignore", invalid="ignore"):
        t_floor = (scene["floor_y"] - o[:, 1]) / d[:, 1]
        t_wall = (scene["wall_z"] - o[:, 2]) / d[:, 2]
    ts = [np.where(t_floor > 1e-4, t_floor, np.inf), np.where(t_wall > 1e-4, t_wall, np.inf)]
    ts += [PRIMITIVES[ob["kind"]][0](o, d, ob) for ob in scene["objects"]]
    ts = np.stack(ts)                                                       # (2 + objects, N)
    which = ts.argmin(0)                                                    # (N,)
    t = ts[which, np.arange(len(which))]
    if not shading:
        return t
    p = o + np.where(np.isfinite(t), t, 0)[:, None] * d                     # hit points
    normal = np.zeros_like(p)
    albedo = np.full_like(p, 0.8)
    # Floor: a chequerboard in x and z; wall: vertical stripes in x.
    fl, wl = which == 0, which == 1
    checker = (np.floor(p[fl, 0] * scene["checker"]) + np.floor(p[fl, 2] * scene["checker"])) % 2
    albedo[fl] = np.where(checker[:, None] > 0, *scene["floor_colours"])
    normal[fl] = [0.0, -1.0, 0.0]
    stripes = np.floor(p[wl, 0] * scene["stripes"]) % 2
    albedo[wl] = np.where(stripes[:, None] > 0, *scene["wall_colours"])
    normal[wl] = [0.0, 0.0, -1.0]
    for k, ob in enumerate(scene["objects"]):
        m = which == k + 2
        normal[m] = PRIMITIVES[ob["kind"]][1](p[m], ob)
        albedo[m] = ob["colour"]
    return t, normal, albedo


def render_scene(scene, cam2world, fov_deg=SCENE_FOV, res=64, aa=2):
    """Ray-cast a scene seen from cam2world (4, 4), a view-space camera (P0 = identity
    rotation at (0, 0, -radius)) -> (rgb float (res, res, 3) in [0, 1], z-depth float32 (res, res)).

    RGB is averaged over aa x aa sub-pixel rays (antialiasing); depth is the exact z-depth of
    the ray through the pixel centre (averaging depth across an edge would invent a surface).
    All rays (sub-pixel ones and centre ones) go through the caster in one batch.
    """
    f = 0.5 * res / math.tan(math.radians(fov_deg) / 2)
    # cam2world is in view space, where P0 looks straight down +z. The scene itself is built
    # upright, and P0 looks down on it from `elevation` degrees: turning view space by that
    # pitch gives the scene frame (T @ P0 = scene_camera(0, elevation)).
    T = scene_camera(0, scene.get("elevation", 0.0), radius=0.0)
    cam2world = T @ cam2world
    R, origin = cam2world[:3, :3], cam2world[:3, 3]
    # Sub-pixel offsets in [0, 1): aa x aa for colour, then the pixel centre for depth.
    offsets = [((a + 0.5) / aa, (b + 0.5) / aa) for a in range(aa) for b in range(aa)]
    offsets.append((0.5, 0.5))
    grid = np.arange(res)
    dirs = []
    for ou, ov in offsets:
        vv, uu = np.meshgrid((grid + ov - 0.5 * res) / f, (grid + ou - 0.5 * res) / f,
                             indexing="ij")
        dirs.append(np.stack([uu, vv, np.ones_like(uu)], -1).reshape(-1, 3))
    dc = np.concatenate(dirs)                                               # camera-space dirs
    norm = np.linalg.norm(dc, axis=-1)
    d = (dc @ R.T) / norm[:, None]                                          # unit, world
    o = np.broadcast_to(origin, d.shape)
    t, n, albedo = _cast(scene, o, d)
    hit = np.isfinite(t)
    # Depth: z-depth = t * cos(angle to the optical axis) = t / |d_cam| for d_cam = (u, v, 1).
    depth = np.where(hit, t / norm, 1e3)[-res * res:].reshape(res, res).astype(np.float32)
    # Colour: Lambert shading; a shadow ray towards the light decides if a point is lit.
    k = aa * aa * res * res
    t, n, albedo, hit, o, d = t[:k], n[:k], albedo[:k], hit[:k], o[:k], d[:k]
    p = o + np.where(hit, t, 0)[:, None] * d
    light = scene["light"]                                                  # towards the light
    lit = np.isinf(_cast(scene, p + 1e-3 * n, np.broadcast_to(light, d.shape), shading=False))
    lam = np.clip((n * light).sum(-1), 0, 1) * lit
    shade = scene["ambient"] + (1 - scene["ambient"]) * lam
    rgb = np.where(hit[:, None], albedo * shade[:, None], 0.8)              # (aa*aa*HW, 3)
    rgb = rgb.reshape(aa * aa, res, res, 3).mean(0)
    return np.clip(rgb, 0, 1), depth


DEFAULT_VIEWS = "-20:0,-10:0,10:0,20:0,0:-10,0:10"


def parse_views(text):
    """'yaw:pitch,...' in degrees -> [(yaw, pitch), ...]."""
    try:
        views = [tuple(float(v) for v in item.split(":")) for item in text.split(",")]
        assert all(len(v) == 2 for v in views)
    except (ValueError, AssertionError):
        raise UserError(f"--views {text!r}: expected comma-separated yaw:pitch pairs in "
                        f"degrees, e.g. {DEFAULT_VIEWS}")
    return views


def _save_rgb(path, rgb):
    Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(path)


def make_scenes(out, n, res=64, seed=0, heldout=0, views=DEFAULT_VIEWS, aa=2,
                radius=SCENE_RADIUS, fov_deg=SCENE_FOV, verbose=True):
    """Write n training scenes (OUT/NNNNNN.png + OUT/depth/NNNNNN.npy, a normal --data folder)
    and `heldout` more under OUT/_heldout/ (same layout) with their novel views in
    OUT/_heldout/_views/NNNNNN/yaw+20_pitch+0.{png,npy}. OUT/scenes.json records the camera
    (radius, fov_deg) so that models and evaluation use the one the data were rendered with."""
    if n < 1 or res < 8:
        raise UserError(f"scenes: need --n >= 1 and --res >= 8 (got {n}, {res})")
    poses = parse_views(views) if heldout else []
    for sub in ("depth", "_heldout/depth") if heldout else ("depth",):
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    P0 = scene_camera(0, 0, radius)
    t0 = time.time()
    for i in tqdm(range(n + heldout), desc=f"rendering scenes -> {out}", unit="scene",
                  disable=not verbose):
        rng = np.random.default_rng([seed, i])           # scene i is the same whatever n is
        scene = random_scene(rng)
        folder = out if i < n else os.path.join(out, "_heldout")
        name = f"{i:06d}"
        rgb, depth = render_scene(scene, P0, fov_deg, res, aa)
        _save_rgb(os.path.join(folder, name + ".png"), rgb)
        np.save(os.path.join(folder, "depth", name + ".npy"), depth)
        if i >= n:
            vdir = os.path.join(out, "_heldout", "_views", name)
            os.makedirs(vdir, exist_ok=True)
            for yaw, pitch in poses:
                rgb, depth = render_scene(scene, scene_camera(yaw, pitch, radius), fov_deg,
                                          res, aa)
                stem = os.path.join(vdir, f"yaw{yaw:+g}_pitch{pitch:+g}")
                _save_rgb(stem + ".png", rgb)
                np.save(stem + ".npy", depth)
    meta = dict(n=n, heldout=heldout, res=res, seed=seed, radius=radius, fov_deg=fov_deg,
                views=[dict(yaw_deg=y, pitch_deg=p) for y, p in poses])
    with open(os.path.join(out, "scenes.json"), "w") as f:
        json.dump(meta, f, indent=1)
    return meta, time.time() - t0


def read_scene_meta(root):
    """The camera a synthetic folder was rendered with (scenes.json), or None for photos."""
    path = os.path.join(root, "scenes.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("scenes", help="render synthetic scenes with exact depth")
    s.add_argument("out")
    s.add_argument("--n", type=int, default=2000, help="training scenes")
    s.add_argument("--res", type=int, default=64, help="image size in pixels")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--heldout", type=int, default=0, help="held-out scenes with novel views")
    s.add_argument("--views", default=DEFAULT_VIEWS, help="held-out poses, yaw:pitch in degrees")
    s.add_argument("--aa", type=int, default=2, help="antialiasing: aa x aa rays per pixel")
    d = sub.add_parser("depth", help="monocular depth maps for a folder -> ROOT/depth/")
    d.add_argument("root")
    d.add_argument("--model", default="midas", choices=["midas", "depth-anything"])
    d.add_argument("--overwrite", action="store_true")
    i = sub.add_parser("info", help="load a folder as the training scripts would, and summarise")
    i.add_argument("root")
    i.add_argument("--res", type=int, default=64)
    args = p.parse_args(argv)

    if args.cmd == "scenes":
        meta, secs = make_scenes(args.out, args.n, args.res, args.seed, args.heldout,
                                 args.views, args.aa)
        total = args.n + args.heldout * (1 + len(meta["views"]))
        print(f"wrote {args.n} scenes (+{args.heldout} held out) to {args.out} in {secs:.1f} s "
              f"({total / secs:.0f} renders/s at {args.res} px)")
    elif args.cmd == "depth":
        if not os.path.isdir(args.root):
            raise UserError(f"{args.root}: no such folder")
        n = prepare_depth(args.root, load_estimator(args.model), args.overwrite)
        print(f"wrote {n} depth maps (z-depth, larger = farther; converted from the model's "
              f"disparity) to {os.path.join(args.root, 'depth')}")
    else:
        ds = ImageFolder(args.root, args.res)
        print(f"{args.root}: {len(ds)} images at {args.res} px, depth maps: "
              f"{'yes' if ds.use_depth else 'no'}, classes: {ds.classes or 'none'}")


if __name__ == "__main__":
    run_cli(main)
