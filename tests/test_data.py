"""data.py: every kind of image file, depth maps, labels, bad input, one-line CLI errors."""
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import ImageFolder, UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def save(path, arr, mode=None):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    (Image.fromarray(arr, mode) if mode else Image.fromarray(arr)).save(path)


# ------------------------------------------------------------------------------ file modes
def test_modes_become_rgb(tmp_path):
    rgba = np.zeros((20, 30, 4), np.uint8)
    rgba[..., 0] = 255                                # red, but fully transparent...
    rgba[:, :15, 3] = 255                             # ...except the left half
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    out, small, _ = data.load_rgb(str(tmp_path / "a.png"), 10)
    assert out.shape == (10, 10, 3) and out.dtype == np.uint8 and not small
    assert (out[:, 0] == [255, 0, 0]).all()           # opaque red stays red
    assert (out[:, -1] == [255, 255, 255]).all()      # transparent becomes the white background

    gray16 = np.full((16, 16), 65535, np.uint16)
    gray16[:, :8] = 0
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    out, *_ = data.load_rgb(str(tmp_path / "g16.png"), 16)
    assert (out[:, 0] == 0).all() and (out[:, -1] == 255).all()   # not clipped to all-white

    Image.fromarray(np.full((12, 12), 77, np.uint8), "L").save(tmp_path / "l.jpg")
    out, *_ = data.load_rgb(str(tmp_path / "l.jpg"), 12)
    assert np.abs(out.astype(int) - 77).max() <= 2 and out.shape == (12, 12, 3)

    pal = Image.fromarray(np.full((12, 12, 3), (10, 200, 30), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE)
    pal.save(tmp_path / "p.bmp")
    out, *_ = data.load_rgb(str(tmp_path / "p.bmp"), 12)
    assert np.abs(out.astype(int) - [10, 200, 30]).max() <= 8


def test_center_crop_and_upsample_flag(tmp_path):
    img = np.zeros((40, 80, 3), np.uint8)
    img[:, 20:60] = 255                               # the centred square is all white
    Image.fromarray(img).save(tmp_path / "wide.png")
    out, small, _ = data.load_rgb(str(tmp_path / "wide.png"), 16)
    assert out.min() >= 250 and not small
    out, small, _ = data.load_rgb(str(tmp_path / "wide.png"), 64)
    assert small and out.shape == (64, 64, 3)


# -------------------------------------------------------------------------------- the folder
def make_folder(root, n=4, size=24, classes=None, depth=False):
    rng = np.random.default_rng(0)
    names = []
    for i in range(n):
        sub = f"{classes[i % len(classes)]}/" if classes else ""
        names.append(f"{sub}img{i}")
        save(os.path.join(root, f"{sub}img{i}.png"),
             rng.integers(0, 255, (size, size, 3), dtype=np.uint8))
        if depth:
            d = os.path.join(root, "depth", f"{sub}img{i}.npy")
            os.makedirs(os.path.dirname(d), exist_ok=True)
            np.save(d, rng.uniform(1, 5, (size, size)).astype(np.float32))
    return names


def test_folder_items(tmp_path):
    make_folder(tmp_path, n=5, depth=True)
    ds = ImageFolder(str(tmp_path), 16, verbose=False)
    item = ds[0]
    assert len(ds) == 5 and ds.use_depth and ds.classes == []
    assert item["image"].shape == (3, 16, 16) and item["image"].dtype == torch.float32
    assert -1 <= item["image"].min() and item["image"].max() <= 1
    assert item["depth"].shape == (1, 16, 16) and item["label"] == -1
    # Nearest-neighbour resizing: no depth value is invented between two others.
    src = np.load(tmp_path / "depth" / "img0.npy")
    assert np.isin(item["depth"].numpy(), src).all()
    assert "depth" not in ImageFolder(str(tmp_path), 16, depth=False, verbose=False)[0]


def test_class_labels_from_subfolders(tmp_path):
    make_folder(tmp_path, n=6, classes=["cat", "dog", "emu"])
    ds = ImageFolder(str(tmp_path), 8, verbose=False)
    assert ds.classes == ["cat", "dog", "emu"]
    assert sorted(ds.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    assert ds[ds.files.index(os.path.join("dog", "img1.png"))]["label"] == 1
    assert ImageFolder(str(tmp_path), 8, labels=False, verbose=False)[0]["label"] == -1


def test_mirror_key_flips_image_and_depth_together(tmp_path):
    make_folder(tmp_path, n=1, depth=True)
    ds = ImageFolder(str(tmp_path), 16, verbose=False)
    plain, mirrored = ds[0], ds[(0, True)]
    assert torch.equal(ds[(0, False)]["image"], plain["image"])
    assert not torch.equal(mirrored["image"], plain["image"])
    assert torch.equal(mirrored["image"], plain["image"].flip(-1))
    assert torch.equal(mirrored["depth"], plain["depth"].flip(-1))


def test_pack_gives_the_same_items_as_the_folder(tmp_path):
    make_folder(tmp_path / "f", n=5, classes=["cat", "dog"], depth=True)
    ds = ImageFolder(str(tmp_path / "f"), 16, verbose=False)
    out = data.pack(str(tmp_path / "f"), 16, workers=0, verbose=False)
    assert out == str(tmp_path / "f" / "_pack-16") and not any(
        ".tmp" in f for f in os.listdir(tmp_path / "f"))
    packed = data.open_folder(out, 16)
    assert isinstance(packed, data.PackedFolder) and len(packed) == 5
    assert packed.classes == ["cat", "dog"] and packed.files == ds.files
    # The folder is still scanned as 5 images: the pack (an _ folder) is not mistaken for more.
    assert len(ImageFolder(str(tmp_path / "f"), 16, verbose=False)) == 5
    for key in (0, (3, True)):
        a, b = ds[key], packed[key]
        assert torch.equal(a["image"], b["image"]) and a["label"] == b["label"]
        # depth is stored as float16: 3 significant digits
        assert torch.allclose(a["depth"], b["depth"], rtol=1e-3)
    # A pack is read through memory maps opened lazily: pickling it (what a DataLoader worker
    # receives) carries file names, not the arrays.
    import pickle
    assert len(pickle.dumps(packed)) < 4000
    with pytest.raises(UserError, match="holds 16 px images.*--res 8"):
        data.open_folder(out, 8)


def test_a_loader_with_workers_reads_a_folder_lazily(tmp_path):
    """Workers decode the items; the dataset itself holds file names, not pixels."""
    import pickle
    make_folder(tmp_path, n=6, depth=True)
    ds = ImageFolder(str(tmp_path), 16, verbose=False)
    assert len(pickle.dumps(ds)) < 4000 and not hasattr(ds, "images")
    loader = torch.utils.data.DataLoader(ds, batch_size=3, num_workers=2)
    batches = list(loader)
    assert [b["image"].shape for b in batches] == [(3, 3, 16, 16)] * 2
    assert torch.equal(batches[1]["image"][2], ds[5]["image"])


def test_bad_folders(tmp_path):
    with pytest.raises(UserError, match="no such folder"):
        ImageFolder(str(tmp_path / "nope"), 16)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("hi")
    with pytest.raises(UserError, match=r"no images found.*\.jpg"):
        ImageFolder(str(tmp_path / "empty"), 16)


def test_corrupt_files_are_counted(tmp_path):
    make_folder(tmp_path, n=4)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    good = open(tmp_path / "img0.png", "rb").read()
    (tmp_path / "truncated.png").write_bytes(good[: len(good) // 2])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(str(tmp_path), 16, verbose=False)
    text = " ".join(str(w.message) for w in caught)
    # The header check at start-up finds the file that is not an image...
    assert len(ds) == 5
    assert "broken.png" in text and "skipped 1" in text
    # ...the truncated one fails when decoded: it is named, counted, and the next image
    # stands in for it (a training run never stops on one bad file, nor hides it).
    i = ds.files.index("truncated.png")
    with pytest.warns(UserWarning, match="truncated.png.*using the next image; 1 so far"):
        item = ds[i]
    assert torch.equal(item["image"], ds[(i + 1) % len(ds)]["image"])
    for i in range(5):                                 # now most files are bad: stop
        (tmp_path / f"junk{i}.jpg").write_bytes(b"junk")
    with pytest.raises(UserError, match="6 of 11 images could not be read"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ImageFolder(str(tmp_path), 16, verbose=False)


def test_small_images_warn_with_a_count(tmp_path):
    make_folder(tmp_path, n=3, size=8)
    with pytest.warns(UserWarning, match="3 image.*upsampled"):
        ImageFolder(str(tmp_path), 16, verbose=False)


def test_bad_depth_maps(tmp_path):
    make_folder(tmp_path, n=3, depth=True)
    os.remove(tmp_path / "depth" / "img2.npy")
    with pytest.raises(UserError, match="1 of 3 images have no depth map.*img2"):
        ImageFolder(str(tmp_path), 16, verbose=False)
    np.save(tmp_path / "depth" / "img2.npy", np.full((24, 24), np.nan, np.float32))
    ds = ImageFolder(str(tmp_path), 16, verbose=False)     # NaNs are only seen when decoded
    with pytest.raises(UserError, match="img2.npy.*NaN"):
        ds[2]
    # ...in a DataLoader worker too: the command line still prints the one original line.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "data.py"), "pack", str(tmp_path),
                        "--res", "16", "--workers", "1"], capture_output=True, text=True)
    last = p.stderr.strip().splitlines()[-1]                 # (above it: progress bars)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert last.startswith("error: ") and "img2.npy: depth map contains NaN" in last
    assert not [f for f in os.listdir(tmp_path) if "pack" in f]   # and no half pack is left
    np.save(tmp_path / "depth" / "img2.npy", np.ones((24, 48), np.float32))
    with pytest.raises(UserError, match="img2.npy.*aspect"):
        ImageFolder(str(tmp_path), 16, verbose=False)
    np.save(tmp_path / "depth" / "img2.npy", np.ones((2, 24, 24), np.float32))
    with pytest.raises(UserError, match="img2.npy.*single-channel"):
        ImageFolder(str(tmp_path), 16, verbose=False)
    (tmp_path / "depth" / "img2.npy").write_bytes(b"not an npy file")    # the depth file is named
    with pytest.raises(UserError, match="img2.npy: cannot read this depth map"):
        ImageFolder(str(tmp_path), 16, verbose=False)
    with pytest.raises(UserError, match="depth maps are required"):
        make_folder(tmp_path / "nodepth", n=1)
        ImageFolder(str(tmp_path / "nodepth"), 16, depth=True, verbose=False)


def test_depth_png16_is_read(tmp_path):
    make_folder(tmp_path, n=1)
    d = np.tile(np.arange(24, dtype=np.uint16) * 1000, (24, 1))
    os.makedirs(tmp_path / "depth")
    Image.fromarray(d).save(tmp_path / "depth" / "img0.png")
    item = ImageFolder(str(tmp_path), 12, verbose=False)[0]
    assert item["depth"].shape == (1, 12, 12)
    assert (item["depth"][0, :, 1:] > item["depth"][0, :, :-1]).all()


# ------------------------------------------------------------------------ depth preparation
def test_prepare_depth_with_a_stand_in_estimator(tmp_path):
    """The estimator returns disparity (larger = closer), like MiDaS; the files on disk must be
    depth (larger = farther), and the folder must then load with depth."""
    make_folder(tmp_path, n=3, size=20, classes=["a", "b"])
    calls = []

    def fake_estimator(img):
        calls.append(img.size)
        disp = np.tile(np.linspace(4.0, 1.0, img.size[0]), (img.size[1], 1))  # closer on the left
        return disp, "disparity"
    assert data.prepare_depth(str(tmp_path), fake_estimator) == 3
    assert len(calls) == 3 and data.prepare_depth(str(tmp_path), fake_estimator) == 0
    d = np.load(tmp_path / "depth" / "a" / "img0.npy")
    assert d.shape == (20, 20) and d.dtype == np.float32
    assert (np.diff(d, axis=1) > 0).all()               # farther to the right
    assert abs(d.min() - 1.0) < 1e-6                     # nearest point normalised to 1
    ds = ImageFolder(str(tmp_path), 16, verbose=False)
    assert ds.use_depth and ds.classes == ["a", "b"]


def test_disparity_to_depth_clamps_sky():
    d = data.disparity_to_depth(np.array([[2.0, 1.0, 0.0]]))
    assert np.allclose(d, [[1.0, 2.0, 100.0]])


def test_cli_errors_are_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    for script, *args in (["data.py", "info", str(tmp_path / "empty")],
                          ["scenes.py", str(tmp_path / "x"), "--n", "0"],
                          ["scenes.py", str(tmp_path / "y"), "--heldout", "1", "--views", "left"]):
        p = subprocess.run([sys.executable, os.path.join(ROOT, script), *args],
                           capture_output=True, text=True)
        assert p.returncode == 2, p.stderr
        assert "Traceback" not in p.stderr and p.stderr.strip().startswith("error:")
        assert len(p.stderr.strip().splitlines()) == 1


def test_every_script_flushes_denormals_to_zero():
    torch.set_flush_denormal(False)                          # as before any script ran
    tiny = torch.tensor([1e-39])                             # a float32 denormal
    seen = []
    try:
        data.run_cli(lambda: seen.append((tiny * 1.0).item()))
    finally:
        flushing = torch.set_flush_denormal(False)           # leave the other tests as found
    if not flushing:
        pytest.skip("this CPU cannot flush denormals")
    assert seen == [0.0] and (tiny * 1.0).item() > 0         # flushed inside, not after


# ------------------------------------------------------------------------- phone photos
def test_exif_rotated_jpeg_and_its_depth_map_line_up_in_data_and_sample(tmp_path):
    """A phone JPEG stored sideways (40 wide, 20 high) with EXIF orientation 6 is shown upright
    (20 wide, 40 high). Its depth map is upright too. data.py and sample.py must both turn the
    picture, accept the map (same aspect ratio) and return the same tensors."""
    import types

    import sample as S
    stored = np.zeros((20, 40, 3), np.uint8)
    stored[:, :20] = (255, 0, 0)                      # stored left half red ...
    stored[:, 20:] = (0, 0, 255)                      # ... right half blue
    exif = Image.Exif()
    exif[0x0112] = 6                                  # "rotate 90 degrees clockwise to view"
    (tmp_path / "depth").mkdir()
    Image.fromarray(stored).save(tmp_path / "phone.jpg", exif=exif, quality=95)
    # Upright, the stored left half is the top half; the depth map grows from top to bottom.
    depth = np.repeat(np.linspace(1.0, 5.0, 40, dtype=np.float32)[:, None], 20, 1)   # (40, 20)
    np.save(tmp_path / "depth" / "phone.npy", depth)
    ds = ImageFolder(str(tmp_path), 16, depth=True, verbose=False)
    item = ds[0]
    img = item["image"]                                                    # (3, 16, 16)
    assert img[0, :6].mean() > 0.8 and img[2, :6].mean() < -0.8           # top: red
    assert img[2, -6:].mean() > 0.8 and img[0, -6:].mean() < -0.8         # bottom: blue
    d = item["depth"][0]
    assert (d[1:, 0] >= d[:-1, 0]).all() and d[-1, 0] > d[0, 0]           # farther downwards
    model = types.SimpleNamespace(config=dict(res=16))                      # what it reads
    image, dep = S.load_photo(str(tmp_path / "phone.jpg"), model, "cpu")
    assert torch.equal(image[0], img) and torch.equal(dep[0], item["depth"])


def test_depth_anything_through_transformers_with_a_random_small_model(tmp_path):
    """`data.py depth --model depth-anything`'s code on the real transformers classes, built
    from a small config with random weights (nothing downloaded): one depth map per photo,
    upright and at the photo's size (an EXIF-rotated JPEG included), disparity turned into
    depth, where the autoencoder looks for it; then the autoencoder trains on the folder."""
    transformers = pytest.importorskip("transformers", reason="needs `pip install transformers`")
    import autoencoder as ae
    from conftest import MICRO
    backbone = transformers.Dinov2Config(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        patch_size=14, image_size=56, out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False)
    config = transformers.DepthAnythingConfig(
        backbone_config=backbone, neck_hidden_sizes=[8, 16, 32, 32], fusion_hidden_size=16,
        head_hidden_size=8, reassemble_hidden_size=32, patch_size=14)
    torch.manual_seed(0)
    model = transformers.DepthAnythingForDepthEstimation(config).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")                     # (no torchvision: PIL back end)
        processor = transformers.DPTImageProcessor(size={"height": 56, "width": 56},
                                                   keep_aspect_ratio=True, ensure_multiple_of=14)
        pipe = transformers.pipeline("depth-estimation", model=model, image_processor=processor)
    estimator = data.depth_anything(pipe)
    rng = np.random.default_rng(0)
    for i in range(3):                                      # 70 x 40 photos
        Image.fromarray(rng.integers(0, 255, (40, 70, 3), np.uint8)).save(tmp_path / f"p{i}.png")
    exif = Image.Exif()
    exif[0x0112] = 6                                        # stored 70 x 40, upright 40 x 70
    Image.fromarray(rng.integers(0, 255, (40, 70, 3), np.uint8)).save(
        tmp_path / "phone.jpg", exif=exif)
    assert data.prepare_depth(str(tmp_path), estimator) == 4
    for name, shape in (("p0", (40, 70)), ("phone", (70, 40))):
        d = np.load(tmp_path / "depth" / f"{name}.npy")
        path = tmp_path / (name + (".jpg" if name == "phone" else ".png"))
        with Image.open(path) as img:
            upright = data.to_rgb(data.ImageOps.exif_transpose(img))
        disp = estimator(upright)[0]
        assert d.shape == shape == disp.shape and d.dtype == np.float32
        assert np.allclose(d, data.disparity_to_depth(disp))        # larger = farther
    ae.train(ae.get_args(MICRO + ["--data", str(tmp_path), "--out", str(tmp_path / "run"),
                                  "--steps", "2", "--every", "2", "--adv-weight", "0",
                                  "--no-depth-metric"]))
    assert os.path.isfile(tmp_path / "run" / "ckpt.pt")
