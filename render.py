"""
render.py -- cameras, rays, triplanes, scene contraction and the volume renderer.

WildFusion (Schwarz et al., ICLR 2024, arXiv 2311.13570), Sec. 3.1 "3D-aware autoencoder":
the decoder turns a latent into a *triplane* (three axis-aligned 2D feature planes, as in EG3D)
and renders it with volume rendering (as in NeRF) from the input camera P0 and from novel views.
Scenes in the wild are unbounded (a wall, the sky), so points are squeezed into a bounded cube by a
*scene contraction* (mip-NeRF 360) before the triplane lookup.

This file has no learnable parameters and no training code: it is the geometry every other stage
uses. Read it top to bottom:

    1. cameras     orbit_camera (yaw, pitch about the pivot), focal_length, get_rays
    2. contraction contract: identity near the pivot, the rest of space squeezed into a cube
    3. triplanes   sample_triplane: project 3D points on the xy, xz, yz planes, bilinear lookup
    4. samples     stratified_samples (linear near the pivot, linear in disparity beyond),
                   importance_samples (inverse CDF of the coarse weights)
    5. compositing composite: alpha, transmittance, weights, features, z-depth, opacity;
                   distortion: how spread out a ray's weights are (a training loss)
    6. render      the entry point: rays -> coarse pass -> fine pass -> images (B, C, H, W)
    7. warping     forward_warp: a photo moved to another camera by its depth map (z-buffer);
                   seen_by_input: which pixels of a novel view the photo saw

Conventions: OpenCV camera axes (x right, y down, z forward), `cam2world` 4x4
matrices, square images with a field of view `fov_deg`. The world is *view space*: the pivot the
camera orbits is the origin and the input camera P0 sits at (0, 0, -radius) looking down +z.

Quick check: `python render.py` renders a procedural triplane from a few views into render_demo.png.
"""
import math

import torch
import torch.nn.functional as F


# ---------------------------------------------------------------------------------------------
# 1. Cameras
# ---------------------------------------------------------------------------------------------
def orbit_camera(yaw_deg, pitch_deg, radius):
    """cam2world of a camera on a sphere of `radius` around the origin, looking at the origin.

    (yaw, pitch) = (0, 0) is the input camera P0 at (0, 0, -radius) with identity rotation.
    Positive yaw moves the camera to the right (+x), positive pitch moves it up (-y, since y
    points down) so it looks down at the pivot. There is never any roll: the camera's x axis
    stays horizontal. Accepts floats or tensors of any (matching) shape; returns (..., 4, 4).
    """
    yaw = torch.deg2rad(torch.as_tensor(yaw_deg, dtype=torch.float32))
    pitch = torch.deg2rad(torch.as_tensor(pitch_deg, dtype=torch.float32))
    yaw, pitch = torch.broadcast_tensors(yaw, pitch)
    cy, sy, cp, sp = yaw.cos(), yaw.sin(), pitch.cos(), pitch.sin()
    zero, one = torch.zeros_like(yaw), torch.ones_like(yaw)
    # R = R_y(-yaw) @ R_x(-pitch): tilt first (about the camera's own x axis), then turn about
    # the world's vertical y axis. Columns of R are the camera's x, y, z axes in world space.
    R_yaw = torch.stack([cy, zero, -sy, zero, one, zero, sy, zero, cy], -1).unflatten(-1, (3, 3))
    R_pitch = torch.stack([one, zero, zero, zero, cp, sp, zero, -sp, cp], -1).unflatten(-1, (3, 3))
    R = R_yaw @ R_pitch                                                     # (..., 3, 3)
    # The camera sits at R @ (0, 0, -radius): P0's position, rotated about the pivot.
    position = -radius * R[..., :, 2]                                       # (..., 3)
    cam2world = torch.zeros(*R.shape[:-2], 4, 4)
    cam2world[..., :3, :3] = R
    cam2world[..., :3, 3] = position
    cam2world[..., 3, 3] = 1.0
    return cam2world                                                        # (..., 4, 4)


def p0_camera(n, radius):
    """The input camera P0 (yaw 0, pitch 0), n times -> (n, 4, 4)."""
    return orbit_camera(torch.zeros(n), torch.zeros(n), radius)


def focal_length(fov_deg, res):
    """Pinhole focal length in pixels for a square image: f = (res / 2) / tan(fov / 2)."""
    return 0.5 * res / math.tan(math.radians(fov_deg) / 2)


def get_rays(cam2world, fov_deg, res):
    """One ray per pixel centre. cam2world (B, 4, 4) -> origins, unit directions (B, res*res, 3).

    Pixel (i, j) (row i, column j) has its centre at (j + 0.5, i + 0.5); its direction in camera
    space is ((u - c) / f, (v - c) / f, 1), c = res / 2, which we rotate into the world and
    normalise. Rays are ordered row-major, so `.view(B, res, res, 3)` gives the image layout.
    """
    f = focal_length(fov_deg, res)
    pix = (torch.arange(res, dtype=torch.float32, device=cam2world.device) + 0.5 - 0.5 * res) / f
    v, u = torch.meshgrid(pix, pix, indexing="ij")                          # (H, W) each
    dirs_cam = torch.stack([u, v, torch.ones_like(u)], -1).view(1, -1, 3)   # (1, HW, 3)
    dirs = dirs_cam @ cam2world[:, :3, :3].transpose(1, 2)                  # (B, HW, 3) = R d
    dirs = F.normalize(dirs, dim=-1)
    origins = cam2world[:, None, :3, 3].expand_as(dirs)                     # (B, HW, 3)
    return origins, dirs


# ---------------------------------------------------------------------------------------------
# 2. Scene contraction (mip-NeRF 360, Barron et al. 2022, Eq. 10; L-infinity variant from MERF)
# ---------------------------------------------------------------------------------------------
def contract(x, kind="linf"):
    """Map all of R^3 into the cube [-2, 2]^3, leaving the unit region around the pivot untouched.

    kind="sphere" (mip-NeRF 360):  x                       if ||x|| <= 1
                                   (2 - 1/||x||) x/||x||    otherwise
    kind="linf"   (MERF's variant, with the L-infinity norm m = max_i |x_i|): inside the unit
        cube x stays; outside, the largest coordinate becomes (2 - 1/m) sign(x_i) and the others
        x_i / m. Its level sets are cubes, so contracted space lines up with the axis-aligned
        triplanes and no corner of a plane is wasted (the sphere version leaves the cube's
        corners empty). Both are continuous at the boundary (2 - 1/1 = 1) and squeeze the whole
        far field, out to infinity, into the shell between norm 1 and 2.
    """
    if kind == "sphere":
        n = x.norm(dim=-1, keepdim=True).clamp_min(1e-9)
        return torch.where(n <= 1, x, (2 - 1 / n) * x / n)
    if kind != "linf":
        raise ValueError(f"contract: kind must be 'linf' or 'sphere', got {kind!r}")
    m = x.abs().amax(dim=-1, keepdim=True).clamp_min(1e-9)                   # L-inf norm (..., 1)
    outside = (x / m) * torch.where(x.abs() >= m, 2 - 1 / m, torch.ones_like(m))
    return torch.where(m <= 1, x, outside)


# ---------------------------------------------------------------------------------------------
# 3. Triplane lookup (EG3D, Chan et al. 2022, Sec. 3.2)
# ---------------------------------------------------------------------------------------------
# planes[:, 0] is the xy plane, planes[:, 1] the xz plane, planes[:, 2] the yz plane. A plane's
# first coordinate indexes its width (last tensor dim), the second its height, which is exactly
# how grid_sample reads (u, v). tests/test_render.py paints a texel on each plane and checks
# that it is read back at the 3D points that project there, and nowhere else.
PLANE_AXES = ((0, 1), (0, 2), (1, 2))  # (u, v) = (x, y), (x, z), (y, z)


def sample_triplane(planes, points):
    """Bilinear triplane features at 3D points. planes (B, 3, C, R, R), points (B, N, 3) in
    [-1, 1]^3 -> features (B, N, C).

    Each point is projected orthogonally on each plane (drop one coordinate), the plane is read
    with bilinear interpolation and the three features are averaged (EG3D also averages; the
    mean keeps the feature scale independent of the number of planes, and the field MLP can
    undo any fixed scale). All three planes go through ONE grid_sample call by folding the plane
    axis into the batch instead of three calls, one per plane: the same numbers (max difference
    0) from fewer, larger kernels, which is faster forward and backward.
    """
    B, P, C, R, _ = planes.shape
    uv = torch.stack([points[..., list(a)] for a in PLANE_AXES], dim=1)     # (B, 3, N, 2)
    feats = F.grid_sample(planes.reshape(B * P, C, R, R), uv.reshape(B * P, 1, -1, 2),
                          mode="bilinear", padding_mode="border", align_corners=False)
    # Sum, then divide the (3x smaller) result: cheaper in the backward pass than .mean(1).
    feats = ContiguousGrad.apply(feats.view(B, P, C, -1).sum(1) / P)       # (B, C, N)
    return feats.transpose(1, 2)                                            # (B, N, C)


class ContiguousGrad(torch.autograd.Function):
    """Identity forward; backward makes the gradient contiguous, here, once.

    The gradient of the (B, N, C) features arrives transposed as (B, C, N). Left as it is, it is
    expanded over the 3 planes and grid_sample's backward copies the 3x larger expanded,
    transposed tensor into a contiguous one, a slow strided copy. Transposing the 3x smaller
    gradient once here leaves grid_sample a plain sequential copy: the same gradients (max
    difference 0), sooner."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


# ---------------------------------------------------------------------------------------------
# 4. Where to put samples along each ray
# ---------------------------------------------------------------------------------------------
def stratified_samples(near, mid, far, n, shape, lin_frac=0.5, perturb=False, device=None):
    """Distances t (along the unit ray direction) of n samples per ray, sorted. -> (*shape, n)

    The first `lin_frac` of the samples are spread evenly in t over [near, mid], the region
    around the pivot where the object is. The rest are spread evenly in *disparity* 1/t over
    [mid, far]: far away, equal steps in 1/t are roughly equal steps in contracted space, so the
    background (wall, sky) gets samples too without wasting them on empty distance (mip-NeRF
    360's spacing). With perturb=True each sample is jittered inside its bin (training);
    otherwise bin centres are used (evaluation, deterministic).
    """
    n_lin = min(n, max(1, round(n * lin_frac)))
    n_far = n - n_lin
    u = torch.rand(*shape, n, device=device) if perturb else torch.full((*shape, n), 0.5,
                                                                          device=device)
    s = torch.arange(n, device=device) + u                                  # bin index + offset
    s_lin = s[..., :n_lin] / n_lin                                          # in [0, 1)
    t_lin = near + (mid - near) * s_lin
    s_far = (s[..., n_lin:] - n_lin) / max(n_far, 1)                        # in [0, 1)
    t_far = 1 / (1 / mid + (1 / far - 1 / mid) * s_far)                     # linear in 1/t
    return torch.cat([t_lin, t_far], -1)                                    # (*shape, n)


def importance_samples(t, weights, n, perturb=False):
    """n new distances drawn from the piecewise-constant PDF given by the coarse weights.

    t, weights (..., S). Sample i owns the interval between the midpoints to its neighbours;
    pdf_i ~ w_i, and inverting the CDF of that PDF at n (jittered) quantiles puts
    samples where the coarse pass found matter (NeRF, Mildenhall et al. 2020, Sec. 5.2).
    Gradients do not flow through the sample positions. Returns (..., n), sorted.
    """
    t, weights = t.detach(), weights.detach()
    mids = 0.5 * (t[..., 1:] + t[..., :-1])
    edges = torch.cat([t[..., :1], mids, t[..., -1:]], -1)                  # (..., S+1)
    # Point samples only say that a surface lies somewhere between the last empty sample and
    # the first full one, i.e. possibly in the bin *before* the first non-zero weight. A max
    # over each weight's neighbours (mip-NeRF's weight blur) widens the PDF by one bin either
    # side so the fine samples bracket the surface; without it depth is biased by up to half
    # a coarse step (tests/test_render.py checks a sphere's depth to 2%).
    padded = F.pad(weights, (1, 1))
    weights = torch.maximum(torch.maximum(padded[..., :-2], padded[..., 1:-1]), padded[..., 2:])
    pdf = weights + 1e-5                                                    # never a zero PDF
    pdf = pdf / pdf.sum(-1, keepdim=True)
    cdf = torch.cat([torch.zeros_like(pdf[..., :1]), pdf.cumsum(-1)], -1)   # (..., S+1)
    cdf[..., -1] = 1.0
    u = (torch.arange(n, device=t.device) + (torch.rand(*t.shape[:-1], n, device=t.device)
                                             if perturb else 0.5)) / n      # (..., n)
    u = u.expand(*t.shape[:-1], n).contiguous()
    idx = torch.searchsorted(cdf, u, right=True).clamp(1, edges.shape[-1] - 1)
    c0, c1 = cdf.gather(-1, idx - 1), cdf.gather(-1, idx)
    e0, e1 = edges.gather(-1, idx - 1), edges.gather(-1, idx)
    frac = ((u - c0) / (c1 - c0).clamp_min(1e-9)).clamp(0, 1)
    return e0 + frac * (e1 - e0)                                            # (..., n)


# ---------------------------------------------------------------------------------------------
# 5. Volume compositing (NeRF's quadrature, Max 1995)
# ---------------------------------------------------------------------------------------------
def composite_weights(sigma, t):
    """Compositing weights of samples along each ray, front to back.

    sigma (..., S) density >= 0 [1 / world unit], t (..., S) sorted distances.
        delta_i = t_{i+1} - t_i          (the last sample's interval reaches to infinity)
        alpha_i = 1 - exp(-sigma_i delta_i)
        T_i     = prod_{j<i} (1 - alpha_j)       transmittance: light that reaches sample i
        w_i     = T_i alpha_i
    -> w (..., S). A ray's colour is sum_i w_i c_i, its distance sum_i w_i t_i, its opacity
    sum_i w_i = 1 - T_S.
    """
    delta = torch.cat([t[..., 1:] - t[..., :-1], torch.full_like(t[..., :1], 1e10)], -1)
    alpha = 1 - torch.exp(-sigma * delta)                                   # (..., S)
    # T_i via a cumulative product of (1 - alpha); the leading 1 makes it exclusive (j < i).
    T = torch.cumprod(torch.cat([torch.ones_like(alpha[..., :1]), 1 - alpha + 1e-10], -1), -1)
    return alpha * T[..., :-1]                                              # (..., S)


def composite(sigma, feats, t):
    """Alpha-composite samples: sigma (..., S, 1), feats (..., S, F), t (..., S) sorted ->
    features sum_i w_i f_i (..., F), distance sum_i w_i t_i (..., 1), opacity (..., 1),
    weights (..., S)."""
    weights = composite_weights(sigma.squeeze(-1), t)                       # (..., S)
    features = (weights.unsqueeze(-2) @ feats).squeeze(-2)                  # (..., F)
    distance = (weights * t).sum(-1, keepdim=True)                          # (..., 1)
    return features, distance, weights.sum(-1, keepdim=True), weights


def distortion(weights, t, near, far):
    """mip-NeRF 360's distortion of each ray's weights (Barron et al. 2022, Eq. 15): small when
    a ray's weight sits in one short stretch (a surface), large when it is spread out or split
    between two places (fog, or a ghost in front of the true surface).

    weights, t (..., S) sorted; sample i owns the interval [t_i, t_{i+1}] (the last one reaches
    to `far`), as in composite_weights. Distances are measured in normalised disparity
    s = (1/near - 1/t) / (1/near - 1/far) in [0, 1], so the far field (spaced evenly in 1/t)
    does not dominate. With interval midpoints m_i and lengths d_i:
        L = sum_ij w_i w_j |m_i - m_j|  +  1/3 sum_i w_i^2 d_i
    The double sum in O(S) (the samples are sorted, so |m_i - m_j| = m_i - m_j for j < i):
        sum_ij w_i w_j |m_i - m_j| = 2 sum_i w_i (m_i sum_{j<i} w_j - sum_{j<i} w_j m_j)
    -> (..., 1). Only a training loss (autoencoder.py --dist-weight); it changes no rendering.
    """
    s = (1 / near - 1 / t.clamp_min(near)) / (1 / near - 1 / far)          # (..., S) in [0, 1]
    edges = torch.cat([s, torch.ones_like(s[..., :1])], -1)                 # (..., S+1)
    mid, length = 0.5 * (edges[..., 1:] + edges[..., :-1]), edges[..., 1:] - edges[..., :-1]
    w_before = weights.cumsum(-1) - weights                                 # sum_{j<i} w_j
    wm_before = (weights * mid).cumsum(-1) - weights * mid                  # sum_{j<i} w_j m_j
    pairs = 2 * (weights * (mid * w_before - wm_before)).sum(-1, keepdim=True)
    return pairs + (weights.square() * length).sum(-1, keepdim=True) / 3


# ---------------------------------------------------------------------------------------------
# 6. The renderer
# ---------------------------------------------------------------------------------------------
def _query(planes, field, points, contraction):
    """The per-sample hot path: world points (B, M, 3) -> density (B, M, 1), features (B, M, F).

    Contract into [-2, 2]^3, divide by 2 to land in grid_sample's [-1, 1]^3, read the triplane,
    and let the field MLP turn triplane features into a density and a feature vector.
    """
    feats = sample_triplane(planes, contract(points, contraction) / 2)      # (B, M, C)
    return field(feats)


_compiled = {}


def _query_fn(compile, device):
    """torch.compile the hot path when asked (CUDA: Triton kernels; CPU: C++ from inductor,
    which needs a C++ compiler on the machine); eager otherwise."""
    if not compile:
        return _query
    if "fn" not in _compiled:
        _compiled["fn"] = torch.compile(_query, dynamic=False)
    return _compiled["fn"]


def default_bounds(radius):
    """(near, mid, far) distances for a camera at `radius` from the pivot.

    The unit cube around the pivot (the un-contracted region) lies between radius - sqrt(3) and
    radius + sqrt(3) from any orbit camera; beyond `mid` only the contracted far field remains,
    sampled out to 1000 radii (contracted norm 2 - 1/1000: as good as infinity).
    """
    near = max(radius - math.sqrt(3), 0.05 * radius)
    return near, radius + math.sqrt(3), 1000.0 * radius


def render(planes, field, cam2world, fov_deg, res, radius=None, n_coarse=48, n_fine=48,
           near=None, far=None, lin_frac=0.5, perturb=False, contraction="linf",
           chunk=65536, compile=False, with_distortion=False):
    """Volume-render triplanes from cameras.

    planes     (B, 3, C, R, R) triplane features (xy, xz, yz planes over contracted space)
    field      callable: features (B, M, C) -> (density (B, M, 1) >= 0, features (B, M, F))
    cam2world  (B, 4, 4); fov_deg, res: square pinhole camera of res x res pixels
    radius     distance of the camera from the pivot; sets the sampling bounds (default: read
               from cam2world)
    n_coarse, n_fine  stratified samples per ray, then importance samples from their weights
    chunk      rays evaluated at once (over the whole batch): bounds memory at high resolution
    compile    run the per-sample hot path through torch.compile (any device)

    Returns dict of (B, ., H, W) maps: features (F channels), depth (z-depth along the camera's
    optical axis, world units; composited as sum_i w_i z_i, so it shrinks towards 0 where the
    opacity is below 1), opacity; with_distortion=True also distortion (how spread out each
    ray's weights are, `distortion`: a training loss, so not computed unless asked).
    """
    B = planes.shape[0]
    if cam2world.shape != (B, 4, 4):
        raise ValueError(f"render: cam2world must be ({B}, 4, 4) to match planes, "
                         f"got {tuple(cam2world.shape)}")
    cam2world = cam2world.to(planes.device, torch.float32)
    if radius is None:
        radius = cam2world[:, :3, 3].norm(dim=-1).max().item()
    d_near, mid, d_far = default_bounds(radius)
    near = d_near if near is None else near
    far = d_far if far is None else far
    query = _query_fn(compile, planes.device)

    origins, dirs = get_rays(cam2world, fov_deg, res)                       # (B, HW, 3) each
    # z-depth of a point at distance t along the unit ray is t * cos(angle to optical axis).
    cos = (dirs * cam2world[:, None, :3, 2]).sum(-1, keepdim=True)          # (B, HW, 1)
    outputs, spreads = [], []
    step = max(1, chunk // B)
    for i in range(0, origins.shape[1], step):
        o, d = origins[:, i:i + step], dirs[:, i:i + step]                  # (B, N, 3)
        N = o.shape[1]
        # Coarse pass: evaluate the field at stratified samples.
        t_c = stratified_samples(near, mid, far, n_coarse, (B, N), lin_frac, perturb,
                                 planes.device)                             # (B, N, Sc)
        x_c = (o.unsqueeze(2) + t_c.unsqueeze(-1) * d.unsqueeze(2))         # (B, N, Sc, 3)
        sigma_c, feat_c = query(planes, field, x_c.view(B, -1, 3), contraction)
        sigma_c, feat_c = sigma_c.view(B, N, n_coarse, 1), feat_c.view(B, N, n_coarse, -1)
        if n_fine == 0:
            feats, dist, opacity, w_sorted = composite(sigma_c, feat_c, t_c)  # (B, N, .)
            t_all = t_c
        else:
            # Fine pass: importance-sample where the coarse weights are and evaluate only the
            # new samples; the coarse outputs are reused, not recomputed.
            w_c = composite_weights(sigma_c.squeeze(-1), t_c)
            t_f = importance_samples(t_c, w_c, n_fine, perturb)             # (B, N, Sf)
            x_f = o.unsqueeze(2) + t_f.unsqueeze(-1) * d.unsqueeze(2)       # (B, N, Sf, 3)
            sigma_f, feat_f = query(planes, field, x_f.view(B, -1, 3), contraction)
            feat_f = feat_f.view(B, N, n_fine, -1)
            # Compositing needs all samples sorted by distance, but only the densities: sort
            # those (1 channel), get the weights, and hand each weight back to its sample in
            # the original order (order.argsort() is the inverse permutation). The F-channel
            # features are never concatenated or permuted, the costliest part of the textbook
            # merge-and-sort (slower forward and backward), which reads:
            #   t, sigma, feat = cat((t_c, t_f)), cat((sigma_c, sigma_f)), cat((feat_c, feat_f))
            #   order = t.argsort(); feat_map = sum_i composite_weights(...)_i feat[order][i]
            t_all, order = torch.cat([t_c, t_f], -1).sort(-1)               # (B, N, S)
            sigma_all = torch.cat([sigma_c.view(B, N, -1), sigma_f.view(B, N, -1)], -1)
            w_sorted = composite_weights(sigma_all.gather(-1, order), t_all)   # (B, N, S)
            w = w_sorted.gather(-1, order.argsort(-1))                      # original order
            feats = ((w[..., None, :n_coarse] @ feat_c) +                    # (B, N, 1, F)
                     (w[..., None, n_coarse:] @ feat_f)).squeeze(-2)
            dist = (w_sorted * t_all).sum(-1, keepdim=True)
            opacity = w_sorted.sum(-1, keepdim=True)
        if with_distortion:
            spreads.append(distortion(w_sorted, t_all, near, far))         # (B, N, 1)
        outputs.append(torch.cat([feats, dist * cos[:, i:i + step], opacity], -1))
    to_maps = lambda x: torch.cat(x, 1).transpose(1, 2).unflatten(-1, (res, res))
    out = to_maps(outputs)                                                  # (B, F+2, H, W)
    maps = dict(features=out[:, :-2], depth=out[:, -2:-1], opacity=out[:, -1:])
    if with_distortion:
        maps["distortion"] = to_maps(spreads)                               # (B, 1, H, W)
    return maps


# ---------------------------------------------------------------------------------------------
# 7. Moving a photo to another camera by its depth
# ---------------------------------------------------------------------------------------------
# A photo with a depth map is a cloud of coloured 3D points: lift every pixel along its ray to
# its depth, then project the points into any other camera. Where they land, the photo says
# what the new view shows (the pixels it saw); where none land, it has no say (disocclusions).
# evaluate.py builds its depth-warp baseline from this, and its split of a novel view into the
# pixels the photo saw and the disoccluded ones.
def lift(depth, cam2world, fov_deg):
    """Every pixel of a z-depth map (B, 1, H, W) seen from cam2world (B, 4, 4) -> world points
    (B, H*W, 3): the pixel centre's ray (u, v, 1) in camera space, scaled by its z-depth."""
    B, _, H, W = depth.shape
    f = focal_length(fov_deg, H)
    pix = (torch.arange(H, dtype=torch.float32, device=depth.device) + 0.5 - H / 2) / f
    v, u = torch.meshgrid(pix, pix, indexing="ij")
    z = depth[:, 0]                                                          # (B, H, W)
    cam = torch.stack([u * z, v * z, z], -1).view(B, -1, 3)
    return cam @ cam2world[:, :3, :3].transpose(1, 2) + cam2world[:, None, :3, 3]


def project(points, cam2world, fov_deg, res):
    """World points (B, N, 3) into a camera -> pixel column, row (long) and z-depth (B, N)."""
    f = focal_length(fov_deg, res)
    cam = (points - cam2world[:, None, :3, 3]) @ cam2world[:, :3, :3]        # world -> camera
    z = cam[..., 2]
    px = (cam[..., 0] / z * f + res / 2).floor().long()
    py = (cam[..., 1] / z * f + res / 2).floor().long()
    return px, py, z


def forward_warp(image, depth, cam2world, fov_deg, radius, splat=1):
    """Move a photo taken from P0 into another camera: lift each pixel to 3D by its depth,
    project it into cam2world, and keep the nearest point per target pixel (a z-buffer).
    image (B, 3, H, W), depth (B, 1, H, W), cam2world (B, 4, 4) -> the warped image
    (B, 3, H, W), holes filled with the photo's mean colour, and hit (B, 1, H, W), True where
    some point landed.

    splat > 1 lifts each pixel as splat x splat points spread over its footprint (the photo and
    depth enlarged by nearest neighbour): a surface that the turn stretches, by up to `splat`
    times, then leaves no cracks that the background behind it could show through."""
    B, _, H, W = image.shape
    if splat > 1:
        image, depth = (F.interpolate(x, scale_factor=splat, mode="nearest")
                        for x in (image, depth))                            # (B, ., sH, sW)
    P0 = p0_camera(B, radius).to(depth.device)
    px, py, zc = project(lift(depth, P0, fov_deg), cam2world, fov_deg, H)    # (B, N) each
    ok = (zc > 1e-3) & (px >= 0) & (px < W) & (py >= 0) & (py < H)
    out = image.mean((2, 3), keepdim=True).expand(-1, -1, H, W).clone()
    hit = torch.zeros(B, 1, H, W, dtype=torch.bool, device=image.device)
    for b in range(B):
        idx = (py[b] * W + px[b])[ok[b]]
        zb, cols = zc[b][ok[b]], image[b].flatten(1)[:, ok[b]]
        # z-buffer without write races: sort by depth (near first), then stably by target
        # pixel, and keep the first source per target -- the nearest, the same on any CPU/GPU.
        near = torch.argsort(zb)
        by_pixel = near[torch.argsort(idx[near], stable=True)]
        first = torch.ones_like(by_pixel, dtype=torch.bool)
        first[1:] = idx[by_pixel][1:] != idx[by_pixel][:-1]
        win = by_pixel[first]
        out[b].view(3, -1)[:, idx[win]] = cols[:, win]
        hit[b].view(-1)[idx[win]] = True
    return out, hit


def seen_by_input(view_depth, cam2world, input_depth, fov_deg, radius, tol=0.03):
    """Which pixels of a novel view the input photo saw, from the true depth of both: lift each
    novel-view pixel to 3D, project it into P0, and call it seen when it lands inside the frame
    at the depth the input's own depth map has there (within tol, relative). The rest are
    disoccluded (or out of the input's frame): only a model's imagination can fill them.
    view_depth, input_depth (B, 1, H, W), cam2world (B, 4, 4) -> bool (B, 1, H, W)."""
    B, _, H, W = view_depth.shape
    P0 = p0_camera(B, radius).to(view_depth.device)
    px, py, z = project(lift(view_depth, cam2world, fov_deg), P0, fov_deg, H)
    inside = (px >= 0) & (px < W) & (py >= 0) & (py < H) & (z > 1e-3)
    flat = (py.clamp(0, H - 1) * W + px.clamp(0, W - 1))                     # (B, HW)
    there = torch.gather(input_depth.flatten(1), 1, flat)
    return (inside & ((z - there).abs() < tol * z)).view(B, 1, H, W)


# ---------------------------------------------------------------------------------------------
# Analytic scenes: a triplane that stores the position itself (used by the demo and the tests)
# ---------------------------------------------------------------------------------------------
def coordinate_triplane(R=64):
    """Planes (1, 3, 3, R, R) whose features at a point are a linear function of its position.

    Plane xy stores (x, y, 0), xz stores (x, 0, z), yz stores (0, y, z) (normalised coordinates
    at texel centres). Each axis sits on exactly 2 of the 3 planes, so the mean over planes is
    (2/3) * the normalised point, and bilinear interpolation of a linear function is exact.
    `position_from_features` inverts this: a field can then place any analytic shape in space,
    which tests every step of the renderer (rays, contraction, lookup, compositing) end to end.
    """
    g = (torch.arange(R) + 0.5) / R * 2 - 1                                 # texel centres
    gv, gu = torch.meshgrid(g, g, indexing="ij")                            # rows = v, cols = u
    planes = torch.zeros(1, 3, 3, R, R)
    for p, (a, b) in enumerate(PLANE_AXES):
        planes[0, p, a], planes[0, p, b] = gu, gv
    return planes


def position_from_features(feats):
    """Features read from coordinate_triplane -> contracted position in [-2, 2]^3."""
    return feats * 1.5 * 2                       # undo the mean (2/3) and the grid scale (1/2)


# ---------------------------------------------------------------------------------------------
# A small demo: a coloured ball on a chequered floor, seen from 3 views
# ---------------------------------------------------------------------------------------------
def _demo_field(feats):
    x = position_from_features(feats)                                       # (B, M, 3)
    ball = (x - torch.tensor([0.0, 0.2, 0.0])).norm(dim=-1, keepdim=True) < 0.5
    floor = x[..., 1:2] > 0.7
    sigma = 50.0 * (ball | floor).float()
    checker = ((x[..., :1] * 4).floor() + (x[..., 2:3] * 4).floor()) % 2
    rgb = torch.where(ball, torch.tensor([0.9, 0.3, 0.2]), 0.3 + 0.5 * checker * torch.ones(3))
    return sigma, rgb


if __name__ == "__main__":
    from PIL import Image
    planes = coordinate_triplane(128)
    cams = orbit_camera(torch.tensor([-25.0, 0.0, 25.0]), torch.tensor([10.0, 0.0, 10.0]), 2.7)
    out = render(planes.expand(3, -1, -1, -1, -1), _demo_field, cams, 45.0, 96)
    rgb = (out["features"].clamp(0, 1) * 255).byte().permute(0, 2, 3, 1)   # (3, H, W, 3)
    depth = out["depth"][:, 0]
    depth = ((depth - depth.min()) / (depth.max() - depth.min()) * 255).byte()
    strip = torch.cat([torch.cat(list(rgb), 1),
                       torch.cat(list(depth), 1)[..., None].expand(-1, -1, 3)], 0)
    Image.fromarray(strip.numpy()).save("render_demo.png")
    print("wrote render_demo.png (top: RGB from yaw -25, 0, +25; bottom: depth)")
