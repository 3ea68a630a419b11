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


CASES = dict(render=bench_render)


def main():
    p = argparse.ArgumentParser(description="Benchmark the stages of the pipeline.")
    p.add_argument("cases", nargs="*", default=list(CASES), help=f"any of {list(CASES)}")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile", action="store_true", help="torch.compile the hot paths (CUDA)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    p.add_argument("--json", help="also write the results to this JSON file")
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
