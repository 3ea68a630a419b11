"""
data.py -- from a folder of photos to tensors.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570) trains on plain, unposed image folders
(Sec. 3, "in-the-wild" data) plus a monocular depth estimate per image (Sec. 3.1, the depth loss).
This file turns such a folder into training tensors. (The synthetic scenes with exact 3D ground
truth that the scripts use when no folder is given live in scenes.py.)

    python data.py info my_photos/ --res 128                       # load and summarise a folder
    python data.py depth my_photos/                                # monocular depth -> depth/
    python data.py pack my_photos/ --res 64                        # -> my_photos/_pack-64

Map of the file:
    1. errors        UserError: one clear line for the user instead of a traceback; writes
                     that fail (a full disk) say so in one line and leave no half file
    2. images        load_rgb: any file mode -> RGB, square centre crop, antialiased resize
    3. depth maps    load_depth: .npy / 16-bit PNG, checked, resized without blurring edges
    4. ImageFolder   the dataset: recursive scan, optional depth/ and class sub-folders,
                     decoded lazily (in DataLoader workers); PackedFolder, the same from a pack
    5. depth prep    `python data.py depth DIR`: a monocular estimator over a folder
    6. packing       `python data.py pack DIR --res R`: memory-mapped arrays, no decoding

Folder layout. Images anywhere below ROOT (jpg, jpeg, png, webp, bmp). The depth map of
ROOT/a/b.jpg is ROOT/depth/a/b.npy (or .png). Folders named `depth`, or starting with `_` or `.`,
hold side data and are not scanned for images. If every image sits in a first-level sub-folder
(ROOT/cat/x.jpg, ROOT/dog/y.jpg, ImageNet style), the sub-folder names are the class labels.
Phone photos often store the picture sideways plus an EXIF "orientation" flag; every reader here
turns the picture upright first (as a photo viewer does), and its depth map must be upright too.
"""
import argparse
import contextlib
import errno
import json
import os
import shutil
import sys
import warnings

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
    """Run a script's main(); a UserError becomes `error: <message>` on stderr and exit code 2.

    Every script starts here, so the one process-wide setting they all want is made here too:
    float32 values below 1.2e-38 ("denormals") are flushed to zero. A trained renderer makes
    many of them (the transmittance exp(-sum sigma delta) behind an opaque surface, and what
    is multiplied by it, forward and backward), and x86 CPUs compute with denormals in
    microcode, many times slower than with normal numbers: the autoencoder's step would slow
    down as it learns solid surfaces. Zero instead of 1e-39 changes no result that matters."""
    torch.set_flush_denormal(True)               # a no-op (returns False) where unsupported
    try:
        main()
    except UserError as e:
        msg = str(e)
        # Raised in a DataLoader worker, it arrives wrapped in the worker's traceback: keep
        # the last line, the original message.
        if "Original Traceback" in msg:
            msg = msg.strip().splitlines()[-1].split("UserError: ", 1)[-1]
        for bar in list(getattr(tqdm, "_instances", ())):   # end a progress bar left open by
            bar.close()                                     # the failure, so the line starts fresh
        print(f"error: {msg}", file=sys.stderr)
        sys.exit(2)


def megabytes(n):
    return f"{n / 1e6:.1f} MB"


def size_on_disk(path):
    """Bytes under `path` (a file, or a folder's files)."""
    if os.path.isfile(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


SAFE = "checkpoints and data are untouched; free space and run again"   # a failed write says


def remove(path):
    """Delete a file or a folder, if it is there."""
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
        os.remove(path)


@contextlib.contextmanager
def writing(path, what, safe=SAFE, size=None):
    """Write `path` (a file or a folder) all at once or not at all:

        with writing("runs/ae/ckpt.pt", "the checkpoint of step 4") as tmp:
            torch.save(state, tmp)              # the body writes `tmp`, never `path`

    The body writes a temporary file (or folder) beside `path`, with the same extension, so
    that PIL and numpy still see the format; it replaces `path` only once complete (os.replace
    is atomic), so a crash mid-write leaves the previous version intact. Any OSError on the way
    (a full disk, a quota, a read-only folder) removes the temporary and becomes one line: what
    was being written, how large, the system's error, and `safe`, what is still intact and what
    to do (a string, or a function that makes it, called only then). `size` is the expected
    size in bytes, when the caller knows it."""
    stem, ext = os.path.splitext(path)
    tmp = f"{stem}.tmp{ext}"
    try:
        remove(tmp)                        # left by a run killed mid-write (kill -9)
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        yield tmp
        if os.path.isdir(tmp):             # a folder replaces a folder: the old one goes first
            shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)
    except BaseException as e:             # a full disk, but also Ctrl-C or a bad input file:
        written = size_on_disk(tmp) if os.path.exists(tmp) else 0   # never a half file left
        remove(tmp)
        if not isinstance(e, OSError):
            raise
        how_large = megabytes(size) if size is not None else f"{megabytes(written)} written"
        raise UserError(f"could not write {what} ({how_large}) to {path}: {e.strerror or e}. "
                        f"Nothing half-written was left; {safe() if callable(safe) else safe}"
                        ) from None


def open_array(path, dtype, shape):
    """A new .npy file as a writable memory map, its disk space reserved up front. Without the
    reservation the file is sparse, and a full disk would show up later as a crash (SIGBUS) in
    the middle of filling it; with it, it shows up here, as an OSError that `writing` reports."""
    arr = np.lib.format.open_memmap(path, "w+", dtype, tuple(shape))
    if hasattr(os, "posix_fallocate"):
        with open(path, "r+b") as f:
            try:
                os.posix_fallocate(f.fileno(), 0, os.path.getsize(path))
            except OSError as e:
                if e.errno not in (errno.EOPNOTSUPP, errno.EINVAL):  # unsupported: go on
                    raise
    return arr


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


def upright_size(img):
    """(width, height) of an opened image as a photo viewer shows it. Phones store many photos
    sideways with an EXIF orientation flag; flags 5-8 mean a quarter turn, i.e. swapped sides.
    Read from the header alone, so nothing is decoded."""
    w, h = img.size
    # (PIL decodes a whole PNG to look for EXIF after the pixels; one stored before them is in
    # img.info already, and phones write JPEG/HEIC, not PNG, so the header is enough here.)
    if img.format == "PNG" and "exif" not in img.info:
        return w, h
    return (h, w) if img.getexif().get(0x0112, 1) in (5, 6, 7, 8) else (w, h)


def load_rgb(path, res):
    """Read an image file -> (uint8 array (res, res, 3), was_upsampled, upright (w, h) of the
    full file). Raises on a bad file."""
    with Image.open(path) as img:
        size = upright_size(img)
        if img.format == "JPEG":
            img.draft("RGB", (res, res))            # let libjpeg decode at a smaller scale
        img.load()                                  # decode now: truncated files fail here
        rgb = to_rgb(ImageOps.exif_transpose(img))  # honour the camera's rotation flag
    box = center_crop_box(*rgb.size)
    small = box[2] - box[0] < res
    # PIL's bicubic resize widens its kernel when shrinking, i.e. it antialiases.
    # Crop first: resize(box=...) would let the kernel read pixels from outside the crop.
    rgb = rgb.crop(box).resize((res, res), Image.Resampling.BICUBIC)
    return np.array(rgb, dtype=np.uint8), small, size        # a writable copy


# ---------------------------------------------------------------------------------------------
# 3. Depth maps: z-depth (larger = farther), never disparity
# ---------------------------------------------------------------------------------------------
def depth_size(path):
    """(width, height) of a depth map, read from its header alone (nothing decoded)."""
    try:
        if path.endswith(".npy"):
            with open(path, "rb") as f:                # the .npy header: magic, then a dict
                major, _ = np.lib.format.read_magic(f)
                shape = (np.lib.format.read_array_header_1_0 if major == 1 else
                         np.lib.format.read_array_header_2_0)(f)[0]
            shape = [s for s in shape if s != 1] if len(shape) > 2 else shape
            if len(shape) != 2:
                raise UserError(f"{path}: depth map must be a single-channel (H, W) array, got "
                                f"shape {tuple(shape)}; write one float32 .npy (or 16-bit PNG) "
                                f"per image")
            return shape[1], shape[0]
        with Image.open(path) as img:
            return img.size
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read this depth map ({type(e).__name__}: {e}); "
                        f"regenerate it with `python data.py depth` or delete it")


def check_depth_aspect(path, depth_wh, image_wh):
    """A depth map must cover its image's field of view: the same aspect ratio (2% slack)."""
    (w, h), (iw, ih) = depth_wh, image_wh
    if abs(w / h - iw / ih) > 0.02 * (iw / ih):
        raise UserError(f"{path}: depth map is {w}x{h} but its image is {iw}x{ih} (another "
                        f"aspect ratio); the depth map must cover the same view as the image")


def load_depth(path, res, image_size):
    """Read a depth map -> float32 array (res, res). Raises UserError naming the file if bad.

    The map must cover the same field of view as its image (same aspect ratio); it gets the same
    centre crop and is resized with nearest-neighbour sampling: averaging neighbours (bilinear,
    bicubic) would invent depths *between* a foreground edge and the background behind it,
    i.e. floating points in mid-air that the depth loss would then teach the model.
    """
    try:
        if path.endswith(".npy"):
            d = np.load(path, allow_pickle=False)  # never unpickle: the file is untrusted
        else:
            with Image.open(path) as img:
                d = np.asarray(img)
    except (OSError, ValueError, SyntaxError) as e:
        raise UserError(f"{path}: cannot read this depth map ({type(e).__name__}: {e}); "
                        f"regenerate it with `python data.py depth` or delete it")
    d = np.asarray(d, dtype=np.float32).squeeze()
    if d.ndim != 2:
        raise UserError(f"{path}: depth map must be a single-channel (H, W) array, got shape "
                        f"{d.shape}; write one float32 .npy (or 16-bit PNG) per image")
    if not np.isfinite(d).all():
        raise UserError(f"{path}: depth map contains NaN or inf values; regenerate it with "
                        f"`python data.py depth` or clean it (e.g. np.nan_to_num)")
    h, w = d.shape
    check_depth_aspect(path, (w, h), image_size)
    box = center_crop_box(w, h)
    img = Image.fromarray(d, mode="F").crop(box).resize((res, res), Image.Resampling.NEAREST)
    return np.array(img, dtype=np.float32)                 # a writable copy


def load_photo(path, depth_path, res):
    """One photo and (when depth_path is given) its depth map, both upright, centre-cropped and
    resized the same way -> (rgb uint8 (res, res, 3), depth float32 (res, res) or None,
    was_upsampled). The one reader that the dataset and sample.py share, so a rotated phone JPEG
    and its depth map line up in both."""
    rgb, small, size = load_rgb(path, res)
    depth = load_depth(depth_path, res, size) if depth_path else None
    return rgb, depth, small


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
    """A folder of photos as a dataset of dict(image, depth, label), decoded lazily.

    image: float (3, res, res) in [-1, 1]; depth: float (1, res, res) z-depth, only when depth
    maps are used; label: int class index, or -1 for an unconditional data set.
    ds[i] is image i; ds[(i, True)] is its mirror image (the training scripts' sampler decides
    which images to mirror, from the seed and the step, so a resumed run mirrors the same ones).

    depth="auto" uses ROOT/depth/ when it exists, True requires it, False ignores it;
    depth_help: the caller's other way on when it is required and missing (an error's tail).
    labels="auto" uses first-level sub-folders as classes when every image is inside one and
    there are at least two; True requires that layout, False gives -1 everywhere.

    Start-up reads only each file's *header* (size, EXIF orientation; a depth map's shape):
    files that are not images are skipped with a count, depth maps of the wrong shape stop
    with one line, and nothing is kept in memory but the file list. Pixels are
    decoded in __getitem__, i.e. in the DataLoader's worker processes, so memory does not grow
    with the number of images. (For many small images, `python data.py pack` is faster still.)
    """

    def __init__(self, root, res, depth="auto", labels="auto", max_images=None, verbose=True,
                 depth_help=""):
        self.root, self.res = root, res
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
            raise UserError(f"{root}: depth maps are required but {root}/depth/ does not exist. "
                            f"Make them: `python data.py depth {root}` ({DEPTH_MODELS})"
                            + (f"; {depth_help}" if depth_help else ""))
        self.use_depth = bool(depth) and has_depth_dir
        depth_files = [depth_path_for(root, f) for f in files] if self.use_depth else []
        missing = [f for f, d in zip(files, depth_files) if d is None]
        if missing:
            raise UserError(f"{root}: {len(missing)} of {len(files)} images have no depth map "
                            f"under {root}/depth/ (first: {missing[0]}); run `python data.py "
                            f"depth {root}` or train without depth")

        # Read every header (a few hundred microseconds a file: 3-4 s for 20k files on a 2-core
        # CPU, measured; parsing is Python work, so threads were slower here, not faster).
        # An unreadable file is skipped, named and counted, never silently.
        sizes, bad = [], []
        for i in tqdm(range(len(files)), desc=f"scanning {root}", unit="img",
                      disable=not verbose, leave=False):
            path = os.path.join(root, files[i])
            try:
                with Image.open(path) as img:
                    sizes.append(upright_size(img))
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                warnings.warn(f"skipping unreadable image {path}: {e}")
                bad.append(i)
                sizes.append(None)
                continue
            if self.use_depth:                        # a bad depth map: UserError, stops
                check_depth_aspect(depth_files[i], depth_size(depth_files[i]), sizes[-1])
        if len(bad) * 2 > len(files):
            raise UserError(f"{root}: {len(bad)} of {len(files)} images could not be read "
                            f"(first: {files[bad[0]]}); check the files (corrupt or not images)")
        if bad:
            warnings.warn(f"{root}: skipped {len(bad)} unreadable image(s) of {len(files)}")
        bad_set = set(bad)
        keep = [i for i in range(len(files)) if i not in bad_set]
        n_small = sum(min(sizes[i]) < res for i in keep)
        if n_small:
            warnings.warn(f"{root}: {n_small} image(s) are smaller than {res}x{res} after "
                          f"cropping and will be upsampled (they will look blurry)")
        self.files = [files[i] for i in keep]
        self.depth_files = [depth_files[i] for i in keep] if self.use_depth else None
        class_of = {c: k for k, c in enumerate(self.classes)}
        self.labels = torch.tensor([class_of.get(f.split(os.sep)[0], -1) for f in self.files],
                                   dtype=torch.long)                                 # (N,)
        self.n_unreadable = 0                 # files that passed the header check, not decoding

    def __len__(self):
        return len(self.files)

    def load(self, i):
        """Decode image i -> (uint8 (res, res, 3), float32 (res, res) or None)."""
        rgb, depth, _ = load_photo(os.path.join(self.root, self.files[i]),
                                   self.depth_files[i] if self.use_depth else None, self.res)
        return rgb, depth

    def __getitem__(self, key):
        i, flip = key if isinstance(key, tuple) else (key, False)
        for j in ((i + k) % len(self) for k in range(len(self))):
            try:
                rgb, depth = self.load(j)
                break
            except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
                # A file whose header was fine but whose pixels are not (e.g. truncated): the
                # batch takes the next image instead, and the swap is named and counted.
                self.n_unreadable += 1
                warnings.warn(f"skipping unreadable image {os.path.join(self.root, self.files[j])}"
                              f": {e} (using the next image; {self.n_unreadable} so far)")
        return make_item(rgb, depth, int(self.labels[j]), flip)


def make_item(rgb, depth, label, flip):
    """uint8 (res, res, 3), depth (res, res) or None -> the dataset's dict of tensors."""
    # np.array copies: a pack's rows are read-only views of a memory map.
    image = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float() / 127.5 - 1
    item = dict(image=image, label=label)                                   # (3, res, res)
    if depth is not None:
        item["depth"] = torch.from_numpy(np.array(depth, dtype=np.float32))[None]  # (1, res, res)
    # A mirrored photo is as plausible as the photo, and mirroring keeps view space intact.
    if flip:
        item = {k: v.flip(-1) if torch.is_tensor(v) else v for k, v in item.items()}
    return item


PACK_META = "pack.json"


class PackedFolder(torch.utils.data.Dataset):
    """The same dataset read from a pack made by `python data.py pack` (section 6): one uint8
    array of images (N, res, res, 3), float16 depth (N, res, res) and int64 labels, all memory-
    mapped .npy files. Reading item i is a copy of 3 res^2 bytes: no decoding, no resizing, and
    the operating system's page cache, not this process, holds what has been read."""

    def __init__(self, root, res, depth="auto", labels="auto", depth_help="", **_):
        with open(os.path.join(root, PACK_META)) as f:
            meta = json.load(f)
        if meta["res"] != res:
            raise UserError(f"{root}: this pack holds {meta['res']} px images but the model "
                            f"wants {res} px; make another: `python data.py pack "
                            f"{meta['source']} --res {res}`")
        if depth is True and not meta["depth"]:
            raise UserError(f"{root}: depth maps are required but this pack has none; pack a "
                            f"folder with depth/ (`python data.py depth {meta['source']}`)"
                            + (f"; {depth_help}" if depth_help else ""))
        self.root, self.res, self.files = root, res, meta["files"]
        self.use_depth = bool(depth) and meta["depth"]
        self.classes = meta["classes"] if labels is not False else []
        self.labels = torch.from_numpy(np.load(os.path.join(root, "labels.npy")))
        if not self.classes:
            self.labels = torch.full_like(self.labels, -1)
        self.arrays = None                  # opened lazily, in whichever process reads them

    def __getstate__(self):
        # DataLoader workers receive a pickled copy of the dataset: send the file names, not
        # the open maps (numpy would pickle a memory map as its whole contents).
        return {**self.__dict__, "arrays": None}

    def __len__(self):
        return len(self.files)

    def __getitem__(self, key):
        i, flip = key if isinstance(key, tuple) else (key, False)
        if self.arrays is None:
            load = lambda name: np.load(os.path.join(self.root, name), mmap_mode="r")
            self.arrays = dict(images=load("images.npy"),
                               depth=load("depth.npy") if self.use_depth else None)
        depth = self.arrays["depth"][i] if self.use_depth else None
        return make_item(self.arrays["images"][i], depth, int(self.labels[i]), flip)


def open_folder(root, res, **kwargs):
    """--data ROOT as a dataset: a pack (ROOT/pack.json) or a folder of image files. Both give
    the same items, with the same options (those of ImageFolder)."""
    if os.path.isfile(os.path.join(root, PACK_META)):
        return PackedFolder(root, res, **kwargs)
    return ImageFolder(root, res, **kwargs)


# ---------------------------------------------------------------------------------------------
# 5. Monocular depth for a folder of photos (the paper uses an off-the-shelf estimator)
# ---------------------------------------------------------------------------------------------
# What each estimator needs, for error messages and --help.
DEPTH_MODELS = ("--model midas: MiDaS DPT-Hybrid through torch.hub, needs `pip install timm`; "
                "--model depth-anything: needs `pip install transformers`; each downloads its "
                "weights once, so it needs internet the first time")


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
        return depth_anything(pipe)
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
            return at_image_size(pred[0], img).numpy(), "disparity"
        return run
    raise UserError(f"unknown depth model {name!r}; choose midas or depth-anything")


def depth_anything(pipe):
    """The estimator around a transformers "depth-estimation" pipeline (Depth Anything): its
    predicted_depth is relative inverse depth (larger = closer), at the photo's size in recent
    versions of transformers and at the network's in older ones."""
    def run(img):
        with torch.no_grad():
            pred = pipe(img)["predicted_depth"].squeeze().float()           # (h, w) disparity
        return at_image_size(pred, img).numpy(), "disparity"
    return run


def at_image_size(pred, img):
    """A prediction (h, w) resized (bicubic) to the PIL image's (H, W), if it is not already."""
    if tuple(pred.shape) == (img.size[1], img.size[0]):
        return pred
    return torch.nn.functional.interpolate(pred[None, None], size=img.size[::-1],
                                           mode="bicubic")[0, 0]


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
        with writing(out, f"the depth map of {rel}", size=d.size * 4, safe=f"the {written} "
                     "depth maps before it are written; free space and run again (it skips "
                     "them)") as tmp:
            np.save(tmp, d.astype(np.float32))
        written += 1
    return written


# ---------------------------------------------------------------------------------------------
# 6. Packing: `python data.py pack DIR --res R` -> DIR/_pack-R, read by PackedFolder
# ---------------------------------------------------------------------------------------------
def pack(root, res, out=None, workers=None, verbose=True):
    """Decode a folder once into memory-mapped arrays (images uint8, depth float16, labels).

    Written into a temporary folder and renamed when complete, so a killed run never leaves a
    pack that later loads half-empty. The default OUT, ROOT/_pack-RES, starts with `_`, so
    later scans of ROOT do not mistake the pack for images. Returns OUT."""
    out = out or os.path.join(root, f"_pack-{res}")
    ds = ImageFolder(root, res, verbose=verbose)
    N = len(ds)
    size = N * res * res * (3 + 2 * ds.use_depth)
    with writing(out, f"the pack of {N} images", size=size,
                 safe=f"{root} itself is untouched; free space and pack again") as tmp:
        os.makedirs(tmp)
        images = open_array(os.path.join(tmp, "images.npy"), np.uint8, (N, res, res, 3))
        depth = (open_array(os.path.join(tmp, "depth.npy"), np.float16, (N, res, res))
                 if ds.use_depth else None)
        workers = min(8, os.cpu_count() or 1) if workers is None else workers
        # Items in file order, decoded by worker processes; each arrives as tensors, goes back
        # to bytes (exact: uint8 -> [-1, 1] -> uint8 round-trips) and is written to the map.
        loader = torch.utils.data.DataLoader(ds, batch_size=64, num_workers=workers)
        i = 0
        for batch in tqdm(loader, desc=f"packing {root}", unit="batch", disable=not verbose):
            n = len(batch["image"])
            images[i:i + n] = ((batch["image"] + 1) * 127.5).round().byte().permute(
                0, 2, 3, 1).numpy()
            if depth is not None:
                depth[i:i + n] = batch["depth"][:, 0].numpy().astype(np.float16)
            i += n
        images.flush()
        if depth is not None:
            depth.flush()
        images = depth = None                 # close the maps before the folder is renamed
        np.save(os.path.join(tmp, "labels.npy"), ds.labels.numpy())
        meta = dict(res=res, n=N, depth=ds.use_depth, classes=ds.classes, files=ds.files,
                    source=os.path.abspath(root))
        with open(os.path.join(tmp, PACK_META), "w") as f:
            json.dump(meta, f)
        # Synthetic scenes (scenes.py) record their camera in scenes.json: it travels with the
        # pack, so a model trained on the pack uses it too (the held-out views stay in ROOT).
        if os.path.isfile(os.path.join(root, "scenes.json")):
            with open(os.path.join(root, "scenes.json")) as f:
                scene_meta = dict(json.load(f), heldout=0)
            with open(os.path.join(tmp, "scenes.json"), "w") as f:
                json.dump(scene_meta, f)
    return out


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("depth", help="monocular depth maps for a folder -> ROOT/depth/")
    d.add_argument("root")
    d.add_argument("--model", default="midas", choices=["midas", "depth-anything"],
                   help=DEPTH_MODELS)
    d.add_argument("--overwrite", action="store_true")
    k = sub.add_parser("pack", help="decode a folder once into memory-mapped arrays "
                       "(fast training on many small images) -> ROOT/_pack-RES")
    k.add_argument("root")
    k.add_argument("--res", type=int, required=True, help="image size the model trains at")
    k.add_argument("--out", help="pack folder (default ROOT/_pack-RES); pass it as --data")
    k.add_argument("--workers", type=int, default=None, help="decoding processes")
    i = sub.add_parser("info", help="load a folder as the training scripts would, and summarise")
    i.add_argument("root")
    i.add_argument("--res", type=int, default=64)
    args = p.parse_args(argv)

    if args.cmd == "depth":
        if not os.path.isdir(args.root):
            raise UserError(f"{args.root}: no such folder")
        n = prepare_depth(args.root, load_estimator(args.model), args.overwrite)
        print(f"wrote {n} depth maps (z-depth, larger = farther; converted from the model's "
              f"disparity) to {os.path.join(args.root, 'depth')}")
    elif args.cmd == "pack":
        if args.res < 8:
            raise UserError(f"--res {args.res}: too small; pack at the model's resolution")
        out = pack(args.root, args.res, args.out, args.workers)
        print(f"wrote {out}: pass --data {out} to the training scripts")
    else:
        ds = open_folder(args.root, args.res)
        print(f"{args.root}: {len(ds)} images at {args.res} px, depth maps: "
              f"{'yes' if ds.use_depth else 'no'}, classes: {ds.classes or 'none'}")


if __name__ == "__main__":
    run_cli(main)
