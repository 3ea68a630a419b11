"""
bench.py -- speed and memory of each stage, measured the same way every time.

    python bench.py                      # every case on the best device here
    python bench.py render --device cpu  # one case
    python bench.py render --compile     # the hot path through torch.compile (any device)
    python bench.py ae-step --profile    # also the costliest ops (torch.profiler)
    python bench.py profile              # a tiny training step, by part and op
    python bench.py data budget          # the loader on 2k vs 20k images; FLOPs and memory
    python bench.py --json bench.json    # also write the numbers as JSON

Each case runs a few warm-up iterations (allocator, compilation), then times `--iters` more,
synchronising the GPU around the clock. Peak memory is the CUDA allocator's peak on GPU and the
process's peak resident set size on CPU (which includes Python and torch themselves).

Cases:
    render   the volume renderer, forward + backward: batch 2, 64x64 rays, 48 coarse + 48 fine
             samples per ray, triplane 3 x 32 x 128 x 128, field MLP 32 -> 64 -> 1 + 32.
    sample   DDIM-50 samples per second at batch 4 for a 4x32x32 latent with the base UNet
             (and the seconds of DPM-Solver++ at 15 steps, sample.py's default), its parameter
             count, and a library UNet of the same shape when diffusers is there.
    ae-step  one autoencoder training step (both players of the GAN), images/s, peak memory.
    e2e      seconds from a latent to a 60-frame turntable (decode + render + upsample).
    data     (not in the default set) the training loader on 2k vs 20k images: folder vs
             pack, images/s, start-up time, peak resident memory.
    budget   (not in the default set) parameters, FLOPs and activation memory per image of
             each stage's training step for every preset, and labelled H100 estimates.
    checkpoint  (not in the default set) what the checksum of a checkpoint costs at the tiny
             and base sizes, beside torch.save and torch.load of the same state.
    profile  (not in the default set) where a tiny training step's time goes, for both
             stages: by part of the code (encoder, decoder, each render, losses, backward,
             optimiser, EMA, logging, data), then by operator (torch.profiler).
"""
import argparse
import json
import platform
import resource
import sys
import time

import torch

import data
import render


def peak_memory_mb(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss     # KiB on Linux
    return kb / 1024 if sys.platform != "darwin" else kb / 2 ** 20


def timed(fn, device, warmup, iters):
    """Seconds per call of fn(), after warm-up."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return (time.perf_counter() - t0) / iters


def median_interleaved(fns, device, warmup, iters):
    """Median seconds per call of each function, calling them in turn (A, B, A, B, ...) so that
    slow drifts of a shared machine's clock hit every contender alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times = [[] for _ in fns]
    for _ in range(iters):
        for fn, ts in zip(fns, times):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t0 = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            ts.append(time.perf_counter() - t0)
    return [sorted(ts)[len(ts) // 2] for ts in times]


class Field(torch.nn.Module):
    """The bench's field MLP: triplane features -> density, feature vector. Two output heads
    instead of slicing one output: slicing costs a zero-filled full-size gradient per slice."""

    def __init__(self, c_in=32, hidden=64, c_out=32):
        super().__init__()
        self.hidden = torch.nn.Sequential(torch.nn.Linear(c_in, hidden), torch.nn.ReLU())
        self.density, self.features = torch.nn.Linear(hidden, 1), torch.nn.Linear(hidden, c_out)

    def forward(self, feats):
        h = self.hidden(feats)
        return torch.nn.functional.softplus(self.density(h)), self.features(h)


def bench_render(device, args):
    B, res, S = 2, 64, 48
    planes = torch.randn(B, 3, 32, 128, 128, device=device, requires_grad=True)
    field = Field().to(device)
    cams = render.orbit_camera(torch.tensor([-15.0, 15.0]), torch.tensor([5.0, -5.0]), 2.7)

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16"):
            out = render.render(planes, field, cams.to(device), 40.0, res, n_coarse=S, n_fine=S,
                                perturb=True, compile=args.compile)
        (out["features"].float().square().mean() + out["depth"].float().mean()).backward()
    sec = timed(step, device, args.warmup, args.iters)
    samples = B * res * res * 2 * S
    return dict(case="render", ms_per_iter=1e3 * sec, samples_per_s=samples / sec,
                rays_per_s=B * res * res / sec, peak_mem_mb=peak_memory_mb(device), amp=args.amp,
                config=f"B={B} {res}x{res} rays, {S}+{S} samples, planes 3x32x128^2, MLP 64")


def bench_sample(device, args):
    """DDIM-50 at batch 4 on a 4x32x32 latent with the base preset's UNet (diffusion.py), and
    the same UNet's forward pass next to a general-purpose library UNet (diffusers'
    UNet2DModel, when installed) with the same widths, depth and attention resolutions."""
    import diffusion
    cfg = diffusion.model_config(diffusion.get_args(["--preset", "base"]), (4, 32, 32), [])
    model = diffusion.LatentDiffusion(cfg).to(device).eval()
    if args.compile:
        model.net.compile()
    n_par = sum(p.numel() for p in model.parameters())
    x, t = torch.randn(4, 4, 32, 32, device=device), torch.full((4,), 500, device=device)
    y = model.null_labels(4, device)
    with torch.no_grad():
        diffusion.ddim_sample(model, (4, 4, 32, 32), steps=2)                # warm-up
        full = timed(lambda: diffusion.ddim_sample(model, (4, 4, 32, 32), steps=50), device, 0,
                     1 if device.type == "cpu" else args.iters)
        fast = timed(lambda: diffusion.ddim_sample(model, (4, 4, 32, 32), steps=15,
                                                   sampler="dpm++"), device, 0,
                     1 if device.type == "cpu" else args.iters)
    r = dict(case="sample", unet_params_m=n_par / 1e6, ddim50_s=full, samples_per_s=4 / full,
             dpm15_s=fast,
             peak_mem_mb=peak_memory_mb(device),
             config="base UNet (ch 128, mult 1,2,2, 2 blocks, attn 16,8), batch 4, 4x32x32")
    ours = lambda: model.net(x, t, y)
    try:
        from diffusers import UNet2DModel
    except ImportError:
        with torch.no_grad():
            r["unet_fwd_ms"] = 1e3 * median_interleaved([ours], device, args.warmup, 10)[0]
        r["library"] = "diffusers not installed (pip install diffusers to compare)"
        return r
    lib = UNet2DModel(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                      block_out_channels=(128, 256, 256), attention_head_dim=32,
                      down_block_types=("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                      up_block_types=("AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                      ).to(device).eval()
    if args.compile:
        lib.compile()
    with torch.no_grad():
        fwd, lib_fwd = median_interleaved([ours, lambda: lib(x, t).sample], device,
                                          args.warmup, 10)
    r.update(unet_fwd_ms=1e3 * fwd, library="diffusers UNet2DModel",
             library_params_m=sum(p.numel() for p in lib.parameters()) / 1e6,
             library_fwd_ms=1e3 * lib_fwd)
    return r


def bench_e2e(device, args):
    """Seconds from a latent to a 60-frame turntable (decode, render 60 views, upsample) with a
    freshly initialised autoencoder of the `--ae-preset` size."""
    import autoencoder as ae
    import sample
    a = ae.get_args(["--preset", args.ae_preset])
    ae.set_camera(a, None)                            # the defaults for photos
    model = ae.AutoEncoder(ae.model_config(a)).to(device).eval()
    model.compile = args.compile
    z = torch.randn(1, a.z_ch, a.z_res, a.z_res, device=device)
    cams = sample.turntable_cameras(60, 25.0, 5.0, a.radius)

    def run(frames):
        with torch.no_grad():
            ae.render_frames(model, model.decode(z), cams[:frames])
    run(2)                                                                   # warm-up
    sec = timed(lambda: run(60), device, 0, 1 if device.type == "cpu" else args.iters)
    return dict(case="e2e", seconds=sec, frames_per_s=60 / sec, peak_mem_mb=peak_memory_mb(device),
                config=f"{args.ae_preset} autoencoder ({a.res} px, render {a.render_res} px, "
                       f"{a.n_coarse}+{a.n_fine} samples), 60 frames in chunks of 16")


def bench_ae_step(device, args):
    """One autoencoder training step at the `--ae-preset` size: encode, decode, render P0 and a
    novel view, L1 + depth + generator loss, discriminator step; images/s and peak memory."""
    import autoencoder as ae
    a = ae.get_args(["--preset", args.ae_preset, "--no-depth-metric"])
    ae.set_camera(a, None)                            # the defaults for photos (losses, camera)
    a.adv_weight = max(a.adv_weight, 0.05)            # always time the adversarial part too
    model, disc, opt, opt_d = ae.build(a, device)     # the training script's own step below
    if args.compile:
        for m in (model.encoder, model.decoder, model.upsampler):
            m.compile()
        model.compile = True
    B = args.batch or a.batch
    image = torch.rand(B, 3, a.res, a.res, device=device) * 2 - 1
    depth = 2 + torch.rand(B, 1, a.res, a.res, device=device)
    autocast = torch.autocast(device.type, torch.bfloat16, enabled=args.amp == "bf16")

    def step():
        _, fakes = ae.autoencoder_step(model, disc, opt, [(image, depth)], a, True, None,
                                       autocast)
        ae.discriminator_step(disc, opt_d, [(image, depth)], fakes, a, autocast)
    sec = timed(step, device, args.warmup, args.iters)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(case="ae-step", ms_per_iter=1e3 * sec, images_per_s=B / sec,
                peak_mem_mb=peak_memory_mb(device), params_m=n, amp=args.amp,
                config=f"{args.ae_preset} preset: batch {B}, {a.res} px, render {a.render_res} px, "
                       f"{a.n_coarse}+{a.n_fine} samples, with novel view + discriminator step "
                       f"with R1")


def make_image_folder(root, n, res=32):
    """n random res-px PNGs (plus a depth map each) under ROOT, made once and reused."""
    import os
    import numpy as np
    from PIL import Image
    if os.path.isfile(os.path.join(root, "done")):
        return root
    os.makedirs(os.path.join(root, "depth"), exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (res, res, 3), dtype=np.uint8)).save(
            os.path.join(root, f"{i:06d}.png"))
        np.save(os.path.join(root, "depth", f"{i:06d}.npy"),
                rng.uniform(1, 5, (res, res)).astype(np.float32))
    open(os.path.join(root, "done"), "w").close()
    return root


def proc_memory_mb(pid="self"):
    """Linux: (peak resident MB, resident anonymous MB now) of a process. Resident memory also
    counts file pages mapped in (a pack's memory maps, with the kernel's read-ahead): those are
    the page cache, shared and dropped under pressure; anonymous memory is what the process
    itself holds."""
    try:
        with open(f"/proc/{pid}/status") as f:
            kv = dict(line.split(":", 1) for line in f)
    except OSError:
        return 0.0, 0.0
    kb = lambda k: float(kv.get(k, "0 kB").split()[0]) / 1024
    return kb("VmHWM"), kb("RssAnon")


def children():
    """Process ids whose parent is this process (a DataLoader's workers), Linux only."""
    import os
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if int(f.read().rsplit(")", 1)[1].split()[1]) == os.getpid():
                    out.append(pid)
        except (OSError, IndexError, ValueError):
            pass
    return out


def data_run(root, workers, batch, images):
    """One measurement, in a fresh process: open ROOT (folder or pack) as the training script
    does, read `images` images through the training loader, report start-up seconds,
    images/s and memory: peak resident and largest anonymous, of this process and of its
    largest worker."""
    import autoencoder as ae
    t0 = time.perf_counter()
    ds = data.open_folder(root, 32, depth=True, verbose=False)
    start = time.perf_counter() - t0
    loader = ae.make_loader(ds, ae.StepBatches(len(ds), batch, 0, 0, images // batch), workers,
                            torch.device("cpu"))
    t0, n, anon, workers_mem = time.perf_counter(), 0, 0.0, [(0.0, 0.0)]
    for i, b in enumerate(loader):
        n += len(b["image"])
        anon = max(anon, proc_memory_mb()[1])
        if i == images // batch - 2:                  # the workers, while they still run
            workers_mem += [proc_memory_mb(pid) for pid in children()]
    sec = time.perf_counter() - t0
    return dict(images=len(ds), startup_s=start, images_per_s=n / sec,
                main_peak_rss_mb=proc_memory_mb()[0], main_anon_mb=anon,
                worker_peak_rss_mb=max(m[0] for m in workers_mem),
                worker_anon_mb=max(m[1] for m in workers_mem))


def bench_data(device, args):
    """Images/s and peak memory of the training loader on 2k and 20k images of 32 px (with
    depth maps), read lazily from a folder of PNGs and from a pack. Each measurement runs in a
    fresh process, so one's memory cannot hide in another's peak; each reads the same number
    of images (--data-images), so only the size of the data set differs."""
    import os
    import subprocess
    out = []
    for n in (2000, 20000):
        folder = make_image_folder(os.path.join(args.data_dir, f"png{n}"), n)
        pack = os.path.join(folder, "_pack-32")
        if not os.path.isfile(os.path.join(pack, data.PACK_META)):
            data.pack(folder, 32, verbose=False)
        for kind, root in (("folder", folder), ("pack", pack)):
            code = (f"import bench, json; print(json.dumps(bench.data_run({root!r}, "
                    f"{args.workers}, 64, {args.data_images})))")
            p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                               cwd=os.path.dirname(os.path.abspath(__file__)), check=True)
            r = dict(kind=kind, workers=args.workers, **json.loads(p.stdout.splitlines()[-1]))
            out.append(r)
            print(f"  {kind:6s} {n:6d} images: start-up {r['startup_s']:.2f} s, "
                  f"{r['images_per_s']:.0f} images/s; main process: peak RSS "
                  f"{r['main_peak_rss_mb']:.0f} MB, anonymous {r['main_anon_mb']:.0f} MB; largest"
                  f" worker: {r['worker_peak_rss_mb']:.0f} MB, {r['worker_anon_mb']:.0f} MB")
    return dict(case="data", runs=out, config=f"32 px PNG + .npy depth, batch 64, "
                f"{args.data_images} images read, {args.workers} workers")


# --- budget: parameters, FLOPs and activation memory of one training step -------------------
def step_cost(build_loss, batches):
    """FLOPs (torch.utils.flop_counter: matmuls, convolutions, attention; not grid_sample or
    elementwise work) of forward + backward, and saved activation bytes, at each batch size."""
    from torch.utils.flop_counter import FlopCounterMode
    import training
    rows = []
    for B in batches:
        counter = FlopCounterMode(display=False)
        with counter:
            build_loss(B)().backward()
        act = training.saved_bytes(lambda: build_loss(B)())
        rows.append((B, counter.get_total_flops(), act))
    (b1, f1, a1), (b2, f2, a2) = rows[0], rows[-1]
    return dict(flops_per_image=(f2 - f1) / (b2 - b1), act_mb_per_image=(a2 - a1) / (b2 - b1)
                / 2 ** 20, act_mb_fixed=(a1 - (a2 - a1) / (b2 - b1) * b1) / 2 ** 20,
                measured_at=[r[0] for r in rows])


# Assumptions of the GPU estimates (printed with them): H100 SXM dense bf16 peak, a model FLOPs
# utilisation typical of small convnets and renderers, and what a training step keeps besides
# activations: fp32 weights + gradients + AdamW's two moments = 16 bytes per parameter.
# Measured on an H100, the base autoencoder step ran far below that utilisation
# (docs/BENCHMARKS.md), so read the estimated hours as a lower bound.
H100_BF16_FLOPS = 989e12
ASSUMED_MFU = 0.25
BYTES_PER_PARAM = 16


def bench_budget(device, args):
    """For every preset of both stages: parameters, training FLOPs per image, activation memory
    per image (measured at two batch sizes on this device, float32), and from them labelled
    estimates for an H100: images/s at ASSUMED_MFU, hours for the preset's steps, and the
    largest batch that fits 24 / 40 / 80 GB."""
    import autoencoder as ae
    import diffusion
    rows = []
    for preset in ("tiny", "small", "base"):
        a = ae.get_args(["--preset", preset, "--no-depth-metric"])
        ae.set_camera(a, None)                        # the defaults for photos (losses, camera)
        a.adv_weight = max(a.adv_weight, 0.05)        # the full step: novel view + D
        # R1's double backward through D is left out: FlopCounterMode cannot follow the
        # autograd.grad inside a counted backward. It is not small on the base step.
        a.r1_gamma = 0.0
        model, disc, _, _ = ae.build(a, device)
        data = lambda B: (torch.rand(B, 3, a.res, a.res, device=device) * 2 - 1,
                          2 + torch.rand(B, 1, a.res, a.res, device=device))

        def ae_loss(B):
            image, depth = data(B)
            def run():
                loss, _, fake = ae.autoencoder_loss(model, disc, image, depth, a, True, None)
                d, _ = ae.d_loss_fn(disc, disc.inputs(image, depth, a.render_res), fake,
                                     a.r1_gamma)
                return loss + d
            return run
        n_par = sum(p.numel() for p in [*model.parameters(), *disc.parameters()])
        rows.append(dict(stage="autoencoder", preset=preset, batch=a.batch, steps=a.steps,
                         res=a.res, params_m=n_par / 1e6, **step_cost(ae_loss, (1, 2))))
        d = diffusion.get_args(["--preset", preset])
        shape = (a.z_ch, a.z_res, a.z_res)
        ldm = diffusion.LatentDiffusion(diffusion.model_config(d, shape, [])).to(device)
        ldm_loss = lambda B: (lambda: ldm.loss(torch.randn(B, *shape, device=device)))
        rows.append(dict(stage="diffusion", preset=preset, batch=d.batch, steps=d.steps,
                         res=a.res, params_m=sum(p.numel() for p in ldm.parameters()) / 1e6,
                         **step_cost(ldm_loss, (2, 4))))
    for r in rows:
        ips = ASSUMED_MFU * H100_BF16_FLOPS / r["flops_per_image"]
        fixed_gb = (r["params_m"] * 1e6 * BYTES_PER_PARAM + r["act_mb_fixed"] * 2 ** 20) / 1e9
        per_gb = r["act_mb_per_image"] * 2 ** 20 / 1e9
        r.update(est_h100_images_per_s=ips, est_h100_hours=r["steps"] * r["batch"] / ips / 3600,
                 **{f"est_max_batch_{g}gb": max(0, int((0.9 * g - fixed_gb) / per_gb))
                    for g in (24, 40, 80)})
        print(f"  {r['stage']:11s} {r['preset']:5s} {r['params_m']:6.2f} M params, "
              f"{r['flops_per_image'] / 1e9:8.2f} GFLOP/image (fwd+bwd), activations "
              f"{r['act_mb_per_image']:7.1f} MB/image | estimate, H100 at MFU {ASSUMED_MFU}: "
              f"{ips:7.0f} images/s, {r['est_h100_hours']:6.2f} h for {r['steps']} steps x "
              f"{r['batch']}; largest batch 24/40/80 GB: {r['est_max_batch_24gb']}/"
              f"{r['est_max_batch_40gb']}/{r['est_max_batch_80gb']}")
    return dict(case="budget", rows=rows, assumptions=dict(
        h100_bf16_flops=H100_BF16_FLOPS, mfu=ASSUMED_MFU, bytes_per_param=BYTES_PER_PARAM,
        memory_usable=0.9, activations="float32, saved-for-backward tensors only"))


def bench_checkpoint(device, args):
    """What the checksum costs: a training checkpoint of each stage at the tiny and base sizes
    (weights, EMA, optimiser state), its size, the SHA-256 over its tensors (done once per save
    and once per load), and a plain torch.save + torch.load of the same state for scale."""
    import os
    import tempfile
    import autoencoder as ae
    import diffusion
    import training

    def filled(opt, params):                      # Adam state as after a step: 2 tensors/param
        for p in params:
            p.grad = torch.zeros_like(p)
        opt.step()
        return opt.state_dict()
    rows = []
    for preset in ("tiny", "base"):
        a = ae.get_args(["--preset", preset, "--no-depth-metric"])
        ae.set_camera(a, None)
        model, disc, opt, opt_d = ae.build(a, "cpu")
        ae_state = dict(model=model.state_dict(), ema=model.state_dict(), disc=disc.state_dict(),
                        opt=filled(opt, model.parameters()),
                        opt_d=filled(opt_d, disc.parameters()), step=1)
        d = diffusion.get_args(["--preset", preset])
        net = diffusion.LatentDiffusion(diffusion.model_config(d, (a.z_ch, a.z_res, a.z_res), []))
        opt = torch.optim.AdamW(net.parameters())
        ldm_state = dict(model=net.state_dict(), ema=net.state_dict(),
                         opt=filled(opt, net.parameters()), step=1)
        for stage, state in (("autoencoder", ae_state), ("diffusion", ldm_state)):
            with tempfile.TemporaryDirectory() as tmp:
                path = os.path.join(tmp, "ckpt.pt")
                check = training.seconds_per_call(lambda: training.checksum(state), 1, 3)
                save = training.seconds_per_call(lambda: torch.save(state, path), 1, 3)
                load = training.seconds_per_call(
                    lambda: torch.load(path, map_location="cpu", weights_only=True), 1, 3)
                mb = os.path.getsize(path) / 1e6
            rows.append(dict(preset=preset, stage=stage, mb=mb, checksum_s=check,
                             mb_per_s=mb / check, save_s=save, load_s=load))
            print(f"  {preset:4s} {stage:11s} {mb:8.1f} MB  checksum {check:6.3f} s "
                  f"({mb / check:5.0f} MB/s)  torch.save {save:6.3f} s  torch.load {load:6.3f} s")
    return dict(case="checkpoint", rows=rows)


class ByCaller:
    """Wall time split by the part of the code that spent it. Each part is a function or
    method wrapped in place (and restored by undo()); a part's time excludes the parts it
    calls, so the rows add up to the total. On a CPU the ops run synchronously, so the clock
    is the cost; on a GPU each part synchronises first (which serialises the queue: the
    shares are still right, the total is slower than training)."""

    def __init__(self, device):
        self.device, self.undo_list, self.stack = device, [], []
        self.reset()

    def reset(self):
        """Start the clock (again), from zero."""
        self.seconds, self.t0, self.t1 = {}, time.perf_counter(), None

    def stop(self):
        """Stop the clock: what runs after (the final checkpoint and preview) is left out."""
        self.t1 = time.perf_counter()

    def sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def wrap(self, owner, name, label):
        fn = getattr(owner, name)

        def timed_part(*a, **k):
            self.sync()
            t0 = time.perf_counter()
            self.stack.append(0.0)                       # time spent in parts called inside
            try:
                return fn(*a, **k)
            finally:
                self.sync()
                dt, inner = time.perf_counter() - t0, self.stack.pop()
                key = label(*a) if callable(label) else label
                if self.t1 is None:
                    self.seconds[key] = self.seconds.get(key, 0.0) + dt - inner
                if self.stack:
                    self.stack[-1] += dt
        setattr(owner, name, timed_part)
        self.undo_list.append((owner, name, fn))

    def undo(self):
        for owner, name, fn in reversed(self.undo_list):
            setattr(owner, name, fn)
        self.undo_list = []

    def table(self, steps):
        total = self.t1 - self.t0
        rows = sorted(self.seconds.items(), key=lambda kv: -kv[1])
        rows.append(("the rest (the loop, Python)", total - sum(self.seconds.values())))
        return total / steps, [dict(part=k, ms_per_step=1e3 * v / steps, share=v / total)
                               for k, v in rows]


def profile_training(stage, device, args, by_ops):
    """Run the real training loop of `stage` (autoencoder or diffusion) at the tiny preset for
    `--warmup` + `--iters` x 10 steps on a small synthetic set and return where the measured
    steps' time went: by part of the code (ByCaller) or, with by_ops, by operator
    (torch.profiler, self time). The warm-up steps are left out of both."""
    import os
    import tempfile
    import autoencoder as ae
    import diffusion
    import scenes
    import training
    steps, warm = args.warmup + 10 * args.iters, args.warmup
    common = ["--preset", "tiny", "--device", device.type, "--every", "100000",
              "--log-every", "10"]
    parts = ByCaller(device)
    if stage == "autoencoder":
        cls = ae.AutoEncoder

        def which_view(model, planes, cams, *a, **k):     # the input camera, or a novel one
            p0 = model.P0(len(cams)).to(cams.device)
            return "render P0 (volume)" if torch.equal(cams, p0) else "render novel view (volume)"
        for owner, name, label in (
                (cls, "posterior", "encoder"), (cls, "decode", "decoder"),
                (cls, "render", which_view), (ae.Field, "forward", "field MLP (every sample)"),
                (ae.Upsampler, "forward", "upsampler"),
                (ae, "autoencoder_loss", "losses (the rest of the forward)"),
                (ae.Discriminator, "forward", "discriminator forward"),
                (ae, "discriminator_step", "discriminator step (the rest)")):
            parts.wrap(owner, name, label)
    else:
        parts.wrap(diffusion.UNet, "forward", "UNet forward")
        parts.wrap(diffusion, "train_step", "noising + loss (the rest of the forward)")
        parts.wrap(diffusion, "read_batch", "data (latent batches)")
    parts.wrap(torch.Tensor, "backward", "backward (all parts)")
    parts.wrap(torch.nn.utils, "clip_grad_norm_", "gradient clipping")
    for opt in (torch.optim.Adam, torch.optim.AdamW):
        parts.wrap(opt, "step", "optimiser (Adam)")
    parts.wrap(training, "ema_update", "EMA of the weights")
    parts.wrap(torch.utils.data.dataloader._BaseDataLoaderIter, "__next__", "data loading")
    prof = None
    if by_ops:
        from torch.profiler import ProfilerActivity, profile, schedule
        prof = profile(activities=[ProfilerActivity.CPU] + (
            [ProfilerActivity.CUDA] if device.type == "cuda" else []),
            schedule=schedule(wait=warm - 1, warmup=1, active=steps - warm))
    parts.wrap(training.StepLog, "add", "logging")
    timed_add = training.StepLog.add

    def step_done(log, step, logs):                       # the loop calls this once a step
        timed_add(log, step, logs)
        if step == warm:
            parts.reset()                                 # measure from here
        if step == steps:
            parts.stop()                                  # to here
        if prof is not None:
            prof.step()
    training.StepLog.add = step_done                      # (undo() restores the original)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            data = os.path.join(tmp, "scenes")
            scenes.make_scenes(data, 256, res=64, verbose=False)
            ae_args = ae.get_args(common + ["--data", data, "--out", os.path.join(tmp, "ae"),
                                            "--steps", str(steps if stage == "autoencoder"
                                                           else 1)])
            if prof is not None and stage == "autoencoder":
                prof.start()
            ae.train(ae_args)
            if stage == "diffusion":
                if prof is not None:
                    prof.start()
                diffusion.train(diffusion.get_args(common + [
                    "--ae", os.path.join(tmp, "ae", "ckpt.pt"), "--out",
                    os.path.join(tmp, "ldm"), "--steps", str(steps)]))
            if prof is not None:
                prof.stop()
            sec, rows = parts.table(steps - warm)
    finally:
        parts.undo()
    if prof is None:
        return sec, rows
    ops = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)
    total = sum(e.self_cpu_time_total for e in ops)
    return sec, [dict(op=e.key, ms_per_step=e.self_cpu_time_total / 1e3 / (steps - warm),
                      share=e.self_cpu_time_total / total, calls=e.count // (steps - warm))
                 for e in ops[:12]]


def bench_profile(device, args):
    """Where a tiny training step's time goes, for both stages: by part of the code (encoder,
    decoder, each render, losses, backward, optimiser, EMA, logging, data) and by operator."""
    out = dict(case="profile")
    for stage in ("autoencoder", "diffusion"):
        sec, rows = profile_training(stage, device, args, by_ops=False)
        print(f"  tiny {stage} step: {1e3 * sec:.1f} ms, by part of the code:")
        for r in rows:
            print(f"    {r['part']:40s} {r['ms_per_step']:8.1f} ms  {100 * r['share']:5.1f}%")
        _, ops = profile_training(stage, device, args, by_ops=True)
        print("  ... by operator (self time, under the profiler):")
        for r in ops:
            print(f"    {r['op']:40s} {r['ms_per_step']:8.1f} ms  {100 * r['share']:5.1f}%  "
                  f"{r['calls']:4d} calls/step")
        out[stage] = dict(ms_per_step=1e3 * sec, parts=rows, ops=ops)
    return out


CASES = {"render": bench_render, "ae-step": bench_ae_step, "sample": bench_sample,
         "e2e": bench_e2e, "data": bench_data, "budget": bench_budget,
         "checkpoint": bench_checkpoint, "profile": bench_profile}
DEFAULT_CASES = ["render", "ae-step", "sample", "e2e"]


def main():
    p = argparse.ArgumentParser(description="Benchmark the stages of the pipeline.")
    p.add_argument("cases", nargs="*", default=DEFAULT_CASES, help=f"any of {list(CASES)} "
                   f"(default: {' '.join(DEFAULT_CASES)})")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot paths")
    p.add_argument("--profile", action="store_true", help="also print torch.profiler's 15 "
                   "costliest ops of each case (warm-up and timed calls together)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--ae-preset", default="base", choices=["base", "small", "tiny"],
                   help="autoencoder size for the ae-step and e2e cases")
    p.add_argument("--batch", type=int, default=0,
                   help="ae-step batch (0: the preset's; base's 16 needs > 23 GB on a CPU)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help="bf16 autocast in the render and ae-step cases (CUDA or CPU)")
    p.add_argument("--data-dir", default="/tmp/wildfusion-bench-data",
                   help="data case: where its 2k and 20k test images are made (once)")
    p.add_argument("--data-images", type=int, default=6400, help="data case: images read")
    p.add_argument("--workers", type=int, default=2, help="data case: loader processes")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    name = (torch.cuda.get_device_name(device) if device.type == "cuda"
            else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__} on {device.type}: {name}")
    results = []
    for case in args.cases:
        if case not in CASES:
            sys.exit(f"error: unknown case {case!r}; choose from {list(CASES)}")
        torch.manual_seed(0)
        if args.profile:
            # Where the time goes, op by op: on a GPU sorted by the kernels' time, not the
            # (asynchronous) launch time the CPU sees.
            from torch.profiler import ProfilerActivity, profile
            on_gpu = device.type == "cuda"
            with profile(activities=[ProfilerActivity.CPU] +
                         ([ProfilerActivity.CUDA] if on_gpu else [])) as prof:
                r = CASES[case](device, args)
            print(prof.key_averages().table(sort_by="cuda_time_total" if on_gpu else
                                            "cpu_time_total", row_limit=15,
                                            max_name_column_width=50))
        else:
            r = CASES[case](device, args)
        r.update(device=name, compile=args.compile, torch=torch.__version__)
        results.append(r)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items() if k not in ("device", "torch")
                        and not isinstance(v, (dict, list))))
    if args.json:
        with data.writing(args.json, "the results") as tmp, open(tmp, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    data.run_cli(main)
