"""sample.py: every mode writes the files it promises, and what they show is the model's render
(grids, GIFs, the viewer's sprites, in a real browser too); NFS on analytic depth maps; the
interpolation's ends; FID's default real folder; bad inputs."""
import base64
import importlib
import io
import os
import re
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

import autoencoder as ae
import diffusion as D
import render
import sample as S
import training
from data import UserError


def run(ae_path, ldm_path, out, *extra):
    base = ["--ae", ae_path, "--out", str(out), "--steps", "3", "--frames", "4", "--threads", "1"]
    return S.main(base + (["--ldm", ldm_path] if ldm_path else []) + list(extra))


def photo(ae_path, k=0):
    root = os.path.dirname(os.path.dirname(ae_path))            # the fixture's folder
    folder = os.path.join(root, "imgs", "a")
    return os.path.join(folder, sorted(os.listdir(folder))[k])


def png(path):
    return np.asarray(Image.open(path).convert("RGB"))


def test_generate_writes_grids_turntables_and_point_clouds(ae_ckpt, ldm_ckpt, tmp_path):
    out = run(ae_ckpt, ldm_ckpt, tmp_path, "--n", "2", "--export-ply", "--class", "b")
    assert len(out["gifs"]) == 2
    gif = Image.open(out["gifs"][0])
    assert gif.n_frames == 4 and gif.size == (2 * 192, 192)     # RGB | depth, upscaled 16 -> 192
    assert Image.open(tmp_path / "multiview.png").size == (10 * 16, 2 * 16)
    assert os.path.isfile(tmp_path / "turntable_000_strip.png")
    # The grid is the samples' latents decoded and rendered from P0, in order.
    model = ae.load(ae_ckpt)
    p0 = model.render(model.decode(out["z"]), model.P0(2))["image"]
    expect = np.concatenate(list(S.to_uint8(p0)), 1)                          # (16, 32, 3)
    assert np.abs(png(tmp_path / "grid.png").astype(int) - expect).max() <= 1
    # The turntable turns: the camera moves between frames 0 and 1 (yaw 0 -> 25 deg).
    gif.seek(0)
    f0 = np.asarray(gif.convert("RGB")).astype(int)
    gif.seek(1)
    assert np.abs(np.asarray(gif.convert("RGB")).astype(int) - f0).max() > 0
    with open(tmp_path / "points_000.ply") as f:
        lines = f.read().splitlines()
    n = int(next(ln for ln in lines if ln.startswith("element vertex")).split()[-1])
    body = lines[lines.index("end_header") + 1:]
    assert len(body) == n and all(len(ln.split()) == 6 for ln in body)


def test_point_cloud_unprojects_depth_to_the_right_distance():
    """A constant z-depth plane seen from P0 must land on the plane z = depth - radius."""
    class Flat:
        config = dict(radius=2.7, fov_deg=40.0)

        def render(self, planes, cams):
            V = len(cams)
            return dict(image=torch.zeros(V, 3, 8, 8), depth=torch.full((V, 1, 8, 8), 3.0),
                        opacity=torch.ones(V, 1, 8, 8))
    pts, rgb = S.point_cloud(Flat(), torch.zeros(1, 3, 1, 2, 2), yaws=(0.0,))
    assert pts.shape == (64, 3) and rgb.shape == (64, 3)
    assert abs(pts[:, 2] - (3.0 - 2.7)).max() < 1e-5


def read_ply(path):
    """A minimal ASCII PLY reader: vertices (V, 3), colours (V, 3), triangles (T, 3)."""
    lines = open(path).read().splitlines()
    count = {ln.split()[1]: int(ln.split()[2]) for ln in lines if ln.startswith("element")}
    body = lines[lines.index("end_header") + 1:]
    v = np.array([ln.split() for ln in body[:count["vertex"]]], dtype=float)
    f = np.array([ln.split() for ln in body[count["vertex"]:]], dtype=int)
    assert len(f) == count.get("face", 0) and (len(f) == 0 or (f[:, 0] == 3).all())
    return v[:, :3], v[:, 3:], f[:, 1:] if len(f) else f


def test_marching_cubes_puts_a_spheres_surface_at_its_radius():
    pytest.importorskip("skimage", reason="marching cubes needs scikit-image")
    # An off-centre sphere's density (x, y, z axes as density_grid lays them out), sharp but
    # smooth, crossing the level exactly at radius r.
    n, r, centre = 48, 0.5, np.array([0.2, -0.1, 0.3])
    xs = np.linspace(-1, 1, n)
    pts = np.stack(np.meshgrid(xs, xs, xs, indexing="ij"), -1)
    volume = 100 / (1 + np.exp((np.linalg.norm(pts - centre, axis=-1) - r) * 40))
    verts, faces = S.marching_cubes(volume, 50.0)
    dist = np.linalg.norm(verts - centre, axis=1)
    assert len(faces) > 100 and np.abs(dist - r).max() < 2 / (n - 1)    # within one voxel
    with pytest.raises(UserError, match="never crosses the level"):
        S.marching_cubes(volume, 200.0)


def test_a_mesh_from_a_tiny_model_has_coloured_faces(ae_ckpt, tmp_path):
    pytest.importorskip("skimage", reason="marching cubes needs scikit-image")
    model = ae.load(ae_ckpt)
    image, depth = S.load_photo(photo(ae_ckpt), model, torch.device("cpu"))
    planes = model.decode(model.encode(image, depth))
    level = float(np.median(S.density_grid(model, planes, 16)))     # a 2-step model's scale
    path, verts, faces = S.export_mesh(model, planes, str(tmp_path / "m.ply"), 16, level)
    v, rgb, f = read_ply(path)
    assert len(f) > 0 and np.allclose(v, verts, atol=1e-4) and f.max() < len(v)
    assert np.abs(v).max() <= 1 + 1e-6 and ((rgb >= 0) & (rgb <= 255)).all()
    assert Image.open(tmp_path / "m.png").size[0] >= 400                  # its picture


def test_novel_views_of_a_photo_need_no_diffusion_model(ae_ckpt, tmp_path):
    out = run(ae_ckpt, None, tmp_path, "--image", photo(ae_ckpt))
    assert Image.open(out["gif"]).n_frames == 4
    # The views grid starts with the photo itself, as the model reads it.
    first = png(out["png"])[:16, :16]
    assert np.array_equal(first, S.to_uint8(out["image"])[0])
    stem = os.path.splitext(os.path.basename(photo(ae_ckpt)))[0]
    assert Image.open(tmp_path / f"{stem}_pipeline.png").size[0] > 500   # the method's figure


def test_pipeline_figure_shows_each_latent_channel_and_plane_in_its_place():
    """latent_tiles puts channel k at row k // cols, column k % cols of a square-ish grid, each
    on its own range; plane_colours gives one colour per feature vector, shared by the planes."""
    z = torch.zeros(5, 2, 3)
    for k in range(5):
        z[k, k % 2, k % 3] = k + 1.0                        # one bright texel per channel
    tiles = S.latent_tiles(z)                               # 3 columns, 2 rows of 2x3 tiles
    assert tiles.shape == (3, 4, 9)
    for k in range(5):
        r, c = divmod(k, 3)
        tile = tiles[0, 2 * r:2 * r + 2, 3 * c:3 * c + 3]
        assert tile[k % 2, k % 3] == 1 and (tile == -1).sum() == 5    # its own range: -1..1
    assert (tiles[0, 2:, 6:] == -1).all()                   # the empty sixth cell
    planes = torch.zeros(3, 4, 2, 2)
    planes[0, :, 0, 0] = planes[2, :, 1, 1] = torch.tensor([1.0, 2.0, 0.0, 0.0])
    rgb = S.plane_colours(planes)                           # (3, 3, 2, 2)
    assert rgb.shape == (3, 3, 2, 2)
    assert torch.allclose(rgb[0, :, 0, 0], rgb[2, :, 1, 1])             # same vector, same colour
    assert not torch.allclose(rgb[0, :, 0, 0], rgb[1, :, 0, 0])         # another, another colour


def test_interpolation_and_resampling(ae_ckpt, ldm_ckpt, tmp_path):
    out = run(ae_ckpt, ldm_ckpt, tmp_path, "--interp-seeds", "1", "2")
    assert Image.open(out["gif"]).n_frames == 4
    # Seeds: the ends are those seeds' Gaussian noises, and the frames go from one to the other.
    g = torch.randn((1, *out["z"].shape[1:]), generator=torch.Generator().manual_seed(1))
    assert torch.equal(out["ends"][0], g) and not torch.equal(out["ends"][0], out["ends"][1])
    # Photos: each end is the inverse-DDIM noise of its photo, so the two ends differ, and
    # DDIM from that noise (frame 0) comes back near photo a's latent rather than photo b's.
    a, b = photo(ae_ckpt, 0), photo(ae_ckpt, 1)
    out = run(ae_ckpt, ldm_ckpt, tmp_path, "--interp", a, b, "--steps", "20")
    model, ldm = D.load_models(ae_ckpt, ldm_ckpt, torch.device("cpu"))
    za, zb = (model.encode(S.load_photo(p, model, "cpu")[0]) for p in (a, b))
    assert torch.allclose(out["ends"][0], D.ddim_invert(ldm, za, 20))
    assert (out["z"][0] - za).norm() < (out["z"][0] - zb).norm()
    assert (out["z"][-1] - zb).norm() < (out["z"][-1] - za).norm()
    path = run(ae_ckpt, ldm_ckpt, tmp_path, "--resample", photo(ae_ckpt), "--strength",
               "0.2,0.8", "--n", "3")
    assert Image.open(path).size == ((3 + 2) * 16, 2 * 16)  # input | recon | 3 variants, 2 rows


def test_fid_compares_with_the_training_folder_by_default(ae_ckpt, ldm_ckpt, tmp_path,
                                                         monkeypatch):
    """Without --real, FID/KID use the folder the autoencoder was trained on (a stand-in for
    torch-fidelity records what it is asked; nothing is downloaded)."""
    calls = []

    def calculate_metrics(input1, input2, **kw):
        calls.append((input1, input2))
        return dict(frechet_inception_distance=1.0, kernel_inception_distance_mean=0.5)
    monkeypatch.setitem(sys.modules, "torch_fidelity",
                        types.SimpleNamespace(calculate_metrics=calculate_metrics))
    out = run(ae_ckpt, ldm_ckpt, tmp_path, "--n", "2", "--metrics")
    assert calls and calls[0][1] == ae.load(ae_ckpt).trained_on
    assert len(os.listdir(calls[0][0])) == 2 and out["metrics"]["fid"] == 1.0


# ------------------------------------------------------------------------------ the viewer
@pytest.fixture(scope="module")
def viewer(ae_ckpt, ldm_ckpt, tmp_path_factory):
    out = tmp_path_factory.mktemp("viewer")
    result = run(ae_ckpt, ldm_ckpt, out, "--n", "2", "--viewer")
    return str(out / "viewer.html"), result


def sprites(html):
    """{img id: uint8 array} of the data: URI images embedded in the page."""
    found = re.findall(r'<img id="(\w+)" alt="" src="data:image/png;base64,([^"]+)">', html)
    return {k: np.asarray(Image.open(io.BytesIO(base64.b64decode(v))).convert("RGB"))
            for k, v in found}


def test_viewer_is_offline_and_holds_the_rendered_grid(viewer, ae_ckpt):
    path, result = viewer
    html = open(path).read()
    # Nothing to fetch: no URL, no external script, style sheet or font (outside the images'
    # own base64 data, which may contain any letters).
    text = re.sub(r"(data:image/png;base64,)[A-Za-z0-9+/=]+", r"\1", html)
    assert not re.search(r"https?:|//[a-z]|<link|@import|url\(|src=\"(?!data:)", text, re.I)
    imgs = sprites(html)
    assert sorted(imgs) == ["depth0", "depth1", "rgb0", "rgb1"]
    Y, P = len(S.VIEWER_YAWS), len(S.VIEWER_PITCHES)
    for im in imgs.values():
        assert im.shape == (P * 16, Y * 16, 3)
    # A known cell is the renderer's output for that camera: sample 1, pitch row 1, yaw col 11.
    model = ae.load(ae_ckpt)
    planes = model.decode(result["z"][1:2])
    cam = render.orbit_camera(S.VIEWER_YAWS[11:12], S.VIEWER_PITCHES[1:2],
                              model.config["radius"])
    expect = S.to_uint8(ae.render_frames(model, planes, cam)[0])[0].astype(int)
    cell = lambda j, i: imgs["rgb1"][16 * j:16 * j + 16, 16 * i:16 * i + 16].astype(int)
    # (to the last bit but for float sums: the sprite rendered 16 views per batch, this one)
    assert np.abs(cell(1, 11) - expect).max() <= 1
    assert all(np.abs(cell(j, i) - expect).max() > 1 for j, i in [(1, 10), (1, 12), (0, 11)])
    # and depth is not a flat map
    assert imgs["depth1"].std() > 1


BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which(
    "google-chrome")


def screenshot(url, path):
    subprocess.run([BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=640,720", f"--screenshot={path}", url],
                   capture_output=True, timeout=120, check=True)
    return np.asarray(Image.open(path).convert("RGB")).astype(int)


@pytest.mark.skipif(BROWSER is None, reason="no headless browser: apt-get install chromium")
def test_viewer_renders_in_a_real_browser(viewer, tmp_path):
    """Load the page in headless Chromium from two URL fragments: it is not blank, and the two
    views differ where the scene is drawn."""
    url = "file://" + os.path.abspath(viewer[0])
    a = screenshot(url + "#yaw=-30&pitch=15&sample=0", tmp_path / "a.png")
    b = screenshot(url + "#yaw=30&pitch=-15&sample=1&depth=1", tmp_path / "b.png")
    assert a.shape == b.shape and a.std() > 10
    assert np.abs(a - b).mean() > 1


def test_nfs_of_flat_and_ramp_depth():
    flat = torch.full((2, 1, 32, 32), 2.0)
    assert abs(S.nfs(flat, 1.0, 5.0) - 1.0) < 1e-6
    ramp = torch.linspace(1.0, 5.0, 64 * 64).view(1, 1, 64, 64)
    assert abs(S.nfs(ramp, 1.0, 5.0) - 64) < 0.5
    half = torch.cat([torch.full((1, 1, 16, 32), 2.0), torch.full((1, 1, 16, 32), 4.0)], 2)
    assert abs(S.nfs(half, 1.0, 5.0) - 2.0) < 1e-5           # two equal bins: exp(ln 2)


def test_bad_inputs_are_one_clear_error(ae_ckpt, ldm_ckpt, tmp_path):
    with pytest.raises(UserError, match="no such checkpoint"):
        run(str(tmp_path / "nope.pt"), ldm_ckpt, tmp_path)
    with pytest.raises(UserError, match="--ldm is required"):
        run(ae_ckpt, None, tmp_path)
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="cannot read this image"):
        run(ae_ckpt, None, tmp_path, "--image", str(bad))
    with pytest.raises(UserError, match="no such image"):
        run(ae_ckpt, None, tmp_path, "--image", str(tmp_path / "missing.png"))
    other = tmp_path / "other_ae.pt"
    ck = torch.load(ae_ckpt, weights_only=True)
    ck["step"] += 1
    training.save_checkpoint(str(other), ck)
    with pytest.raises(UserError, match="latents of another autoencoder"):
        run(str(other), ldm_ckpt, tmp_path)
    with pytest.raises(UserError, match="this model knows a, b"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--class", "zebra")
    with pytest.raises(UserError, match="--frames must be at least 2"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--frames", "1")
    with pytest.raises(UserError, match="strength"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--resample", photo(ae_ckpt), "--strength", "2")
    with pytest.raises(UserError, match="--eta 1.0 needs --sampler ddim"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--eta", "1")


def test_the_default_sampler_is_dpm_solver_in_15_steps():
    args = S.get_args(["--ae", "a.pt"])
    assert (args.sampler, args.steps) == ("dpm++", 15)
    assert S.get_args(["--ae", "a.pt", "--sampler", "ddim"]).steps == 50
    assert S.get_args(["--ae", "a.pt", "--sampler", "ddim", "--steps", "7"]).steps == 7


@pytest.mark.slow
def test_demo_end_to_end_with_shortened_presets(tmp_path, monkeypatch):
    """The demo's whole path (plan, scenes, both stages, sampling, viewer, evaluation, summary)
    with the tiny presets cut to a few steps; about a minute on 2 cores, so marked slow."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setitem(ae.PRESETS, "tiny", dict(ae.PRESETS["tiny"], steps=4, n_scenes=12,
                                                 every=2))
    monkeypatch.setitem(D.PRESETS, "tiny", dict(D.PRESETS["tiny"], steps=4, every=2))
    out = S.main(["--demo", "--frames", "4", "--n", "2", "--steps", "3"])
    assert set(out["took"]) == set(out["estimate"]) == {"scenes", "autoencoder", "diffusion",
                                                        "sampling"}
    assert all(v > 0 for v in out["estimate"].values())
    assert out["eval"]["scenes"] == 64 and out["metrics"]["n"] == 2
    assert len(sprites(open(out["viewer"]).read())) == 2 * 3        # 2 samples + the photo
    again = S.main(["--demo", "--frames", "4", "--n", "2", "--steps", "3"])   # resumes: no
    assert "scenes" not in again["took"]                                  # scenes to render
    assert again["estimate"]["autoencoder"] == 0 == again["estimate"]["diffusion"]


@pytest.mark.parametrize("script", ["autoencoder", "diffusion", "sample"])
def test_help_shows_real_defaults_and_never_none(script, capsys):
    """A default of None is filled in later (from the preset, or as the help says); --help
    must not print it as "(default: None)", and still shows the defaults that are real."""
    module = importlib.import_module(script)
    with pytest.raises(SystemExit):
        module.get_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text and "(default: " in text
    assert script == "sample" or "take the preset's value" in text
