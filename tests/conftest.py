"""Shared by every test file: the top-level scripts made importable, torch kept to the CI
machine's 2 cores, and the micro models and data the tests train on (seconds on a CPU)."""
import os
import shutil
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
torch.set_num_threads(min(2, os.cpu_count() or 1))

import autoencoder as ae  # noqa: E402  (after the path above)
import diffusion as D  # noqa: E402
import scenes as scenes_mod  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# An autoencoder small enough to train for hundreds of steps in seconds on a CPU, with the GAN
# path on, as in the paper.
MICRO = ["--preset", "tiny", "--res", "16", "--render-res", "16", "--z-res", "4", "--enc-ch", "8",
         "--dec-dim", "16", "--dec-depth", "1", "--dec-heads", "2", "--plane-ch", "4",
         "--plane-res", "8", "--hidden", "8", "--feat-ch", "4", "--up-ch", "8", "--n-coarse", "8",
         "--n-fine", "8", "--batch", "2", "--threads", "1", "--adv-weight", "0.02"]
# The same without the depth and adversarial losses, for the checkpoints that diffusion and
# sampling tests start from; and a micro UNet.
AE_MICRO = MICRO[:-2] + ["--depth-weight", "0", "--adv-weight", "0"]
LDM_MICRO = ["--preset", "tiny", "--ch", "16", "--ch-mult", "1,2", "--attn-res", "2",
             "--batch", "4", "--threads", "1"]


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    """4 synthetic 16 px scenes with exact depth, and 2 held-out ones with 3 novel views."""
    root = tmp_path_factory.mktemp("scenes")
    scenes_mod.make_scenes(str(root), 4, res=16, heldout=2, views="-20:0,20:0,0:-10", aa=1,
                           verbose=False)
    return str(root)


def micro_args(scenes, out, *extra):
    return ae.get_args(MICRO + ["--data", scenes, "--out", str(out), *extra])


@pytest.fixture(scope="module")
def ae_ckpt(tmp_path_factory):
    """A 2-step micro autoencoder on 6 scenes in two class folders (a/, b/)."""
    root = tmp_path_factory.mktemp("ae")
    scenes_mod.make_scenes(str(root / "raw"), 6, res=16, aa=1, verbose=False)
    for i, f in enumerate(sorted(f for f in os.listdir(root / "raw") if f.endswith(".png"))):
        os.makedirs(root / "imgs" / "ab"[i % 2], exist_ok=True)
        shutil.copy(root / "raw" / f, root / "imgs" / "ab"[i % 2] / f)
    ae.train(ae.get_args(AE_MICRO + ["--data", str(root / "imgs"), "--out", str(root / "run"),
                                     "--steps", "2", "--every", "2"]))
    return str(root / "run" / "ckpt.pt")


@pytest.fixture(scope="module")
def ldm_ckpt(ae_ckpt, tmp_path_factory):
    """A 2-step micro diffusion model on ae_ckpt's latents (class-conditional: a, b)."""
    out = tmp_path_factory.mktemp("ldm")
    D.train(D.get_args(LDM_MICRO + ["--ae", ae_ckpt, "--out", str(out), "--steps", "2",
                                    "--every", "2"]))
    return str(out / "ckpt.pt")


@pytest.fixture(autouse=True)
def few_sample_steps(monkeypatch):
    """The sample grids written while training take 3 DDIM steps here, not 50."""
    monkeypatch.setattr(D, "SAMPLE_STEPS", 3)
