"""
bench.py -- speed and memory of each stage, measured the same way every time.

    python bench.py                      # every case on the best device here
    python bench.py render --device cpu  # one case
    python bench.py render --compile     # the hot path through torch.compile (CUDA)
    python bench.py --json bench.json    # also write the numbers as JSON

Each case runs a few warm-up iterations (allocator, compilation), then times `--iters` more,
synchronising the GPU around the clock. Peak memory is the CUDA allocator's peak on GPU and the
process's peak resident set size on CPU (which includes Python and torch themselves).

Cases:
    render   the volume renderer, forward + backward: batch 2, 64x64 rays, 48 coarse + 48 fine
             samples per ray, triplane 3 x 32 x 128 x 128, field MLP 32 -> 64 -> 1 + 32.
    sample   DDIM-50 samples per second at batch 4 for a 4x32x32 latent with the base UNet,
             its parameter count, and a library UNet of the same shape when diffusers is there.
    ae-step  one autoencoder training step (both players of the GAN), images/s, peak memory.
    e2e      seconds from a latent to a 60-frame turntable (decode + render + upsample).
"""
import argparse
import json
import platform
import resource
import sys
import time

import torch

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
        out = render.render(planes, field, cams.to(device), 40.0, res, n_coarse=S, n_fine=S,
                            perturb=True, compile=args.compile)
        (out["features"].square().mean() + out["depth"].mean()).backward()
    sec = timed(step, device, args.warmup, args.iters)
    samples = B * res * res * 2 * S
    return dict(case="render", ms_per_iter=1e3 * sec, samples_per_s=samples / sec,
                rays_per_s=B * res * res / sec, peak_mem_mb=peak_memory_mb(device),
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
    r = dict(case="sample", unet_params_m=n_par / 1e6, ddim50_s=full, samples_per_s=4 / full,
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
    a.fov_deg, a.radius = 40.0, 2.7
    model = ae.AutoEncoder(ae.model_config(a)).to(device).eval()
    model.compile = args.compile
    z = torch.randn(1, a.z_ch, a.z_res, a.z_res, device=device)
    cams = sample.turntable_cameras(60, 25.0, 5.0, a.radius)

    def run(frames):
        with torch.no_grad():
            sample.render_frames(model, model.decode(z), cams[:frames])
    run(2)                                                                   # warm-up
    sec = timed(lambda: run(60), device, 0, 1 if device.type == "cpu" else args.iters)
    return dict(case="e2e", seconds=sec, frames_per_s=60 / sec, peak_mem_mb=peak_memory_mb(device),
                config=f"{args.ae_preset} autoencoder ({a.res} px, render {a.render_res} px, "
                       f"{a.n_coarse}+{a.n_fine} samples), 60 frames in chunks of 16")


def bench_ae_step(device, args):
    """One autoencoder training step at the `--ae-preset` size: encode, decode, render P0 and a
    novel view, L1 + depth + generator loss, discriminator step; images/s and peak memory."""
    import autoencoder as ae
    a = ae.get_args(["--preset", args.ae_preset])
    a.fov_deg, a.radius = 40.0, 2.7
    a.adv_weight = max(a.adv_weight, 0.05)            # always time the adversarial part too
    model, disc, opt, opt_d = ae.build(a, device)     # the training script's own step below
    if args.compile:
        for m in (model.encoder, model.decoder, model.upsampler):
            m.compile()
        model.compile = True
    B = args.batch or a.batch
    image = torch.rand(B, 3, a.res, a.res, device=device) * 2 - 1
    depth = 2 + torch.rand(B, 1, a.res, a.res, device=device)
    autocast = torch.autocast("cuda", torch.bfloat16, enabled=args.amp == "bf16")

    def step():
        _, fake = ae.autoencoder_step(model, disc, opt, image, depth, a, True, None, autocast)
        ae.discriminator_step(disc, opt_d, image, depth, fake, a, autocast)
    sec = timed(step, device, args.warmup, args.iters)
    n = sum(p.numel() for p in model.parameters()) / 1e6
    return dict(case="ae-step", ms_per_iter=1e3 * sec, images_per_s=B / sec,
                peak_mem_mb=peak_memory_mb(device), params_m=n, amp=args.amp,
                config=f"{args.ae_preset} preset: batch {B}, {a.res} px, render {a.render_res} px, "
                       f"{a.n_coarse}+{a.n_fine} samples, with novel view + discriminator step")


CASES = {"render": bench_render, "ae-step": bench_ae_step, "sample": bench_sample,
         "e2e": bench_e2e}


def main():
    p = argparse.ArgumentParser(description="Benchmark the stages of the pipeline.")
    p.add_argument("cases", nargs="*", default=list(CASES), help=f"any of {list(CASES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot paths (CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--ae-preset", default="base", choices=["base", "tiny"],
                   help="autoencoder size for the ae-step and e2e cases")
    p.add_argument("--batch", type=int, default=0,
                   help="ae-step batch (0: the preset's; base's 16 needs > 23 GB on a CPU)")
    p.add_argument("--amp", default="none", choices=["none", "bf16"],
                   help="bf16 autocast in ae-step (CUDA)")
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
        r = CASES[case](device, args)
        r.update(device=name, compile=args.compile, torch=torch.__version__)
        results.append(r)
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                        for k, v in r.items() if k not in ("device", "torch")))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
