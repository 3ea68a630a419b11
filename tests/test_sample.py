"""sample.py: every mode writes the files it promises, NFS on analytic depth maps, bad inputs."""
import os

import pytest
import torch
from PIL import Image

import diffusion as D
import sample as S
from data import UserError
from test_diffusion import LDM_MICRO, ae_ckpt  # noqa: F401  (the micro autoencoder fixture)


@pytest.fixture(scope="module")
def ldm_ckpt(ae_ckpt, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp("ldm")
    D.train(D.get_args(LDM_MICRO + ["--ae", ae_ckpt, "--out", str(out), "--steps", "2",
                                    "--every", "2"]))
    return str(out / "ckpt.pt")


def run(ae_path, ldm_path, out, *extra):
    base = ["--ae", ae_path, "--out", str(out), "--steps", "3", "--frames", "4", "--threads", "1"]
    return S.main(base + (["--ldm", ldm_path] if ldm_path else []) + list(extra))


def photo(ae_path):
    root = os.path.dirname(os.path.dirname(ae_path))            # the fixture's folder
    folder = os.path.join(root, "imgs", "a")
    return os.path.join(folder, sorted(os.listdir(folder))[0])


def test_generate_writes_grids_turntables_and_point_clouds(ae_ckpt, ldm_ckpt, tmp_path):  # noqa
    out = run(ae_ckpt, ldm_ckpt, tmp_path, "--n", "2", "--export-ply", "--class", "b")
    assert len(out["gifs"]) == 2
    gif = Image.open(out["gifs"][0])
    assert gif.n_frames == 4 and gif.size == (2 * 192, 192)     # RGB | depth, upscaled 16 -> 192
    assert Image.open(tmp_path / "multiview.png").size == (10 * 16, 2 * 16)
    assert Image.open(tmp_path / "grid.png").size == (2 * 16, 16)
    assert os.path.isfile(tmp_path / "turntable_000_strip.png")
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


def test_novel_views_of_a_photo_need_no_diffusion_model(ae_ckpt, tmp_path):  # noqa: F811
    gif = run(ae_ckpt, None, tmp_path, "--image", photo(ae_ckpt))
    assert Image.open(gif).n_frames == 4
    assert os.path.isfile(gif.replace("_turntable.gif", "_views.png"))


def test_interpolation_and_resampling(ae_ckpt, ldm_ckpt, tmp_path):  # noqa: F811
    gif = run(ae_ckpt, ldm_ckpt, tmp_path, "--interp-seeds", "1", "2")
    assert Image.open(gif).n_frames == 4
    gif = run(ae_ckpt, ldm_ckpt, tmp_path, "--interp", photo(ae_ckpt), photo(ae_ckpt))
    assert Image.open(gif).n_frames == 4
    png = run(ae_ckpt, ldm_ckpt, tmp_path, "--resample", photo(ae_ckpt), "--strength",
              "0.2,0.8", "--n", "3")
    assert Image.open(png).size == ((3 + 2) * 16, 2 * 16)   # input | recon | 3 variants, 2 rows


def test_nfs_of_flat_and_ramp_depth():
    flat = torch.full((2, 1, 32, 32), 2.0)
    assert abs(S.nfs(flat, 1.0, 5.0) - 1.0) < 1e-6
    ramp = torch.linspace(1.0, 5.0, 64 * 64).view(1, 1, 64, 64)
    assert abs(S.nfs(ramp, 1.0, 5.0) - 64) < 0.5
    half = torch.cat([torch.full((1, 1, 16, 32), 2.0), torch.full((1, 1, 16, 32), 4.0)], 2)
    assert abs(S.nfs(half, 1.0, 5.0) - 2.0) < 1e-5           # two equal bins: exp(ln 2)


def test_bad_inputs_are_one_clear_error(ae_ckpt, ldm_ckpt, tmp_path):  # noqa: F811
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
    torch.save(ck, other)
    with pytest.raises(UserError, match="latents of another autoencoder"):
        run(str(other), ldm_ckpt, tmp_path)
    with pytest.raises(UserError, match="this model knows a, b"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--class", "zebra")
    with pytest.raises(UserError, match="strength"):
        run(ae_ckpt, ldm_ckpt, tmp_path, "--resample", photo(ae_ckpt), "--strength", "2")
