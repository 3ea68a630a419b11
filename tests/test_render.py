"""render.py against analytic answers: a sphere's depth, a slab's opacity, plane projections."""
import math

import pytest
import torch

import render
from render import (PLANE_AXES, composite, contract, coordinate_triplane, distortion, get_rays,
                    importance_samples, orbit_camera, position_from_features, sample_triplane,
                    stratified_samples)


# --------------------------------------------------------------------------------- cameras
def test_orbit_zero_is_P0():
    c2w = orbit_camera(0.0, 0.0, 2.5)
    P0 = torch.eye(4)
    P0[2, 3] = -2.5
    assert torch.allclose(c2w, P0, atol=1e-6)


@pytest.mark.parametrize("yaw,pitch", [(30.0, 0.0), (-45.0, 15.0), (10.0, -25.0), (170.0, 60.0)])
def test_orbit_looks_at_pivot(yaw, pitch):
    r = 3.0
    c2w = orbit_camera(yaw, pitch, r)
    R, pos = c2w[:3, :3], c2w[:3, 3]
    assert torch.allclose(R.T @ R, torch.eye(3), atol=1e-5) and abs(torch.det(R) - 1) < 1e-5
    assert abs(pos.norm() - r) < 1e-5
    # The pivot (world origin) in camera coordinates is (0, 0, r): on the optical axis, so it
    # projects to the image centre whatever the pose.
    pivot_cam = R.T @ (torch.zeros(3) - pos)
    assert torch.allclose(pivot_cam, torch.tensor([0.0, 0.0, r]), atol=1e-5)
    assert abs(R[1, 0]) < 1e-6                   # no roll: the camera's x axis stays horizontal


def test_orbit_directions():
    # Positive yaw moves the camera to +x (right), positive pitch moves it up (-y).
    assert orbit_camera(20.0, 0.0, 2.0)[0, 3] > 0.5
    assert orbit_camera(0.0, 20.0, 2.0)[1, 3] < -0.5
    batch = orbit_camera(torch.tensor([0.0, 10.0]), torch.tensor([0.0, 5.0]), 2.0)
    assert batch.shape == (2, 4, 4)


def test_rays_centre_and_corners():
    res = 5                                      # odd: the middle pixel's ray is the optical axis
    c2w = orbit_camera(torch.tensor([25.0]), torch.tensor([-10.0]), 2.0)
    o, d = get_rays(c2w, 50.0, res)
    assert o.shape == d.shape == (1, res * res, 3)
    assert torch.allclose(d.norm(dim=-1), torch.ones(1, res * res), atol=1e-6)
    assert torch.allclose(d[0, res * res // 2], c2w[0, :3, 2], atol=1e-6)
    # Top-left pixel looks left (-x) and up (-y) in camera space; its angle matches the FOV.
    d_cam = d[0, 0] @ c2w[0, :3, :3]
    assert d_cam[0] < 0 and d_cam[1] < 0
    f = render.focal_length(50.0, res)
    expect = torch.tensor([(0.5 - res / 2) / f, (0.5 - res / 2) / f, 1.0])
    assert torch.allclose(d_cam, expect / expect.norm(), atol=1e-6)


# ------------------------------------------------------------------------------ contraction
@pytest.mark.parametrize("kind", ["linf", "sphere"])
def test_contraction(kind):
    g = torch.Generator().manual_seed(0)
    inside = (torch.rand(1000, 3, generator=g) * 2 - 1) * (0.577 if kind == "sphere" else 1)
    assert torch.equal(contract(inside, kind), inside)                     # identity inside
    far = torch.randn(1000, 3, generator=g) * 10 ** torch.rand(1000, 1, generator=g) * 1e4
    c = contract(far, kind)
    assert c.abs().max() <= 2 + 1e-6 and torch.isfinite(c).all()           # bounded
    # Continuous across the boundary: points a hair inside and outside map close together.
    v = torch.randn(500, 3, generator=g)
    v = v / (v.abs().amax(-1, keepdim=True) if kind == "linf" else v.norm(dim=-1, keepdim=True))
    gap = (contract(v * (1 + 1e-4), kind) - contract(v * (1 - 1e-4), kind)).norm(dim=-1)
    assert gap.max() < 1e-3
    # Monotone along rays from the pivot: farther points map farther out, never back.
    s = torch.logspace(-1, 4, 200)[:, None, None]                          # (200, 1, 1)
    norm = (lambda x: x.abs().amax(-1)) if kind == "linf" else (lambda x: x.norm(dim=-1))
    n = norm(contract(s * v[None, :20], kind))                             # (200, 20)
    assert (n[1:] > n[:-1]).all()


# -------------------------------------------------------------------------------- triplanes
@pytest.mark.parametrize("plane", [0, 1, 2])
def test_each_plane_projects_on_its_axes(plane):
    """Paint one texel of one plane; it must be read exactly at the 3D points whose two
    coordinates for that plane hit the texel (whatever the third), and nowhere else."""
    R, row, col = 8, 2, 5
    planes = torch.zeros(1, 3, 1, R, R)
    planes[0, plane, 0, row, col] = 3.0
    a, b = PLANE_AXES[plane]
    centre = lambda i: (i + 0.5) / R * 2 - 1                            # texel centre in [-1, 1]
    other = 3 - a - b
    pts = torch.zeros(1, 7, 3)
    pts[0, :, a], pts[0, :, b] = centre(col), centre(row)   # u = width index, v = height index
    pts[0, :, other] = torch.linspace(-0.9, 0.9, 7)
    hit = sample_triplane(planes, pts)[0, :, 0]
    assert torch.allclose(hit, torch.full((7,), 1.0))       # 3.0 averaged over the 3 planes
    # The transposed point (u and v swapped) and points two texels away must read nothing.
    miss = torch.zeros(1, 3, 3)
    miss[0, 0, a], miss[0, 0, b] = centre(row), centre(col)
    miss[0, 1, a], miss[0, 1, b] = centre(col + 2), centre(row)
    miss[0, 2, a], miss[0, 2, b] = centre(col), centre(row - 2)
    assert torch.equal(sample_triplane(planes, miss), torch.zeros(1, 3, 1))


def test_coordinate_triplane_reads_position():
    planes = coordinate_triplane(32)
    pts = (torch.rand(1, 100, 3) * 1.8 - 0.9)                # inside the outermost texel centres
    assert torch.allclose(position_from_features(sample_triplane(planes, pts)), pts * 2,
                          atol=1e-5)


# ---------------------------------------------------------------------------------- samples
def test_stratified_samples_cover_near_and_far():
    t = stratified_samples(1.0, 4.0, 1000.0, 48, (2, 3), perturb=True)
    assert t.shape == (2, 3, 48)
    assert (t[..., 1:] >= t[..., :-1]).all() and t.min() >= 1.0 and t.max() <= 1000.0
    assert ((t > 1) & (t < 4)).sum(-1).min() == 24          # half near the pivot...
    assert (t > 10).sum(-1).min() >= 8                       # ...and the far field gets some,
    assert (1 / t[..., 24:]).diff(dim=-1).abs().max() < 2 * (1 / 4 - 1 / 1000) / 24  # even in 1/t


def test_importance_samples_find_thin_shell():
    """Rays through a thin dense shell: most fine samples must land next to it."""
    torch.manual_seed(0)
    t = stratified_samples(1.0, 4.5, 100.0, 64, (256,), perturb=True)      # (256, 64)
    shell = 2.7 + torch.rand(256, 1) * 0.6                                  # (256, 1)
    sigma = 200.0 * ((t - shell).abs() < 0.05).float()
    _, _, _, w = composite(sigma.unsqueeze(-1), torch.zeros(256, 64, 1), t)
    t_f = importance_samples(t, w, 64, perturb=True)                       # (256, 64)
    assert (t_f[..., 1:] >= t_f[..., :-1]).all()
    hit = w.sum(-1) > 0.5                                    # rays whose coarse pass saw it
    assert hit.float().mean() > 0.8
    # Fine samples bracket the shell to about one coarse step (0.11) either side, so within
    # 0.2 of it, where only ~6% of the coarse samples are.
    near_shell = ((t_f - shell).abs() < 0.2).float().mean(-1)
    assert near_shell[hit].mean() > 0.9
    assert ((t - shell).abs() < 0.2).float().mean() < 0.1


# ------------------------------------------------------------------------------ compositing
@pytest.mark.parametrize("sigma_L", [0.1, 1.0, 3.0])
def test_slab_opacity(sigma_L):
    """A constant-density slab of length L: opacity = 1 - exp(-sigma L)."""
    L, n = 0.5, 8000
    t = (torch.arange(n) + 0.5) * (4.0 / n)                  # midpoint rule, 0.5 mm steps
    sigma = torch.where((t > 1.0) & (t < 1.0 + L), sigma_L / L, 0.0)
    feats, dist, opacity, w = composite(sigma[:, None], torch.ones(n, 1), t)
    assert abs(opacity.item() - (1 - math.exp(-sigma_L))) < 1e-3
    assert abs(feats.item() - opacity.item()) < 1e-6        # constant colour: C = opacity
    # Expected distance inside an exponential slab: 1 + (1/s - L e^{-sL}/(1 - e^{-sL})) * ...
    s = sigma_L / L
    mean_t = 1 + 1 / s - L * math.exp(-sigma_L) / (1 - math.exp(-sigma_L))
    assert abs(dist.item() / opacity.item() - mean_t) < 1e-3


def test_a_ray_whose_only_density_is_at_its_last_sample_is_opaque():
    """The last sample's interval reaches to infinity (the far background is a solid wall
    behind everything), so any density there absorbs the rest of the ray: opacity 1, all of
    the weight on that sample. With a zero-length last interval it would be transparent."""
    t = torch.linspace(1.0, 5.0, 8)
    sigma = torch.zeros(8)
    sigma[-1] = 0.5
    feats, dist, opacity, w = composite(sigma[:, None], torch.ones(8, 1), t)
    assert abs(opacity.item() - 1.0) < 1e-6 and abs(w[-1].item() - 1.0) < 1e-6
    assert w[:-1].abs().max() == 0 and abs(dist.item() - 5.0) < 1e-5


def test_two_slabs_multiply_transmittance():
    n = 8000
    t = (torch.arange(n) + 0.5) * (4.0 / n)
    sigma = torch.where((t > 1.0) & (t < 1.5), 1.0, 0.0) + torch.where((t > 2) & (t < 2.25), 4.0, 0)
    _, _, opacity, _ = composite(sigma[:, None], torch.ones(n, 1), t)
    assert abs(opacity.item() - (1 - math.exp(-0.5 - 1.0))) < 1e-3


def test_distortion_matches_its_double_sum():
    """The O(S) form equals the definition, sum_ij w_i w_j |m_i - m_j| + 1/3 sum_i w_i^2 d_i,
    written out as an (S, S) matrix in normalised disparity."""
    torch.manual_seed(0)
    near, far = 1.0, 100.0
    t = torch.sort(near + torch.rand(5, 12) * 20).values                 # (rays, S) sorted
    w = torch.rand(5, 12) / 12
    s = (1 / near - 1 / t) / (1 / near - 1 / far)
    edges = torch.cat([s, torch.ones(5, 1)], -1)
    m, d = (edges[:, 1:] + edges[:, :-1]) / 2, edges[:, 1:] - edges[:, :-1]
    brute = (w[:, :, None] * w[:, None, :] * (m[:, :, None] - m[:, None, :]).abs()).sum((1, 2))
    brute = brute + (w.square() * d).sum(-1) / 3
    assert torch.allclose(distortion(w, t, near, far).squeeze(-1), brute, atol=1e-6)


def test_distortion_prefers_one_surface_to_a_ghost():
    """One opaque slab of density sigma: its weights fall off as sigma e^{-sigma x} inside it,
    and for that distribution sum_ij w_i w_j |t_i - t_j| = E|X - Y| = 1 / sigma (times ds/dt,
    to put it in normalised disparity). A faint ghost in front (weight a) adds the pair term
    2 a (1 - a) (s_wall - s_ghost), which is far larger."""
    n, near, far = 4000, 1.0, 1000.0
    t = near + (torch.arange(n) + 0.5) * (4.0 / n)
    wall = torch.where((t > 3.0) & (t < 3.02), 500.0, 0.0)                # opaque, 2 cm thick
    ghost = torch.where((t > 1.5) & (t < 1.52), 30.0, 0.0)                # opacity 1 - e^-0.6
    one = distortion(composite(wall[:, None], torch.ones(n, 1), t)[3], t, near, far).item()
    two_w = composite((wall + ghost)[:, None], torch.ones(n, 1), t)[3]
    two = distortion(two_w, t, near, far).item()
    s = lambda x: (1 / near - 1 / x) / (1 / near - 1 / far)
    a = 1 - math.exp(-0.6)                                                # the ghost's weight
    ds_dt = 1 / 3.0 ** 2 / (1 / near - 1 / far)                           # at the wall
    assert abs(one - ds_dt / 500) < 0.05 * one
    assert abs(two - 2 * a * (1 - a) * (s(3.0) - s(1.5))) < 0.02 * two
    assert two > 100 * one


def _sphere_field(centre, radius, density=1e3):
    def field(feats):
        x = position_from_features(feats)                    # contracted == world inside |x|<1
        inside = (x - centre).norm(dim=-1, keepdim=True) < radius
        return density * inside.float(), torch.ones_like(x[..., :1])
    return field


def test_render_sphere_depth_matches_ray_intersection():
    centre, rad, R0 = torch.tensor([0.15, -0.1, 0.2]), 0.55, 2.7
    cams = orbit_camera(torch.tensor([0.0, 25.0]), torch.tensor([0.0, -15.0]), R0)
    res, fov = 32, 40.0
    out = render.render(coordinate_triplane(128).expand(2, -1, -1, -1, -1),
                        _sphere_field(centre, rad), cams, fov, res, n_coarse=64, n_fine=64)
    assert out["depth"].shape == out["opacity"].shape == (2, 1, res, res)
    # Analytic: t = -b - sqrt(b^2 - |o - c|^2 + r^2); z-depth = t * cos(ray, optical axis).
    o, d = get_rays(cams, fov, res)
    oc = o - centre
    b = (oc * d).sum(-1)
    disc = b * b - (oc * oc).sum(-1) + rad * rad
    t_hit = -b - disc.clamp_min(0).sqrt()
    z = t_hit * (d * cams[:, None, :3, 2]).sum(-1)
    depth, opacity = out["depth"].flatten(1), out["opacity"].flatten(1)
    solid = disc > 0.02                                      # clearly on the sphere
    empty = disc < -0.02                                     # clearly beside it
    assert solid.sum() > 200 and empty.sum() > 200
    assert ((depth[solid] - z[solid]).abs() / z[solid]).max() < 0.02
    assert opacity[solid].min() > 0.99 and opacity[empty].max() < 0.01


def test_render_constant_slab_end_to_end():
    """Through the full renderer (rays, samples, contraction, lookup): a slab 0.4 thick across
    the view, density 2.5 -> the centre pixel's opacity is 1 - exp(-1)."""
    def field(feats):
        x = position_from_features(feats)
        return 2.5 * ((x[..., 2:3] > -0.2) & (x[..., 2:3] < 0.2)).float(), torch.ones_like(x)
    out = render.render(coordinate_triplane(64), field, orbit_camera(0.0, 0.0, 2.7)[None],
                        30.0, 3, n_coarse=256, n_fine=256)
    assert abs(out["opacity"][0, 0, 1, 1].item() - (1 - math.exp(-1.0))) < 5e-3


def test_chunking_gives_the_same_image():
    planes = coordinate_triplane(32).expand(2, -1, -1, -1, -1)
    cams = orbit_camera(torch.tensor([-10.0, 10.0]), torch.tensor([5.0, 0.0]), 2.7)
    field = _sphere_field(torch.zeros(3), 0.6, 30.0)
    a = render.render(planes, field, cams, 40.0, 16, n_coarse=16, n_fine=16)
    b = render.render(planes, field, cams, 40.0, 16, n_coarse=16, n_fine=16, chunk=50)
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5)


def test_gradients_reach_planes_and_mlp():
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Softplus(), torch.nn.Linear(16, 4))

    def field(feats):
        h = mlp(feats)
        return torch.nn.functional.softplus(h[..., :1]), torch.sigmoid(h[..., 1:])
    planes = torch.randn(2, 3, 8, 16, 16, requires_grad=True)
    cams = orbit_camera(torch.tensor([0.0, 15.0]), torch.tensor([0.0, 5.0]), 2.7)
    out = render.render(planes, field, cams, 40.0, 8, n_coarse=8, n_fine=8, perturb=True)
    (out["features"].mean() + out["depth"].mean()).backward()
    for g in [planes.grad] + [p.grad for p in mlp.parameters()]:
        assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


def test_bad_camera_shape_is_a_clear_error():
    with pytest.raises(ValueError, match="cam2world"):
        render.render(coordinate_triplane(8), _sphere_field(torch.zeros(3), 0.5),
                      torch.eye(4), 40.0, 4)


def test_forward_warp_keeps_the_photo_at_P0_and_moves_it_elsewhere():
    torch.manual_seed(0)
    image = torch.rand(1, 3, 16, 16) * 2 - 1
    depth = 2.0 + torch.rand(1, 1, 16, 16)
    for splat in (1, 2):
        same, hit = render.forward_warp(image, depth, render.orbit_camera(0.0, 0.0, 2.7)[None],
                                        40.0, 2.7, splat=splat)
        assert torch.allclose(same, image, atol=1e-6) and hit.all()
    # A turned camera moves the pixels: the warp differs from the input.
    moved, _ = render.forward_warp(image, depth, render.orbit_camera(15.0, 0.0, 2.7)[None],
                                   40.0, 2.7)
    assert not torch.allclose(moved, image)


def test_forward_warp_of_a_wall_lands_where_its_rays_meet_it():
    """A wall at z = 1 (depth 3.7 from P0) carrying a colour ramp, seen from yaw 25: every
    target pixel whose ray meets the wall inside the input's view frustum is hit (splat 2 leaves
    no cracks), shows the colour of the input pixel it meets (within a pixel's ramp step),
    and nothing outside it is hit."""
    res, fov, radius = 32, 40.0, 2.7
    ramp = torch.linspace(-1, 1, res)
    image = torch.stack([ramp.expand(res, res), ramp[:, None].expand(res, res),
                         torch.zeros(res, res)])[None]                     # red: u, green: v
    depth = torch.full((1, 1, res, res), radius + 1.0)
    cam = render.orbit_camera(25.0, 0.0, radius)[None]
    warped, hit = render.forward_warp(image, depth, cam, fov, radius, splat=2)
    # Analytic: each target ray meets z = 1 at o + t d; project that point into P0.
    o, d = render.get_rays(cam, fov, res)                                   # (1, N, 3)
    p = o + ((1.0 - o[..., 2:]) / d[..., 2:]) * d
    px, py, _ = render.project(p, render.orbit_camera(0.0, 0.0, radius)[None], fov, res)
    inside = ((px >= 1) & (px < res - 1) & (py >= 1) & (py < res - 1)).view(1, 1, res, res)
    outside = ((px < -1) | (px > res) | (py < -1) | (py > res)).view(1, 1, res, res)
    assert inside.float().mean() > 0.5 and outside.any()
    assert hit[inside].all() and not hit[outside].any()
    expect = image.flatten(2)[0, :, (py.clamp(0, res - 1) * res + px.clamp(0, res - 1))[0]]
    err = (warped.flatten(2)[0] - expect).abs()[:2]                         # (2, N)
    assert err[:, inside.flatten()].max() <= 2 * 2 / (res - 1) + 1e-5
