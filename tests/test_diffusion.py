"""diffusion.py: the schedule in closed form, samplers against an exact denoiser, guidance,
mode coverage on a toy mixture, training that learns, exact resume, bad inputs."""
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

import diffusion as D
import training
from conftest import LDM_MICRO, ROOT
from data import UserError

def ldm_args(ae_path, out, *extra):
    return D.get_args(LDM_MICRO + ["--ae", ae_path, "--out", str(out), *extra])


# --- the schedule and the parameterisations ------------------------------------------------------
def test_schedules_are_monotone_with_the_published_endpoints():
    lin = D.make_schedule("linear")
    assert lin.shape == (1000,) and torch.all(lin[1:] < lin[:-1])
    assert abs(lin[0] - (1 - 1e-4)) < 1e-12                  # alpha_bar_0 = 1 - beta_0
    assert 3e-5 < lin[-1] < 6e-5                             # DDPM's 4.0e-5 at T = 1000
    cos = D.make_schedule("cosine")
    assert torch.all(cos[1:] <= cos[:-1]) and cos[-1] < 1e-4
    t = torch.tensor([250.0, 500.0], dtype=torch.float64)                       # f(t + 1) / f(0)
    expect = torch.cos(((t + 1) / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 / \
        math.cos(0.008 / 1.008 * math.pi / 2) ** 2
    assert torch.allclose(cos[t.long()], expect, rtol=1e-6)


def test_q_sample_matches_its_closed_form_moments():
    g = torch.Generator().manual_seed(0)
    x0 = torch.full((20000, 1, 1, 1), 1.5)
    a = torch.full((20000,), 0.3)
    x_t = D.q_sample(x0, a, torch.randn(x0.shape, generator=g))
    assert abs(x_t.mean() - math.sqrt(0.3) * 1.5) < 0.02     # E = sqrt(a) x0
    assert abs(x_t.var() - 0.7) < 0.02                       # Var = 1 - a


def test_eps_and_v_conversions_invert_each_other():
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 4, 5, 5, generator=g), torch.randn(3, 4, 5, 5, generator=g)
    a = torch.tensor([0.999, 0.5, 0.01])
    x_t = D.q_sample(x0, a, eps)
    eps_v, x0_v = D.eps_x0_from_v(x_t, D.v_from_eps(x0, eps, a), a)
    assert torch.allclose(eps_v, eps, atol=1e-5) and torch.allclose(x0_v, x0, atol=1e-5)
    eps_e, x0_e = D.eps_x0_from_eps(x_t, eps, a)
    assert torch.allclose(x0_e, x0, atol=1e-3)


# --- samplers with an exact denoiser -------------------------------------------------------------
class GaussianOracle(nn.Module):
    """The exact epsilon (or v) predictor when the data is N(m, s^2 I) (s = 0: the single point
    m): E[x0 | x_t] = m + sqrt(a) s^2 / (a s^2 + 1 - a) (x_t - sqrt(a) m)."""

    def __init__(self, alpha_bar, m, s, pred="eps"):
        super().__init__()
        self.alpha_bar, self.m, self.s, self.pred = alpha_bar, m, s, pred

    def forward(self, x, t, y):
        a = self.alpha_bar[t].reshape(-1, 1, 1, 1)
        x0 = self.m + a.sqrt() * self.s ** 2 / (a * self.s ** 2 + 1 - a) * (x - a.sqrt() * self.m)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return eps if self.pred == "eps" else a.sqrt() * eps - (1 - a).sqrt() * x0


def oracle_model(m, s, pred="eps", schedule="linear"):
    model = D.toy_model(pred)
    model.config["schedule"] = schedule
    model.alpha_bar = D.make_schedule(schedule).float()
    model.net = GaussianOracle(model.alpha_bar, m, s, pred)
    return model


@pytest.mark.parametrize("pred", ["eps", "v"])
def test_ddim_and_ddpm_land_on_a_single_data_point(pred):
    m = torch.randn(1, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    model = oracle_model(m, 0.0, pred)
    z = D.ddim_sample(model, (5, 2, 4, 4), steps=10, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(z, m.expand(5, -1, -1, -1), atol=1e-4)
    z = D.ddpm_sample(model, (2, 2, 4, 4), generator=torch.Generator().manual_seed(2))
    assert torch.allclose(z, m.expand(2, -1, -1, -1), atol=1e-4)


@pytest.mark.parametrize("eta,schedule", [(0.0, "linear"), (1.0, "cosine")])
def test_ddim_samples_a_gaussian_with_the_right_moments(eta, schedule):
    model = oracle_model(0.7, 0.5, "v", schedule)
    g = lambda: torch.Generator().manual_seed(0)
    z = D.ddim_sample(model, (4000, 2, 4, 4), steps=1000, eta=eta, generator=g())
    assert abs(z.mean() - 0.7) < 0.01 and abs(z.std() - 0.5) < 0.006
    # With fewer steps the discretisation error shows (DDIM under-disperses); it must shrink.
    err = [abs(D.ddim_sample(model, (4000, 2, 4, 4), steps=s, eta=eta, generator=g()).std() - 0.5)
           for s in (10, 50)]
    assert err[1] < err[0]


def test_dpm_solver_of_order_one_is_ddim_and_its_first_step_too():
    model = oracle_model(0.7, 0.5, "v", "cosine")
    x = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    ts = D.ddim_timesteps(12, model.T - 1)
    ddim = D.ddim_loop(model, x, ts)
    assert torch.allclose(D.dpm_solver_loop(model, x, ts, order=1), ddim, atol=1e-5)
    assert not torch.allclose(D.dpm_solver_loop(model, x, ts), ddim, atol=1e-3)  # order 2 differs
    one_step = ts[-2:]                                 # a single step, then the clean sample
    assert torch.allclose(D.dpm_solver_loop(model, x, one_step), D.ddim_loop(model, x, one_step),
                          atol=1e-5)


@pytest.mark.parametrize("pred,schedule,gain", [("eps", "linear", 2.5), ("v", "cosine", 10)])
def test_dpm_solver_converges_to_the_exact_ode_solution_faster_than_ddim(pred, schedule, gain):
    # For data N(m, s^2) the probability-flow ODE keeps x_t's standard score
    # (x_t - sqrt(a) m) / sqrt(a s^2 + 1 - a) constant: from x_T it lands on m + s * that score.
    m, s = 0.7, 0.5
    model = oracle_model(m, s, pred, schedule)
    x = torch.randn(256, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    a = model.alpha_bar[-1]
    exact = m + s * (x - a.sqrt() * m) / (a * s ** 2 + 1 - a).sqrt()
    err = {(name, n): (D.ddim_sample(model, None, n, noise=x, sampler=name) - exact).abs().max()
           for name in ("ddim", "dpm++") for n in (20, 50, 200)}
    for n in (20, 50):                                  # well under DDIM's error at equal cost
        assert err["dpm++", n] < err["ddim", n] / gain, err
    assert err["dpm++", 200] < err["dpm++", 20] / 20 and err["dpm++", 200] < 2e-3, err
    with pytest.raises(UserError, match="dpm\\+\\+"):
        D.ddim_sample(model, (1, 2, 4, 4), 5, eta=1.0, sampler="dpm++")


def test_inverse_ddim_then_ddim_returns_the_start():
    model = oracle_model(0.3, 0.8)
    z = 0.3 + 0.8 * torch.randn(16, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    err = []
    for steps in (100, 1000):
        noise = D.ddim_invert(model, z, steps=steps)
        assert abs(noise.std() - 1) < 0.1                    # it really went to noise
        err.append((D.ddim_sample(model, z.shape, steps=steps, noise=noise) - z).abs().mean())
    # Inversion evaluates eps one grid step early: a first-order error, ~10x less at 10x steps.
    assert err[0] < 0.04 and err[1] < 0.005 and err[1] < err[0] / 5, err


def test_resampling_strength_zero_keeps_and_one_forgets():
    model = oracle_model(0.0, 1.0)
    z = torch.full((4, 2, 4, 4), 3.0)                        # far from the data's mean of 0
    assert torch.equal(D.resample(model, z, 0.0), z)
    g = torch.Generator().manual_seed(0)
    near = D.resample(model, z, 0.2, generator=g)
    far = D.resample(model, z, 1.0, generator=g)
    assert (near - z).abs().mean() < (far - z).abs().mean()
    with pytest.raises(UserError, match="strength"):
        D.resample(model, z, 1.5)


def test_slerp_endpoints_and_norm():
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(4, 8, 8, generator=g), torch.randn(4, 8, 8, generator=g)
    assert torch.allclose(D.slerp(a, b, 0.0), a, atol=1e-5)
    assert torch.allclose(D.slerp(a, b, 1.0), b, atol=1e-5)
    mid = D.slerp(a, b, 0.5)
    assert abs(mid.norm() / a.norm() - 1) < 0.1 and (0.5 * (a + b)).norm() / a.norm() < 0.85


# --- the UNet and guidance -----------------------------------------------------------------------
def test_unet_shapes_for_both_presets():
    for preset, shape in (("tiny", (4, 8, 8)), ("base", (4, 32, 32))):
        args = D.get_args(["--preset", preset])
        model = D.LatentDiffusion(D.model_config(args, shape, ["a", "b"]))
        x = torch.randn(2, *shape)
        out = model.net(x, torch.tensor([0, 999]), torch.tensor([0, 2]))
        assert out.shape == x.shape and out.dtype == torch.float32


def test_guidance_scale_one_is_the_conditional_prediction():
    torch.manual_seed(0)
    config = dict(D.toy_model().config, num_classes=3, classes=["a", "b", "c"])
    model = D.LatentDiffusion(config).eval()
    for p in model.net.parameters():                 # the output conv is zero-initialised
        nn.init.normal_(p, std=0.2)
    x, t, y = torch.randn(3, 2, 4, 4), torch.tensor([10, 500, 900]), torch.tensor([0, 1, 2])
    a = model.alpha_bar[t].reshape(-1, 1, 1, 1)
    cond, null = model.net(x, t, y), model.net(x, t, model.null_labels(3, "cpu"))
    assert not torch.allclose(cond, null)
    assert torch.allclose(model.predict(x, t, y, cfg=1.0)[0], cond, atol=1e-5)
    assert torch.allclose(model.predict(x, t, y, cfg=0.0)[0], null, atol=1e-5)
    guided = model.predict(x, t, y, cfg=3.0)[0]
    assert torch.allclose(guided, null + 3 * (cond - null), atol=1e-4)
    # x0 follows from the same guided eps
    assert torch.allclose(model.predict(x, t, y, 3.0)[1], (x - (1 - a).sqrt() * guided) /
                          a.sqrt(), atol=1e-4)


def test_class_labels_and_the_null_label_reach_the_unet(ae_ckpt, tmp_path, monkeypatch):
    """Folder a/ -> label 0, b/ -> 1, the null label 2: in the latent cache, in training (with
    and without label dropout) and in guided sampling, checked where the UNet receives them."""
    seen = []
    forward = D.UNet.forward
    monkeypatch.setattr(D.UNet, "forward", lambda self, x, t, y: seen.append(
        (self.training, y.clone())) or forward(self, x, t, y))
    out = D.train(ldm_args(ae_ckpt, tmp_path / "c", "--steps", "3", "--every", "99",
                           "--p-uncond", "0", "--batch", "6"))
    cache = np.load(tmp_path / "c" / "latents" / "labels.npy")   # 6 images, then their mirrors
    assert cache.tolist() == [0, 0, 0, 1, 1, 1] * 2              # sorted: a/ x 3, then b/ x 3
    model = out["model"]
    assert model.config["classes"] == ["a", "b"] and model.num_classes == 2
    # Training without dropout: each step's labels are its batch's labels from the cache.
    trained = [y for is_training, y in seen if is_training][-3:]   # (before: the preflight's)
    for step, y in enumerate(trained):
        idx = [i for i, _ in training.batch_indices(step, 12, 6, 0, 0, 1)]
        assert y.tolist() == cache[idx].tolist()
    # With label dropout 0.5 about half become the null label (index num_classes = 2).
    seen.clear()
    torch.manual_seed(0)
    model.loss(torch.randn(400, 4, 4, 4), torch.arange(400) % 2, p_uncond=0.5)
    y = seen[0][1]
    assert set(y.tolist()) == {0, 1, 2} and 160 < (y == 2).sum() < 240
    assert torch.equal(y[y != 2], (torch.arange(400) % 2)[y != 2])
    # Sampling: no labels -> only the null label; cfg 1 -> the labels once; cfg 2 -> labels and
    # null labels in one batch (conditional and unconditional halves).
    model.eval()
    for labels, cfg, want in [(None, 1.0, [2, 2]), (torch.tensor([1, 0]), 1.0, [1, 0]),
                              (torch.tensor([1, 0]), 2.0, [1, 0, 2, 2])]:
        seen.clear()
        D.ddim_sample(model, (2, 4, 4, 4), steps=2, labels=labels, cfg=cfg)
        assert len(seen) == 2 and all(y.tolist() == want for _, y in seen), (cfg, seen)


# --- learning ------------------------------------------------------------------------------------
def test_overfitting_one_batch():
    torch.manual_seed(0)
    model = D.toy_model()
    x0 = torch.randn(4, 2, 4, 4)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(150):
        torch.manual_seed(1)                         # the same t and noise every step
        loss = model.loss(x0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


def test_every_mode_of_the_ring_is_found_in_proportion():
    """The paper's case for diffusion: coverage. 8 modes with weights 1/12 and 2/12; DDIM
    samples of the trained model must hit each within +-50% of its weight."""
    model, losses = D.train_toy(steps=1200, batch=128)
    assert sum(losses[-50:]) < sum(losses[:50]) / 4
    x = D.ddim_sample(model, (1000, 2, 4, 4), steps=50, generator=torch.Generator().manual_seed(1))
    mode = D.ring_modes(x)
    assert (mode < 0).float().mean() < 0.2                   # few samples between the modes
    freq = torch.stack([(mode == k).float().sum() for k in range(8)]) / (mode >= 0).sum()
    ratio = freq / D.RING_WEIGHTS
    assert torch.all((ratio > 0.5) & (ratio < 1.5)), freq


# --- the training script -------------------------------------------------------------------------
def test_training_writes_grids_checkpoint_and_resumes_bit_exactly(ae_ckpt, tmp_path):
    straight = D.train(ldm_args(ae_ckpt, tmp_path / "a", "--steps", "4", "--every", "2"))
    assert os.path.isfile(tmp_path / "a" / "samples_000002.png")
    D.train(ldm_args(ae_ckpt, tmp_path / "b", "--steps", "2", "--every", "2"))
    resumed = D.train(ldm_args(ae_ckpt, tmp_path / "b", "--steps", "4", "--every", "2",
                               "--resume"))
    for key in ("model", "ema"):
        for (name, p), q in zip(straight[key].state_dict().items(),
                                resumed[key].state_dict().values()):
            assert torch.equal(p, q), (key, name)
    model = D.load(str(tmp_path / "b" / "ckpt.pt"))
    assert not model.training and model.config["classes"] == ["a", "b"]
    assert model.config["ae_id"] == D.file_id(ae_ckpt)
    z = torch.from_numpy(np.load(tmp_path / "a" / "latents" / "z.npy"))
    assert z.shape == (12, 4, 4, 4)                          # 6 images + their mirror images
    assert torch.allclose(model.latent_mean, z.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(model.latent_std, z.std((0, 2, 3)), atol=1e-6)
    assert not os.listdir(tmp_path / "a") == [] and not any(".tmp" in f for f in
                                                            os.listdir(tmp_path / "a"))
    z = D.ddim_sample(model, (2, 4, 4, 4), steps=3, labels=torch.tensor([0, 1]), cfg=2.0)
    assert z.shape == (2, 4, 4, 4) and torch.isfinite(z).all()


def test_bad_inputs_are_one_clear_error(ae_ckpt, tmp_path):
    with pytest.raises(UserError, match="--ae is required"):
        D.train(D.get_args(LDM_MICRO + ["--out", str(tmp_path / "x")]))
    with pytest.raises(UserError, match="no such checkpoint"):
        D.train(ldm_args(str(tmp_path / "missing.pt"), tmp_path / "x"))
    D.train(ldm_args(ae_ckpt, tmp_path / "run", "--steps", "1", "--every", "1"))
    ldm_path = str(tmp_path / "run" / "ckpt.pt")
    with pytest.raises(UserError, match="wildfusion-diffusion checkpoint, expected an autoencoder"):
        D.train(ldm_args(ldm_path, tmp_path / "y"))
    with pytest.raises(UserError, match="wildfusion-autoencoder checkpoint, expected a diffusion"):
        D.load(ae_ckpt)
    # a latent cache made by another autoencoder
    other = tmp_path / "other.pt"
    ck = torch.load(ae_ckpt, weights_only=True)
    ck["step"] += 1
    training.save_checkpoint(str(other), ck)
    with pytest.raises(UserError, match="made by another autoencoder"):
        D.train(ldm_args(str(other), tmp_path / "run", "--steps", "1", "--every", "1"))
    model = D.load(ldm_path)
    with pytest.raises(UserError, match="out of range"):
        D.ddim_sample(model, (1, 4, 4, 4), steps=2, labels=torch.tensor([2]))
    uncond = D.LatentDiffusion(dict(model.config, num_classes=0, classes=[]))
    with pytest.raises(UserError, match="needs a class-conditional model"):
        D.ddim_sample(uncond, (1, 4, 4, 4), steps=2, cfg=3.0)
    with pytest.raises(UserError, match="levels need the latent size"):
        D.train(ldm_args(ae_ckpt, tmp_path / "z", "--ch-mult", "1,2,2,2"))
    with pytest.raises(UserError, match="--p-uncond must be in"):
        D.train(ldm_args(ae_ckpt, tmp_path / "z", "--p-uncond", "1"))
    p = subprocess.run([sys.executable, os.path.join(ROOT, "diffusion.py"), "--ae", ldm_path,
                        "--out", str(tmp_path / "w")], capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert p.stderr.strip().count("\n") == 0 and "expected an autoencoder" in p.stderr


def _ddp_worker(rank, world, port, ae_path, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    run = D.train(ldm_args(ae_path, out, "--steps", "3", "--every", "3", "--device", "cpu"))
    torch.save(run["model"].state_dict(), os.path.join(out, f"rank{rank}.pt"))


def test_ddp_two_processes_keep_identical_weights(ae_ckpt, tmp_path):
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, ae_ckpt, str(tmp_path)), nprocs=2, join=True)
    a = torch.load(tmp_path / "rank0.pt", weights_only=True)
    b = torch.load(tmp_path / "rank1.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / "ckpt.pt") and os.path.isdir(tmp_path / "latents")
    assert not torch.equal(a["net.conv_out.weight"], torch.zeros_like(a["net.conv_out.weight"]))
