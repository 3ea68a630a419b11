"""
scenes.py -- synthetic 3D scenes with exact ground truth, rendered by a small numpy ray caster.

Not a stage of WildFusion: the paper trains on photos (data.py). But photos have no 3D truth, so
nothing could say whether a novel view is right. These procedural scenes -- spheres, turned boxes
and cylinders on a chequered floor before a striped wall, one light with hard shadows -- come
with exact z-depth and with renders from known novel poses, so novel-view synthesis can be
scored (evaluate.py views), and everything runs on a fresh machine with no download.

    python scenes.py data/scenes --n 2000 --res 64                 # training scenes
    python scenes.py data/scenes --n 2000 --heldout 64             # + held-out novel views
    python scenes.py data/frontal --n 2000 --room-yaw 0            # every photo faces the wall
    python scenes.py data/classes --n 2000 --heldout 64 --classes  # one kind per scene, by folder

The output is a normal image folder for data.py (OUT/NNNNNN.png, exact depth in OUT/depth/),
plus OUT/scenes.json with the camera, OUT/params.npy with each scene's parameters (the targets
of evaluate.py's metric network), and with --heldout, OUT/_heldout/ and its novel views.
With --classes every object of a scene is of one kind, and the training scenes are filed by it
(OUT/sphere/, OUT/box/, OUT/cylinder/): a labelled data set for class-conditional diffusion.
The caster shares no code with render.py on purpose: test data must not share a bug with the
renderer it tests.

Map of the file:
    1. scenes and cameras   the random scene description; the view-space camera (numpy)
    2. ray casting          hit and normal functions per primitive; closest hit; shading
    3. writing a data set   make_scenes: training + held-out scenes + novel views; scenes.json
"""
import argparse
import json
import math
import os
import time

import numpy as np
from PIL import Image
from tqdm import tqdm

from data import SAFE, UserError, run_cli, writing


# ---------------------------------------------------------------------------------------------
# 1. Scenes and cameras
# ---------------------------------------------------------------------------------------------
# Each scene: 2-4 primitives (spheres, boxes turned about the vertical axis, upright cylinders)
# resting on a chequered floor, in front of a striped back wall, lit by one directional light
# with hard shadows plus ambient light. Everything is in view space: the input
# camera P0 sits at (0, 0, -radius) looking down +z at the pivot, y points down, so the floor is
# the plane y = +floor_y and "up" is -y. The caster is independent of render.py on purpose: the
# data must not share a bug with the renderer it is used to test.
#
# Photos in the wild are taken from every direction, so each scene's camera also turns about
# the vertical axis through the pivot by a random "room yaw" (uniform in +-room_yaw degrees).
# Without it every photo faces the back wall squarely (vertical stripes, a level horizon), and
# a novel view at yaw 20 shows a slanted wall no photo ever has: a discriminator can then
# reject novel views for their pose alone. View space does not change: P0 is still the input
# camera, and held-out views are still yaw/pitch offsets from it.
SCENE_RADIUS, SCENE_FOV = 2.7, 40.0   # camera distance from the pivot [world units], FOV [deg]
ROOM_YAW = 30.0                       # input cameras turn by up to +-this about the pivot [deg]
ELEVATION = (5.0, 25.0)               # input cameras look down on the scene by this much [deg]


def _rot_y(deg):
    """The same yaw/pitch convention as render.orbit_camera, in numpy (checked by a test)."""
    a = math.radians(deg)
    return np.array([[math.cos(a), 0, -math.sin(a)], [0, 1, 0], [math.sin(a), 0, math.cos(a)]])


def scene_camera(yaw_deg, pitch_deg, radius=SCENE_RADIUS):
    """cam2world (4, 4) numpy; must agree with render.orbit_camera (tests/test_scenes.py)."""
    p = math.radians(pitch_deg)
    R_pitch = np.array([[1, 0, 0], [0, math.cos(p), math.sin(p)], [0, -math.sin(p), math.cos(p)]])
    R = _rot_y(yaw_deg) @ R_pitch
    c2w = np.eye(4)
    c2w[:3, :3], c2w[:3, 3] = R, -radius * R[:, 2]
    return c2w


KINDS = ("sphere", "box", "cylinder")  # the primitives; with --classes, a scene's class


def random_scene(rng, room_yaw=ROOM_YAW, one_kind=False):
    """A random scene description (plain dict of numbers), drawn from a numpy Generator.
    The camera's room yaw is drawn last, so a scene's content does not depend on room_yaw.
    one_kind=True draws one kind for the whole scene first (then scene["kind"] says which)."""
    scene_kind = str(rng.choice(KINDS)) if one_kind else None
    def colour():
        h = rng.uniform(0, 1)
        s, v = rng.uniform(0.45, 0.9), rng.uniform(0.55, 0.95)
        k = (np.array([5, 3, 1]) + h * 6) % 6          # HSV -> RGB without colorsys
        return v - v * s * np.clip(np.minimum(k, 4 - k), 0, 1)
    floor_y = rng.uniform(0.45, 0.75)
    objects, placed = [], []
    for _ in range(rng.integers(2, 5)):
        kind = scene_kind or str(rng.choice(KINDS))
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
                elevation=rng.uniform(*ELEVATION), room_yaw=rng.uniform(-room_yaw, room_yaw),
                kind=scene_kind)


# What a scene "is", as numbers: the targets evaluate.py's metric network learns to predict from
# the image, so that its features know about objects, colours, layout, light and camera.
KIND_PARAMS = ("spheres", "boxes", "cylinders")    # how many of each of KINDS a scene holds
PARAM_NAMES = (["objects", *KIND_PARAMS]
               + [f"object_{k}" for k in ("r", "g", "b", "x", "z", "size")]
               + [f"{w}_{k}" for w in ("floor0", "floor1", "wall0", "wall1") for k in "rgb"]
               + ["floor_y", "wall_z", "checker", "stripes", "ambient", "light_x", "light_y",
                  "light_z", "elevation", "room_yaw"])


def scene_params(scene):
    """A scene -> float32 vector (len(PARAM_NAMES),). Object colour, position and size are means
    over the objects (0 for a scene without any); positions are turned by the room yaw, so they
    are where the camera sees them (x to its right, z away from it)."""
    obs = scene["objects"]
    turn = _rot_y(scene.get("room_yaw", 0.0))             # camera frame -> scene frame
    xz = [(o["center"] @ turn)[[0, 2]] for o in obs]      # p @ R = R^T p: scene -> camera
    mean = lambda xs, k: np.mean(np.reshape(xs, (-1, k)), 0) if xs else np.zeros(k)
    v = [len(obs)] + [sum(o["kind"] == k for o in obs) for k in KINDS]
    v += [*mean([o["colour"] for o in obs], 3), *mean(xz, 2), *mean([o["size"] for o in obs], 1)]
    for c in (*scene["floor_colours"], *scene["wall_colours"]):
        v += list(c)
    v += [scene["floor_y"], scene["wall_z"], scene["checker"], scene["stripes"],
          scene["ambient"], *scene["light"], scene["elevation"], scene.get("room_yaw", 0.0)]
    return np.asarray(v, np.float32)


# ---------------------------------------------------------------------------------------------
# 2. Ray casting: primitives, the closest hit, shading with shadows
# ---------------------------------------------------------------------------------------------
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
    # upright, and P0 looks down on it from `elevation` degrees, turned by `room_yaw` about the
    # vertical axis: turning view space by that yaw and pitch gives the scene frame
    # (T @ P0 = scene_camera(room_yaw, elevation)).
    T = scene_camera(scene.get("room_yaw", 0.0), scene.get("elevation", 0.0), radius=0.0)
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


# ---------------------------------------------------------------------------------------------
# 3. Writing a data set: training scenes, held-out scenes and their novel views
# ---------------------------------------------------------------------------------------------
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


def view_stem(held, name, yaw, pitch):
    """Where held-out scene NAME's view from (yaw, pitch) lives: STEM.png and STEM.npy under
    HELD/_views/NAME/ (HELD is OUT/_heldout)."""
    return os.path.join(held, "_views", name, f"yaw{yaw:+g}_pitch{pitch:+g}")


def save_png(path, rgb, safe=SAFE):
    """(H, W, 3) float in [0, 1] -> PNG, written all at once or not at all (data.writing)."""
    with writing(path, "a scene's picture", safe) as tmp:
        Image.fromarray((rgb * 255 + 0.5).astype(np.uint8)).save(tmp)


def save_npy(path, arr, safe=SAFE):
    with writing(path, "a scene's array", safe, size=arr.nbytes) as tmp:
        np.save(tmp, arr)


def make_scenes(out, n, res=64, seed=0, heldout=0, views=DEFAULT_VIEWS, aa=2,
                radius=SCENE_RADIUS, fov_deg=SCENE_FOV, room_yaw=ROOM_YAW, empty=False,
                classes=False, verbose=True):
    """Write n training scenes (OUT/NNNNNN.png + OUT/depth/NNNNNN.npy, a normal --data folder)
    and `heldout` more under OUT/_heldout/ (same layout) with their novel views in
    OUT/_heldout/_views/NNNNNN/yaw+20_pitch+0.{png,npy}. OUT/scenes.json records the camera
    (radius, fov_deg, room_yaw) so that models and evaluation use the one the data were rendered
    with; OUT/params.npy (and OUT/_heldout/params.npy) each scene's scene_params, in file order.
    empty=True removes every object (the same rooms, bare: a reference set for evaluate.py).
    classes=True gives each scene objects of one kind and files the training scenes by it,
    OUT/KIND/NNNNNN.png and OUT/depth/KIND/NNNNNN.npy (data.py's labels come from the
    sub-folders); the held-out scenes stay in one folder. params.npy follows the sorted paths."""
    if classes and empty:
        raise UserError("scenes: --classes and --empty exclude each other (a room without "
                        "objects has no kind)")
    if n < 1 or res < 8 or aa < 1 or heldout < 0 or not 0 <= room_yaw <= 90:
        raise UserError(f"scenes: need --n >= 1, --res >= 8, --aa >= 1, --heldout >= 0 and "
                        f"--room-yaw in [0, 90] (got {n}, {res}, {aa}, {heldout}, {room_yaw})")
    poses = parse_views(views) if heldout else []
    subs = ["depth"] + (["_heldout/depth"] if heldout else [])
    subs += [os.path.join(d, k) for d in ("", "depth") for k in KINDS] if classes else []
    for sub in subs:
        os.makedirs(os.path.join(out, sub), exist_ok=True)
    P0 = scene_camera(0, 0, radius)
    params, rel = [], []                                 # rel: training scenes' paths
    t0 = time.time()
    for i in tqdm(range(n + heldout), desc=f"rendering scenes -> {out}", unit="scene",
                  disable=not verbose):
        rng = np.random.default_rng([seed, i])           # scene i is the same whatever n is
        scene = random_scene(rng, room_yaw, one_kind=classes)
        if empty:
            scene["objects"] = []
        params.append(scene_params(scene))
        folder = out if i < n else os.path.join(out, "_heldout")
        name = os.path.join(scene["kind"], f"{i:06d}") if classes and i < n else f"{i:06d}"
        rel += [name] if i < n else []
        rgb, depth = render_scene(scene, P0, fov_deg, res, aa)
        safe = f"{out} holds the first {i} scenes; free space and run again (the same scenes)"
        save_png(os.path.join(folder, name + ".png"), rgb, safe)
        save_npy(os.path.join(folder, "depth", name + ".npy"), depth, safe)
        if i >= n:
            os.makedirs(os.path.join(out, "_heldout", "_views", name), exist_ok=True)
            for yaw, pitch in poses:
                rgb, depth = render_scene(scene, scene_camera(yaw, pitch, radius), fov_deg,
                                          res, aa)
                stem = view_stem(os.path.join(out, "_heldout"), name, yaw, pitch)
                save_png(stem + ".png", rgb, safe)
                save_npy(stem + ".npy", depth, safe)
    order = sorted(range(n), key=lambda i: rel[i] + ".png")      # data.scan_images' order
    save_npy(os.path.join(out, "params.npy"), np.stack([params[i] for i in order]))
    if heldout:
        save_npy(os.path.join(out, "_heldout", "params.npy"), np.stack(params[n:]))
    meta = dict(n=n, heldout=heldout, res=res, seed=seed, radius=radius, fov_deg=fov_deg,
                room_yaw=room_yaw, elevation=list(ELEVATION), empty=empty, classes=classes,
                views=[dict(yaw_deg=y, pitch_deg=p) for y, p in poses])
    with writing(os.path.join(out, "scenes.json"), "the scenes' camera") as tmp, \
            open(tmp, "w") as f:
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
    p = argparse.ArgumentParser(description="Render synthetic scenes with exact depth (and "
                                "held-out novel views) into an image folder.")
    p.add_argument("out", help="output folder")
    p.add_argument("--n", type=int, default=2000, help="training scenes")
    p.add_argument("--res", type=int, default=64, help="image size in pixels")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--heldout", type=int, default=0, help="held-out scenes with novel views")
    p.add_argument("--views", default=DEFAULT_VIEWS, help="held-out poses, yaw:pitch in degrees")
    p.add_argument("--aa", type=int, default=2, help="antialiasing: aa x aa rays per pixel")
    p.add_argument("--room-yaw", type=float, default=ROOM_YAW, help="each input camera turns "
                   "about the pivot by a yaw uniform in +-this, degrees (0: all face the wall)")
    p.add_argument("--empty", action="store_true", help="the same rooms without objects")
    p.add_argument("--classes", action="store_true", help="objects of one kind per scene, the "
                   "training scenes filed by it in OUT/sphere, OUT/box, OUT/cylinder (labels)")
    args = p.parse_args(argv)
    meta, secs = make_scenes(args.out, args.n, args.res, args.seed, args.heldout, args.views,
                             args.aa, room_yaw=args.room_yaw, empty=args.empty,
                             classes=args.classes)
    total = args.n + args.heldout * (1 + len(meta["views"]))
    print(f"wrote {args.n} scenes (+{args.heldout} held out) to {args.out} in {secs:.1f} s "
          f"({total / secs:.0f} renders/s at {args.res} px)")


if __name__ == "__main__":
    run_cli(main)
