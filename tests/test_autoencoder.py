"""autoencoder.py: shapes, losses against closed forms, training that learns, exact resume, DDP."""
import errno
import io
import math
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import torch.multiprocessing as mp

import autoencoder as ae
import data as data_mod
import render
import scenes as scenes_mod
import training
from conftest import ROOT, micro_args
from data import UserError

def test_shapes_and_dtypes_of_the_tiny_and_small_presets():
    args = ae.get_args(["--preset", "tiny", "--fov-deg", "40", "--radius", "2.7"])
    model = ae.AutoEncoder(ae.model_config(args)).eval()
    image = torch.rand(2, 3, 32, 32) * 2 - 1
    z = model.encode(image)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    planes = model.decode(z)
    assert planes.shape == (2, 3, 16, 32, 32)
    out = model.render(planes, model.P0(2), with_distortion=True)
    # tiny: 32 px out of a 16 px volume render (the maps come at the render's resolution)
    assert out["image"].shape == (2, 3, 32, 32) and out["raw"].shape == (2, 3, 16, 16)
    assert out["depth"].shape == out["opacity"].shape == out["distortion"].shape == (2, 1, 16, 16)
    assert out["distortion"].min() >= 0 and model.upsampler.factor == 2
    assert model.render(planes, model.P0(2), res=16)["image"].shape == (2, 3, 16, 16)
    base = ae.AutoEncoder(ae.model_config(ae.get_args(["--fov-deg", "40", "--radius", "2.7"])))
    assert base.upsampler.factor == 4 and base.config["plane_res"] == 128
    # small: 64 px out of a 32 px volume render, and an 8-channel latent on tiny's 8x8 grid
    small = ae.AutoEncoder(ae.model_config(ae.get_args(["--preset", "small", "--fov-deg", "40",
                                                        "--radius", "2.7"]))).eval()
    z = small.encode(torch.rand(2, 3, 64, 64) * 2 - 1)
    assert z.shape == (2, 8, 8, 8)
    out = small.render(small.decode(z), small.P0(2))
    assert out["image"].shape == (2, 3, 64, 64) and out["raw"].shape == (2, 3, 32, 32)
    assert out["depth"].shape == (2, 1, 32, 32) and small.upsampler.factor == 2


def test_centre_plane_layout_fills_the_outer_ring_from_the_border():
    args = ae.get_args(["--preset", "tiny", "--fov-deg", "40", "--radius", "2.7"])
    model = ae.AutoEncoder(ae.model_config(args)).eval()
    planes = model.decode(torch.randn(2, 4, 8, 8))                       # R = 32, centre 8:24
    assert planes.shape == (2, 3, 16, 32, 32)
    assert torch.equal(planes[..., :8, 8:24], planes[..., 8:9, 8:24].expand(-1, -1, -1, 8, -1))
    assert torch.equal(planes[..., 8:24, 24:], planes[..., 8:24, 23:24].expand(-1, -1, -1, -1, 8))
    assert not torch.equal(planes[..., 8, 8:24], planes[..., 9, 8:24])  # the centre is not


def test_diff_augment_shifts_and_cuts_colour_and_depth_together_and_passes_gradients():
    torch.manual_seed(0)
    B, H = 16, 32
    v = torch.arange(B * H * H, dtype=torch.float32).view(B, 1, H, H) + 1       # unique, > 0
    x = torch.cat([v, -v], 1).requires_grad_()          # "colour" and "depth" channels
    out = ae.diff_augment(x)
    assert out.shape == x.shape and torch.equal(out[:, 1], -out[:, 0])
    shifts = set()
    for i in range(B):
        ys, xs = torch.nonzero(out[i, 0], as_tuple=True)
        src = out[i, 0, ys, xs].long() - 1 - i * H * H                   # where each came from
        dy, dx = ys - src // H, xs - src % H
        assert (dy == dy[0]).all() and (dx == dx[0]).all()               # one rigid shift
        assert abs(dy[0]) <= 4 and abs(dx[0]) <= 4                       # up to 1/8 of 32 px
        shifts.add((dy[0].item(), dx[0].item()))
        zeros = H * H - len(ys)             # the 16 px square (at least its 8 x 8 quarter
        assert 64 <= zeros <= 16 * 16 + 2 * 4 * H   # inside) plus the border shifted in
    assert len(shifts) > 4                                               # fresh per image
    out.sum().backward()                    # each kept pixel's gradient reaches its source
    assert torch.equal(x.grad.sum(), (out[:, :1] != 0).sum().float() * 2)
    assert set(x.grad.unique().tolist()) == {0.0, 1.0}
    d = ae.Discriminator(32, 8, augment=True)
    x = torch.randn(2, 4, 32, 32)
    assert not torch.equal(d(x), d(x))      # D sees a new augmentation on every call
    d.augment = False
    assert torch.equal(d(x), d(x))


def test_kl_matches_torch_distributions():
    mean, logvar = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    q = torch.distributions.Normal(mean, (0.5 * logvar).exp())
    p = torch.distributions.Normal(torch.zeros_like(mean), torch.ones_like(mean))
    expect = torch.distributions.kl_divergence(q, p).flatten(1).sum(1).mean()
    assert torch.allclose(ae.kl_loss(mean, logvar), expect, rtol=1e-5)


@pytest.mark.parametrize("weight, key", [("dist_weight", "dist"), ("depth_weight", "depth")])
def test_a_loss_weight_adds_exactly_that_weight_times_its_term(weight, key):
    """--dist-weight w adds exactly w * mean(distortion of the P0 render) to the loss, and
    --depth-weight w exactly w * depth_loss (the same random draws for both calls); 0 leaves
    the term out."""
    args = ae.get_args(["--preset", "tiny", "--fov-deg", "40", "--radius", "2.7"])
    args.yaw_range, args.pitch_range = 20.0, 5.0
    model = ae.AutoEncoder(ae.model_config(args))
    image, depth = torch.rand(2, 3, 32, 32) * 2 - 1, 2 + torch.rand(2, 1, 32, 32)
    losses = {}
    for w in (0.0, 0.5):
        setattr(args, weight, w)
        torch.manual_seed(0)
        losses[w], logs, _ = ae.autoencoder_loss(model, None, image, depth, args, False, None)
    assert key in logs and logs[key] > 0
    assert torch.allclose(losses[0.5] - losses[0.0], 0.5 * logs[key], rtol=1e-4)


def test_depth_losses_follow_what_the_depth_maps_are(scenes, tmp_path):
    """Synthetic scenes (no --data, or a folder with scenes.json) carry true depth: metric depth
    loss at 0.5 plus the distortion loss at 1. Photos (no scenes.json): the aligned depth loss
    at 1 and no distortion. An explicit flag picks the other set, and a given weight stays."""
    losses = lambda a: (a.depth_metric, a.depth_weight, a.dist_weight)
    photos = tmp_path / "photos"
    photos.mkdir()
    assert losses(ae.get_args(["--preset", "tiny"])) == (True, 0.5, 1.0)
    assert losses(ae.get_args(["--preset", "tiny", "--data", scenes])) == (True, 0.5, 1.0)
    assert losses(ae.get_args(["--preset", "tiny", "--data", str(photos)])) == (False, 1.0, 0.0)
    assert losses(ae.get_args(["--no-depth-metric"])) == (False, 1.0, 0.0)
    assert losses(ae.get_args(["--data", str(photos), "--depth-metric"])) == (True, 0.5, 1.0)
    assert losses(ae.get_args(["--dist-weight", "0.1", "--depth-weight", "2"])) == (True, 2, 0.1)


def test_depth_colours_ignore_rays_that_hit_nothing():
    """A ramp of depths 2..4 with a two-column strip of empty rays (rendered depth ~0): the ramp
    still spans the colour map from near (dark) to far (bright), and the strip gets the far
    colour. Counted into the percentiles, the strip's huge disparity would flatten the ramp."""
    depth = torch.linspace(2, 4, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16).clone()
    depth[..., -2:] = 1e-4
    rgb = ae.colorize_depth(depth)                                    # (1, 3, 16, 16)
    near, far, empty = rgb[0, :, 8, 0], rgb[0, :, 8, 13], rgb[0, :, 8, 15]
    assert (far - near).abs().sum() > 1.0                             # dark blue vs yellow
    assert torch.allclose(empty, far)


def test_depth_colours_draw_half_opaque_rays_at_their_surface():
    """The ramp again, its columns 10-13 rendered at half opacity (depth sum_i w_i z_i = half
    the surface's) and 14-15 empty (opacity 1%). Given the opacity, every ray is drawn at the
    depth of what it hit, exactly as the fully opaque ramp is, and the empty ones far; without
    it the half-opaque strip reads as the nearest thing in the picture."""
    surface = torch.linspace(2, 4, 16).view(1, 1, 1, 16).expand(1, 1, 16, 16).clone()
    opacity = torch.ones_like(surface)
    opacity[..., 10:14], opacity[..., 14:] = 0.5, 0.01
    depth = surface * opacity                                         # what the renderer gives
    rgb = ae.colorize_depth(depth, opacity)                           # (1, 3, 16, 16)
    truth = ae.colorize_depth(surface[..., :14], torch.ones(1, 1, 16, 14))
    assert torch.allclose(rgb[..., :14], truth, atol=1e-6)
    assert torch.allclose(rgb[..., 14:], truth[..., 13:14].expand(-1, -1, -1, 2), atol=1e-6)
    import matplotlib
    nearest = torch.tensor(matplotlib.colormaps["viridis"](0.0)[:3]).float() * 2 - 1
    assert torch.allclose(ae.colorize_depth(depth)[0, :, 8, 10], nearest, atol=1e-6)
    assert (rgb[0, :, 8, 10] - nearest).abs().sum() > 1.0


def test_scale_shift_alignment_is_exact():
    pred = torch.rand(4, 100)
    s_true = torch.tensor([[0.5], [2.0], [3.0], [10.0]])
    b_true = torch.tensor([[1.0], [-2], [0], [5]])
    s, b = ae.align_scale_shift(pred, s_true * pred + b_true)
    assert torch.allclose(s, s_true, atol=1e-4) and torch.allclose(b, b_true, atol=1e-4)
    # An inverted map does not fit: s stays positive (|cov| / var = 1 here), so the residual is
    # twice the map's deviation from its mean -- worse than a flat fit, not a perfect one.
    s, b = ae.align_scale_shift(pred, -pred)
    assert torch.allclose(s, torch.ones_like(s), atol=1e-5)
    assert torch.allclose(s * pred + b + pred, 2 * (pred - pred.mean(1, keepdim=True)), atol=1e-5)


def test_depth_loss_pushes_an_inverted_depth_map_back():
    """A rendered depth anti-correlated with the truth must get a gradient (with s clamped at 0
    it got none, and a run could sit there for hundreds of steps), and one small step along it
    must lower the loss."""
    depth = 1.5 + torch.rand(2, 1, 8, 8) * 3
    inverted = (7.0 - depth).requires_grad_(True)           # far where the truth is near
    loss = ae.depth_loss(inverted, depth)
    grad, = torch.autograd.grad(loss, inverted)
    assert grad.abs().sum() > 0
    assert ae.depth_loss(inverted.detach() - 0.5 * grad / grad.norm(), depth) < loss


def test_metric_depth_loss_rejects_the_wrong_relief_that_the_invariant_one_accepts():
    true = 2 + 2 * torch.rand(2, 1, 8, 8)
    half = 1 / (0.5 / true + 0.5 / true.mean())           # half the disparity relief
    assert ae.depth_loss(half, true) < 1e-5                # affine in disparity: fits exactly
    assert ae.depth_loss(true, true, metric=True) < 1e-5
    assert ae.depth_loss(half, true, metric=True) > 0.3    # |0.5 z| with z standardised: ~0.4
    assert ae.depth_loss(true * 1.2, true, metric=True) > 0.1   # and the absolute scale too


def test_depth_loss_is_scale_invariant_and_rejects_flat():
    depth = 1.5 + torch.rand(2, 1, 8, 8) * 3
    assert ae.depth_loss(depth, depth) < 1e-5
    assert ae.depth_loss(depth, 7.0 * depth) < 1e-5              # only relative depth matters
    assert ae.depth_loss(torch.full_like(depth, 2.0), depth) > 0.5


def test_build_is_trains_initialisation_and_one_step_changes_every_parameter(scenes, tmp_path):
    args = micro_args(scenes, tmp_path / "a", "--steps", "1", "--adv-start", "0", "--every", "1")
    args.fov_deg, args.radius = scenes_mod.SCENE_FOV, scenes_mod.SCENE_RADIUS
    init, init_d, _, _ = ae.build(args, "cpu")
    # With lr 0 a step moves nothing: train() started from exactly build()'s weights.
    frozen = ae.train(micro_args(scenes, tmp_path / "b", "--steps", "1", "--adv-start", "0",
                                 "--every", "1", "--lr", "0"))
    for a, b in ((init, frozen["model"]), (init_d, frozen["disc"])):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    run = ae.train(args)
    for name, before in list(init.named_parameters()) + [
            ("disc." + n, p) for n, p in init_d.named_parameters()]:
        after = dict(run["model"].named_parameters()).get(name)
        if after is None:
            after = dict(run["disc"].named_parameters())[name[5:]]
        assert not torch.equal(before, after), f"{name} did not change"
    out = tmp_path / "a"
    assert os.path.isfile(out / "ckpt.pt") and os.path.isfile(out / "preview_000001.png")


def test_r1_covers_depth_and_is_float32_under_bf16():
    torch.manual_seed(0)
    disc = ae.Discriminator(16, 8)
    with torch.no_grad():
        disc.body[0].weight[:, :3] = 0                # this D looks at the depth channel only
    image, depth = torch.rand(2, 3, 16, 16) * 2 - 1, 1 + torch.rand(2, 1, 16, 16)
    real, fake = disc.inputs(image, depth, 16), disc.inputs(image.flip(-1), depth.flip(-1), 16)
    assert real.shape == (2, 4, 16, 16)
    _, r1 = ae.d_loss_fn(disc, real, fake, r1_gamma=1.0)
    # R1 = mean over the batch of |grad_x D(x)|^2 over all 4 channels; an RGB-only R1 is 0 here.
    x = real.clone().requires_grad_(True)
    grad, = torch.autograd.grad(disc(x).sum(), x)
    assert r1 > 0 and torch.allclose(r1, grad.square().flatten(1).sum(1).mean(), rtol=1e-5)
    # Under bf16 autocast the penalty is still computed in float32: same value, float32.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, r1_bf = ae.d_loss_fn(disc, real, fake, r1_gamma=1.0)
    assert r1_bf.dtype == torch.float32 and torch.allclose(r1_bf, r1, rtol=1e-5)
    # Without depth maps: the colour channels alone.
    rgb_only = ae.Discriminator(16, 8, depth=False)
    assert torch.equal(rgb_only.inputs(image, depth, 16), image)
    assert rgb_only(image).shape == (2,)


def test_overfitting_one_batch_lowers_reconstruction(tmp_path):
    root = tmp_path / "two"
    scenes_mod.make_scenes(str(root), 2, res=16, aa=1, verbose=False)
    args = micro_args(str(root), tmp_path / "run", "--steps", "300", "--adv-weight", "0",
                      "--every", "1000", "--lr", "3e-3", "--plane-res", "16", "--log-every", "1",
                      # Any seed learns here (seeds 0, 1, 3: RGB loss 2.9-3.3x lower, depth
                      # 4.3-5.5x); before align_scale_shift kept the scale positive, |cov|/var,
                      # seeds 0 and 3 sat on a plateau of the depth loss with the scale at 0.
                      "--seed", "1")
    hist = ae.train(args)["history"]
    first = sum(h["rgb"] for h in hist[:5]) / 5
    last = sum(h["rgb"] for h in hist[-10:]) / 10
    assert last < first / 2.5, (first, last)
    first_d = sum(h["depth"] for h in hist[:5]) / 5
    last_d = sum(h["depth"] for h in hist[-10:]) / 10
    assert last_d < first_d / 2.5, (first_d, last_d)          # geometry is learned too


def test_resume_after_a_full_disk_is_bit_exact(scenes, tmp_path, monkeypatch, capsys):
    common = ["--steps", "4", "--adv-start", "1", "--every", "2"]   # every loss term resumed
    straight = ae.train(micro_args(scenes, tmp_path / "a", *common))
    # The same run whose disk fills up while it writes the checkpoint of step 4: the file it
    # writes to takes 1 MB (about half), then fails as a full disk does (ENOSPC).
    class SmallDisk(io.FileIO):
        def write(self, b):
            if self.tell() + len(b) > 1_000_000:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)
    opened = []

    def open_(path, mode="r"):                           # the second file written
        opened.extend([path] if "w" in mode else [])
        return SmallDisk(path, mode) if "w" in mode and len(opened) == 2 else open(path, mode)
    monkeypatch.setattr(training, "open", open_, raising=False)
    with pytest.raises(SystemExit) as stop:
        data_mod.run_cli(lambda: ae.train(micro_args(scenes, tmp_path / "b", *common)))
    monkeypatch.undo()
    assert stop.value.code != 0
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(err) == 1 and "the checkpoint of step 4 (" in err[0], err  # one line: what, size,
    assert "No space left on device" in err[0]                             # why, and what's safe
    assert "still holds the checkpoint of step 2, intact" in err[0] and "--resume" in err[0]
    assert sorted(os.listdir(tmp_path / "b")) == ["ckpt.pt", "preview_000002.png"]  # no .tmp
    assert torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)["step"] == 2
    resumed = ae.train(micro_args(scenes, tmp_path / "b", "--resume", *common))
    for key in ("model", "ema"):                       # the weights and their average
        for (name, p), q in zip(straight[key].state_dict().items(),
                                resumed[key].state_dict().values()):
            assert torch.equal(p, q), (key, name)
    # and load() gives back the averaged weights in eval mode
    loaded = ae.load(str(tmp_path / "b" / "ckpt.pt"))
    assert not loaded.training and loaded.config["radius"] == scenes_mod.SCENE_RADIUS
    assert all(torch.equal(p, q) for p, q in zip(loaded.state_dict().values(),
                                                 resumed["ema"].state_dict().values()))


def test_ema_is_the_running_average_that_load_returns(scenes, tmp_path):
    # Two steps by hand: the average starts at the initial weights w0, and after step k
    # (decay d_k = ema_decay(k), warming up: 1/10, then 2/11) ema <- d_k ema + (1 - d_k) w_k+1,
    # with w1, w2 the weights of a 1-step and a 2-step run of the same seed.
    common = ["--adv-weight", "0", "--every", "1", "--ema", "0.5"]
    one = ae.train(micro_args(scenes, tmp_path / "one", "--steps", "1", *common))
    two = ae.train(micro_args(scenes, tmp_path / "two", "--steps", "2", *common))
    init = ae.build(micro_args(scenes, tmp_path / "x", *common), "cpu")[0]
    d0, d1 = training.ema_decay(0, 0.5), training.ema_decay(1, 0.5)
    assert d0 == pytest.approx(0.1) and d1 == pytest.approx(2 / 11)
    for (name, e), w0, w1, w2 in zip(two["ema"].state_dict().items(),
                                     init.state_dict().values(), one["model"].state_dict().values(),
                                     two["model"].state_dict().values()):
        if not e.is_floating_point():
            continue
        ema1 = d0 * w0 + (1 - d0) * w1
        assert torch.allclose(e, d1 * ema1 + (1 - d1) * w2, atol=1e-6), name
    # The average is not the weights (it trails them) and it is what load() returns.
    loaded = ae.load(str(tmp_path / "two" / "ckpt.pt")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in two["ema"].state_dict().items())
    assert any(not torch.equal(loaded[k], v) for k, v in two["model"].state_dict().items())
    # --ema 0: no average in the checkpoint, load() gives the trained weights.
    off = ae.train(micro_args(scenes, tmp_path / "off", "--steps", "1", "--adv-weight", "0",
                              "--ema", "0"))
    assert off["ema"] is None
    ckpt = torch.load(str(tmp_path / "off" / "ckpt.pt"), weights_only=True)
    assert "ema" not in ckpt
    loaded = ae.load(str(tmp_path / "off" / "ckpt.pt")).state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in off["model"].state_dict().items())
    # Resuming that run with an average starts the average at its weights.
    more = ae.train(micro_args(scenes, tmp_path / "off", "--resume", "--steps", "2",
                               "--adv-weight", "0", "--ema", "0.5"))
    d = training.ema_decay(1, 0.5)
    for (name, e), w1, w2 in zip(more["ema"].state_dict().items(),
                                 off["model"].state_dict().values(),
                                 more["model"].state_dict().values()):
        if e.is_floating_point():
            assert torch.allclose(e, d * w1 + (1 - d) * w2, atol=1e-6), name


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, scenes, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run = ae.train(micro_args(scenes, out, "--steps", "3", "--adv-start", "1", "--every", "3",
                              "--device", "cpu"))
    torch.save(run["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_older_checkpoints_load_unless_they_used_a_removed_option(scenes, tmp_path):
    # Checkpoints from before some model options were removed carry them in their config; those
    # trained with the value this version builds must load and resume, the others must be
    # refused in one line that names the option.
    out = tmp_path / "old"
    ae.train(micro_args(scenes, out, "--steps", "1", "--every", "1", "--adv-weight", "0"))
    path = out / "ckpt.pt"
    ckpt = torch.load(path, weights_only=True)
    ckpt["config"].update(plane_layout="centre", plane_decode="grid", field_layers=1,
                          sr_highpass=False, depth_input=False, contraction="linf")
    del ckpt[training.CHECKSUM]                   # older checkpoints carry none
    torch.save(ckpt, path)
    assert "plane_layout" not in ae.load(str(path)).config
    ae.train(micro_args(scenes, out, "--steps", "2", "--every", "1", "--adv-weight", "0",
                        "--resume"))
    assert torch.load(path, weights_only=True)["step"] == 2
    for key, value, flag in (("plane_decode", "axis", "--plane-decode axis"),
                             ("field_layers", 2, "--field-layers 2"),
                             ("plane_layout", None, "--plane-layout full")):
        old = torch.load(path, weights_only=True)
        old["config"].update(depth_input=False, plane_layout="centre")   # an older checkpoint
        del old[training.CHECKSUM]
        if value is None:
            del old["config"][key]                # older still: before the option existed
        else:
            old["config"][key] = value
        torch.save(old, tmp_path / "older.pt")
        with pytest.raises(UserError, match=flag + ", an option this version no longer has"):
            ae.load(str(tmp_path / "older.pt"))


def test_ddp_two_processes_keep_identical_weights(scenes, tmp_path):
    mp.spawn(_ddp_worker, args=(2, _free_port(), scenes, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert os.path.isfile(tmp_path / "ckpt.pt")          # written once, by rank 0
    # and the weights moved away from the initialisation
    args = micro_args(scenes, tmp_path)
    args.fov_deg, args.radius = scenes_mod.SCENE_FOV, scenes_mod.SCENE_RADIUS
    init = ae.build(args, "cpu")[0].state_dict()
    assert not torch.equal(init["field.density.weight"], a["field.density.weight"])


def test_bad_inputs_are_one_clear_error(scenes, tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="no images found"):
        ae.train(micro_args(str(tmp_path / "empty"), tmp_path / "o"))
    nodepth = tmp_path / "nodepth"
    nodepth.mkdir()
    for f in os.listdir(scenes):
        if f.endswith(".png"):
            os.link(os.path.join(scenes, f), nodepth / f)
    # Photos without depth maps: the error names both ways on...
    with pytest.raises(UserError, match="depth maps are required") as e:
        ae.train(micro_args(str(nodepth), tmp_path / "o"))
    assert "python data.py depth" in str(e.value) and "--depth-weight 0" in str(e.value)
    # ...and the second one trains, with a discriminator on RGB alone.
    run = ae.train(micro_args(str(nodepth), tmp_path / "o", "--depth-weight", "0", "--steps",
                              "1", "--adv-start", "0", "--every", "1"))
    assert run["disc"].in_ch == 3 and "d" in run["history"][0]
    with pytest.raises(UserError, match="--every must be positive"):
        ae.train(micro_args(scenes, tmp_path / "o", "--every", "0"))
    fake = tmp_path / "ldm.pt"
    torch.save(dict(kind="wildfusion-diffusion", model={}), fake)
    with pytest.raises(UserError, match="wildfusion-diffusion checkpoint, expected an autoencoder"):
        ae.load(str(fake))
    with pytest.raises(UserError, match="power of two"):
        ae.train(micro_args(scenes, tmp_path / "o", "--z-res", "5"))
    with pytest.raises(UserError, match="no such checkpoint"):
        ae.load(str(tmp_path / "missing.pt"))
    # From the command line: one line on stderr, exit code 2, no traceback.
    p = subprocess.run([sys.executable, os.path.join(ROOT, "autoencoder.py"), "--data",
                        str(tmp_path / "empty"), "--preset", "tiny"], capture_output=True,
                       text=True)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and p.stderr.startswith("error:")


# --- scaling flags: accumulation, bf16 and compile on a CPU, data workers -----------------------
def _no_randomness(monkeypatch):
    """Make every random draw of a training step a constant (stratified and importance
    samples at their centres, z = the posterior mean, novel cameras at yaw = pitch = 0), so that
    one batch and its split into micro-batches see exactly the same numbers."""
    def rand(*size, device=None, dtype=None, generator=None):
        size = size[0] if len(size) == 1 and isinstance(size[0], (tuple, list)) else size
        return torch.full(tuple(size), 0.5, device=device, dtype=dtype or torch.float32)
    monkeypatch.setattr(torch, "rand", rand)
    monkeypatch.setattr(torch, "randn_like", torch.zeros_like)


def test_accumulation_gives_the_gradient_of_the_larger_batch(scenes, monkeypatch):
    _no_randomness(monkeypatch)
    args = micro_args(scenes, "unused", "--lr", "0")
    ae.set_camera(args, scenes_mod.read_scene_meta(scenes))
    torch.manual_seed(0)
    image, depth = torch.rand(4, 3, 16, 16) * 2 - 1, 2 + torch.rand(4, 1, 16, 16)
    image = image + 0.3 * torch.linspace(-1, 1, 16)       # (not constant: rand is patched)
    depth = depth + torch.linspace(0, 1, 16)[:, None]
    grads = []
    for batches in ([(image, depth)], [(image[:2], depth[:2]), (image[2:], depth[2:])]):
        model, disc, opt, opt_d = ae.build(args, "cpu")
        logs, fakes = ae.autoencoder_step(model, disc, opt, batches, args, True, None,
                                          torch.autocast("cpu", enabled=False))
        ae.discriminator_step(disc, opt_d, batches, fakes, args,
                              torch.autocast("cpu", enabled=False))
        grads.append([p.grad.clone() for p in [*model.parameters(), *disc.parameters()]])
    assert sum(g.abs().sum() for g in grads[0]) > 0
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6), (a - b).abs().max()


def test_bf16_autocast_trains_on_a_cpu_close_to_float32(scenes, tmp_path):
    runs = {amp: ae.train(micro_args(scenes, tmp_path / amp, "--steps", "3", "--adv-start", "0",
                                     "--every", "3", "--log-every", "1", "--amp", amp))
            for amp in ("none", "bf16")}
    for key in ("rgb", "depth", "g", "d"):
        a = [h[key] for h in runs["none"]["history"]]
        b = [h[key] for h in runs["bf16"]["history"]]
        assert all(math.isfinite(v) for v in b), (key, b)
        # bf16 keeps 8 bits of mantissa: the losses agree to a few percent, not exactly
        assert b[0] == pytest.approx(a[0], rel=0.05, abs=0.01) and a != b, (key, a, b)


def test_compiled_renderer_matches_eager_on_a_cpu():
    torch.manual_seed(0)
    planes = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 5))
    field = lambda x: (torch.nn.functional.softplus(mlp(x)[..., :1]), mlp(x)[..., 1:])
    cams = render.orbit_camera(torch.tensor([-10.0, 10.0]), torch.tensor([0.0, 5.0]), 2.7)
    outs, grads = [], []
    for compile in (False, True):                     # inductor's C++ on a CPU: ~30 s to build
        out = render.render(planes, field, cams, 40.0, 12, n_coarse=8, n_fine=8, compile=compile)
        planes.grad = None
        out["features"].square().mean().backward()
        outs.append(out)
        grads.append(planes.grad.clone())
    for k in outs[0]:
        assert torch.allclose(outs[0][k], outs[1][k], atol=1e-5), k
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_workers_and_resume_give_the_batches_of_one_straight_run(scenes):
    """The data order is a function of (seed, step, micro-batch, rank): any number of loader
    workers, and a loader restarted at step k, yield the same batches, mirror images included."""
    ds = ae.data_mod.open_folder(scenes, 16, verbose=False)
    take = lambda workers, start: [b["image"] for b in training.make_loader(
        ds, training.StepBatches(len(ds), 2, 7, start, 6, accum=2), workers, torch.device("cpu"))]
    straight = take(0, 0)
    assert len(straight) == 12
    assert all(torch.equal(a, b) for a, b in zip(straight, take(2, 0)))
    assert all(torch.equal(a, b) for a, b in zip(straight[6:], take(0, 3)))
    # Every epoch visits every image once; some items are mirrored, and not always the same.
    keys = [k for s in range(6) for m in range(2) for k in training.batch_indices(s, 4, 2, 7, m, 2)]
    assert sorted(i for i, _ in keys[:4]) == [0, 1, 2, 3]
    assert 0 < sum(m for _, m in keys) < len(keys)


def test_resume_with_other_processes_or_flags_is_announced(scenes, tmp_path, capsys):
    # --resume before any checkpoint exists (a preemptible job's first launch): from step 0.
    ae.train(micro_args(scenes, tmp_path, "--steps", "2", "--every", "2", "--adv-weight", "0",
                        "--resume"))
    assert "starting from step 0" in capsys.readouterr().out
    assert torch.load(tmp_path / "ckpt.pt", weights_only=True)["step"] == 2
    ck = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    ck["rng"] = ck["rng"] * 2                         # as if saved by two processes
    training.save_checkpoint(str(tmp_path / "ckpt.pt"), ck)
    run = ae.train(micro_args(scenes, tmp_path, "--steps", "3", "--every", "3",
                              "--adv-weight", "0", "--resume", "--dist-weight", "0.5"))
    out = capsys.readouterr().out
    assert "saved by 2 process(es), this run has 1" in out
    # and the flags that changed since the checkpoint, each named once (a loss among them;
    # --adv-start follows --steps, a third of it)
    note = next(line for line in out.splitlines() if "continues with flags other" in line)
    assert sorted(note.split("trained with: ")[1].split(", ")) == [
        "--adv-start 0 -> 1", "--dist-weight 1.0 -> 0.5", "--every 2 -> 3", "--steps 2 -> 3"]
    assert run["history"][-1]["step"] == 3


@pytest.mark.slow
def test_training_with_compile_and_bf16_on_a_cpu(scenes, tmp_path):
    """The whole training script through torch.compile (inductor's C++ on a CPU) and bf16
    autocast: it runs, and its losses are finite (slow: compiling takes minutes)."""
    run = ae.train(micro_args(scenes, tmp_path, "--steps", "2", "--adv-start", "0", "--every",
                              "2", "--log-every", "1", "--compile", "--amp", "bf16"))
    assert all(math.isfinite(v) for h in run["history"] for v in h.values())
    assert {"rgb", "depth", "g", "d"} <= set(run["history"][0])


def test_a_run_says_its_cost_first_and_one_that_will_not_fit_stops_in_one_line(
        scenes, tmp_path, monkeypatch, capsys):
    ae.train(micro_args(scenes, tmp_path / "a", "--steps", "1", "--every", "1"))
    assert re.search(r"cost: about [\d.]+ GB on cpu, \d+ threads; about [\d.]+ s per step .* "
                     r"for 1 steps", capsys.readouterr().out)
    monkeypatch.setattr(training, "free_memory", lambda device: 10 ** 5)
    with pytest.raises(UserError, match=r"the tiny autoencoder at 16 px needs about .* GB "
                                        r"free: not even one image fits"):
        ae.train(micro_args(scenes, tmp_path / "b", "--steps", "1"))
    assert not os.path.exists(tmp_path / "b" / "ckpt.pt")
    # Room for one image of a batch of 4: the same gradient from 4 micro-batches of 1.
    lin = torch.nn.Linear(256, 256)
    loss_at = lambda B: lin(torch.randn(B, 256)).relu().sum()
    fixed, per = 16 * (256 * 256 + 256), training.saved_bytes(lambda: loss_at(1))
    monkeypatch.setattr(training, "free_memory", lambda device: (fixed + 1.5 * per) / 0.8)
    with pytest.raises(UserError, match="--batch 1 --accum 4 fits and gives the same gradient"):
        training.preflight(loss_at, ([lin], []), 4, 1, 10, torch.device("cpu"), "a test")


def test_the_timed_step_includes_the_discriminators_when_the_adversarial_loss_is_on(
        scenes, tmp_path, monkeypatch):
    """With the GAN on, a step also trains the discriminator (with R1's second backward);
    the cost said before the first step must time that too, on the whole micro-batch."""
    calls = []
    d_loss_fn = ae.d_loss_fn
    monkeypatch.setattr(ae, "d_loss_fn", lambda disc, real, fake, gamma: calls.append(
        len(real)) or d_loss_fn(disc, real, fake, gamma))
    monkeypatch.setattr(training, "seconds_per_call", lambda fn, warm, reps: fn() or 1.0)
    ae.setup(micro_args(scenes, tmp_path / "a", "--batch", "3"))          # MICRO: GAN on
    assert calls == [1, 3]                     # untimed with one image, timed with the batch
    calls.clear()
    ae.setup(micro_args(scenes, tmp_path / "b", "--adv-weight", "0"))
    assert calls == []
