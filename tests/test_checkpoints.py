"""What the project writes and reads back: a full disk mid-write and a corrupted checkpoint each
end in one line, with nothing half-written left behind. (Resuming after a failed save, bit for
bit, is test_autoencoder.py's test_resume_after_a_full_disk_is_bit_exact.)"""
import errno
import os
import shutil
import zipfile

import numpy as np
import pytest
import torch

import autoencoder as ae
import data as data_mod
import diffusion as D
import evaluate as E
import sample as S
import training
from conftest import LDM_MICRO, micro_args
from data import UserError


def full_disk(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def leftovers(folder):
    """Temporary files or folders (NAME.tmp, NAME.tmp.EXT) anywhere under `folder`."""
    return [os.path.join(d, f) for d, dirs, files in os.walk(folder) for f in dirs + files
            if ".tmp" in f]


# ---------------------------------------------------------------------------------------------
# A full disk
# ---------------------------------------------------------------------------------------------
def test_a_write_that_fails_part_way_leaves_the_old_file_and_says_so_in_one_line(tmp_path):
    path = str(tmp_path / "out" / "notes.txt")
    with data_mod.writing(path, "the notes") as tmp:
        with open(tmp, "w") as f:
            f.write("old")
    with pytest.raises(UserError) as e:
        with data_mod.writing(path, "the new notes", safe="the old notes are intact") as tmp:
            with open(tmp, "w") as f:
                f.write("x" * 3_000_000)
            full_disk()
    msg = str(e.value)
    assert msg.startswith(f"could not write the new notes (3.0 MB written) to {path}: ")
    assert "No space left on device" in msg and msg.endswith("the old notes are intact")
    assert "\n" not in msg
    assert open(path).read() == "old" and leftovers(tmp_path) == []
    # A folder the same way: the old one stays, the half-written one goes.
    with pytest.raises(UserError, match="No space left on device"):
        with data_mod.writing(str(tmp_path / "out"), "a folder") as tmp:
            os.makedirs(tmp)
            open(os.path.join(tmp, "a"), "w").close()
            full_disk()
    assert open(path).read() == "old" and leftovers(tmp_path) == []


def test_a_full_disk_while_packing_or_caching_latents_leaves_nothing(scenes, ae_ckpt, tmp_path,
                                                                    monkeypatch):
    # The memory-mapped arrays reserve their space first: a full disk fails there, in one line,
    # instead of crashing later (SIGBUS) while the map is filled.
    monkeypatch.setattr(os, "posix_fallocate", full_disk)
    with pytest.raises(UserError, match=r"could not write the pack of 4 images \(0\.0 MB\) to "
                                        r".*_pack-16: No space left on device.*untouched"):
        data_mod.pack(scenes, 16, out=str(tmp_path / "_pack-16"), workers=0, verbose=False)
    assert os.listdir(tmp_path) == []
    out = tmp_path / "ldm"
    with pytest.raises(UserError, match="could not write the latent cache .* No space left on "
                                        "device.* is untouched"):
        D.train(D.get_args(LDM_MICRO + ["--ae", ae_ckpt, "--out", str(out), "--steps", "1"]))
    assert not os.path.exists(out / "latents") and leftovers(out) == []


def test_a_full_disk_while_writing_samples_leaves_no_half_picture(ae_ckpt, ldm_ckpt, tmp_path,
                                                                  monkeypatch):
    from PIL import Image
    save = Image.Image.save

    def half_then_full(self, fp, *args, **kwargs):      # the GIF's first bytes, then no space
        save(self, fp, *args, **kwargs)
        with open(fp, "r+b") as f:
            f.truncate(os.path.getsize(fp) // 2)
        full_disk()

    monkeypatch.setattr(Image.Image, "save", half_then_full)
    with pytest.raises(UserError, match="could not write a picture .*No space left on device"
                                        ".*checkpoints and data are untouched"):
        S.main(["--ae", ae_ckpt, "--ldm", ldm_ckpt, "--out", str(tmp_path), "--n", "1",
                "--steps", "2", "--frames", "2", "--threads", "1"])
    assert leftovers(tmp_path) == [] and os.listdir(tmp_path) == []


# ---------------------------------------------------------------------------------------------
# A corrupted file
# ---------------------------------------------------------------------------------------------
def flip_bytes(src, dst, where):
    """Copy checkpoint SRC to DST with bytes flipped inside the largest tensor's data
    ("tensor": 64 bytes mid-record) or inside the pickled header ("header": one byte of the
    word "config", an entry's name)."""
    shutil.copy(src, dst)
    with zipfile.ZipFile(src) as z:
        infos = z.infolist()
        if where == "tensor":
            info = max((i for i in infos if "/data/" in i.filename), key=lambda i: i.file_size)
            start = info.file_size // 2
        else:
            info = next(i for i in infos if i.filename.endswith("data.pkl"))
            start = z.read(info).index(b"config") + 2
    with open(dst, "r+b") as f:
        f.seek(info.header_offset + 26)                   # the local header's name/extra lengths
        n, m = np.frombuffer(f.read(4), "<u2")
        offset = info.header_offset + 30 + int(n) + int(m) + start
        f.seek(offset)
        data = bytearray(f.read(64 if where == "tensor" else 1))
        f.seek(offset)
        f.write(bytes(b ^ 0x5A for b in data))
    return str(dst)


@pytest.mark.parametrize("where", ["tensor", "header"])
def test_a_corrupted_checkpoint_is_refused_by_every_loader(scenes, ae_ckpt, ldm_ckpt, tmp_path,
                                                          where):
    bad_ae = flip_bytes(ae_ckpt, tmp_path / "ae.pt", where)
    bad_ldm = flip_bytes(ldm_ckpt, tmp_path / "ldm.pt", where)
    refused = "(corrupted|not a readable PyTorch checkpoint)"
    for load in (lambda: ae.load(bad_ae),
                 lambda: D.load(bad_ldm),
                 lambda: S.main(["--ae", bad_ae, "--ldm", ldm_ckpt, "--out", str(tmp_path)]),
                 lambda: S.main(["--ae", ae_ckpt, "--ldm", bad_ldm, "--out", str(tmp_path)]),
                 lambda: E.main(["views", bad_ae, "--data", scenes]),
                 lambda: E.main(["samples", ae_ckpt, bad_ldm])):
        with pytest.raises(UserError, match=refused):
            load()
    # --resume, for both stages
    os.makedirs(tmp_path / "a")
    shutil.copy(bad_ae, tmp_path / "a" / "ckpt.pt")
    with pytest.raises(UserError, match=rf"{tmp_path / 'a' / 'ckpt.pt'}: {refused}"):
        ae.train(micro_args(scenes, tmp_path / "a", "--resume", "--steps", "2"))
    os.makedirs(tmp_path / "d")
    shutil.copy(bad_ldm, tmp_path / "d" / "ckpt.pt")
    with pytest.raises(UserError, match=refused):
        D.train(D.get_args(LDM_MICRO + ["--ae", ae_ckpt, "--out", str(tmp_path / "d"),
                                        "--resume", "--steps", "3"]))


def test_flipped_tensor_bytes_load_silently_without_the_checksum(ae_ckpt, tmp_path):
    # Why the checksum: torch.load itself reads such a file without complaint.
    bad = flip_bytes(ae_ckpt, tmp_path / "ae.pt", "tensor")
    good = torch.load(ae_ckpt, weights_only=True)
    ckpt = torch.load(bad, weights_only=True)
    assert training.checksum(good) == good[training.CHECKSUM] != training.checksum(ckpt)


def test_an_older_checkpoint_without_a_checksum_loads_with_a_note(ae_ckpt, tmp_path, capsys):
    ckpt = torch.load(ae_ckpt, weights_only=True)
    del ckpt[training.CHECKSUM]
    torch.save(ckpt, tmp_path / "old.pt")
    model = ae.load(str(tmp_path / "old.pt"))
    assert "has no checksum" in capsys.readouterr().out
    assert all(torch.equal(p, q) for p, q in zip(model.state_dict().values(),
                                                 ae.load(ae_ckpt).state_dict().values()))
