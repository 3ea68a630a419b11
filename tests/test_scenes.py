"""scenes.py: the synthetic ground truth -- cameras agree with render.py, depth is exact on the
wall and floor, scenes are deterministic and form a valid image folder."""
import os

import numpy as np
from PIL import Image

import render
import scenes
from data import ImageFolder


def test_scene_camera_matches_render_orbit():
    for yaw, pitch in [(0, 0), (20, 0), (-15, 10), (30, -20)]:
        a = scenes.scene_camera(yaw, pitch, 2.7)
        b = render.orbit_camera(float(yaw), float(pitch), 2.7).numpy()
        assert np.allclose(a, b, atol=1e-6)


def test_scene_depth_is_exact_on_wall_and_floor():
    """An empty scene seen level: the wall's z-depth is wall_z + radius everywhere, and a floor
    pixel whose ray direction is (u, v, 1) is hit at z-depth floor_y / v."""
    scene = scenes.random_scene(np.random.default_rng(0))
    scene.update(objects=[], elevation=0.0, room_yaw=0.0, floor_y=0.6, wall_z=2.0)
    res, fov = 32, 40.0
    _, depth = scenes.render_scene(scene, scenes.scene_camera(0, 0, 2.7), fov, res, aa=1)
    f = 0.5 * res / np.tan(np.radians(fov) / 2)
    v = (np.arange(res) + 0.5 - res / 2) / f             # per row
    floor_z = 0.6 / np.where(v > 0, v, np.nan)
    expect = np.where(floor_z[:, None] < 4.7, floor_z[:, None], 4.7) * np.ones((1, res))
    assert np.allclose(depth, expect, rtol=1e-5)


def test_scenes_are_deterministic_and_a_valid_folder(tmp_path):
    meta, _ = scenes.make_scenes(str(tmp_path / "a"), 6, res=16, seed=3, heldout=2,
                               views="-20:0,10:5", verbose=False)
    scenes.make_scenes(str(tmp_path / "b"), 6, res=16, seed=3, verbose=False)
    assert meta["radius"] == scenes.SCENE_RADIUS and len(meta["views"]) == 2
    for i in range(6):
        a = np.asarray(Image.open(tmp_path / "a" / f"{i:06d}.png"))
        assert np.array_equal(a, np.asarray(Image.open(tmp_path / "b" / f"{i:06d}.png")))
    ds = ImageFolder(str(tmp_path / "a"), 16, verbose=False)   # _heldout is not scanned
    assert len(ds) == 6 and ds.use_depth
    held = ImageFolder(str(tmp_path / "a" / "_heldout"), 16, verbose=False)
    assert len(held) == 2
    view = tmp_path / "a" / "_heldout" / "_views" / "000006" / "yaw+10_pitch+5"
    assert np.load(str(view) + ".npy").shape == (16, 16)
    assert not np.array_equal(np.asarray(Image.open(str(view) + ".png")),
                              np.asarray(Image.open(tmp_path / "a" / "_heldout" / "000006.png")))
    assert scenes.read_scene_meta(str(tmp_path / "a"))["fov_deg"] == scenes.SCENE_FOV


def test_a_pack_of_scenes_keeps_their_camera(tmp_path):
    import data
    scenes.make_scenes(str(tmp_path / "s"), 3, res=16, heldout=1, views="20:0", aa=1,
                       verbose=False)
    out = data.pack(str(tmp_path / "s"), 16, workers=0, verbose=False)
    meta, packed = scenes.read_scene_meta(str(tmp_path / "s")), scenes.read_scene_meta(out)
    assert packed["fov_deg"] == meta["fov_deg"] and packed["radius"] == meta["radius"]
    assert len(data.open_folder(out, 16)) == 3 and not packed["heldout"]


def test_class_scenes_are_filed_by_their_one_kind_with_params_in_file_order(tmp_path):
    root = str(tmp_path / "c")
    scenes.make_scenes(root, 12, res=16, heldout=2, views="20:0", aa=1, classes=True,
                       verbose=False)
    ds = ImageFolder(root, 16, verbose=False)        # labels from the sub-folders, depth found
    assert ds.classes == sorted(scenes.KINDS) and len(ds) == 12 and ds.use_depth
    params = np.load(os.path.join(root, "params.npy"))                   # (12, P), file order
    counts = params[:, [scenes.PARAM_NAMES.index(k) for k in scenes.KIND_PARAMS]]
    for f, c in zip(ds.files, counts):
        kind = f.split(os.sep)[0]                    # every object is of the folder's kind
        assert c[scenes.KINDS.index(kind)] == c.sum() >= 2, (f, c)
    # The same scene, with --classes, has objects of one kind; the held-out ones stay flat.
    assert len(ImageFolder(os.path.join(root, "_heldout"), 16, verbose=False)) == 2
    one = scenes.random_scene(np.random.default_rng(5), one_kind=True)
    assert {o["kind"] for o in one["objects"]} == {one["kind"]}
