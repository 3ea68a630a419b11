"""
training.py -- the plumbing both training scripts share, in one room.

Not a stage of WildFusion: autoencoder.py (stage 1) and diffusion.py (stage 2) each keep their
model, their loss and their loop; what they do the same way lives here, so that each stage file
reads as its stage. Nothing in this file knows what is being trained.

Map of the file:
    1. flags          the runtime flags both scripts take; presets; one-line checks
    2. processes      one per GPU under torchrun: rank, world size, set-up, gradient all-reduce
    3. data order     which images every step reads, a pure function of (seed, step): exact resume
    4. the step       gradient accumulation + all-reduce + clipping + update; the EMA of weights
    5. logs           losses summed on the device, read once per --log-every steps; progress bar
    6. checkpoints    atomic writes with a checksum, safe and checked loading, exact
                      resume (weights, optimiser, RNG)
    7. timing         seconds per call; what a run will cost, said (or refused) before it starts
"""
import argparse
import functools
import hashlib
import os
import time

import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm import tqdm

import data
from data import UserError


# ---------------------------------------------------------------------------------------------
# 1. Flags
# ---------------------------------------------------------------------------------------------
PRESET_EPILOG = ("Flags shown without a default take the preset's value, unless their help "
                 "says otherwise.")


class Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help with each flag's default, except a default of None: the help text says what
    takes its place (the preset's value, a folder named after the run, ...)."""
    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def add_runtime_args(p, what):
    """Flags every training script shares: seed, device, precision, compilation, threads,
    data loading, logging, resuming."""
    a = p.add_argument
    a("--resume", action="store_true", help="continue from OUT/ckpt.pt (from step 0 while "
      "there is none: safe on every launch of a preemptible job)")
    a("--seed", type=int, default=0, help="initial weights, data order, noise")
    a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu, cuda, "
      "cuda:1, ...")
    a("--amp", default="none", choices=["none", "bf16"],
      help="bf16 autocast on the device (CUDA or CPU)")
    a("--compile", action="store_true", help=f"torch.compile {what} (CUDA or CPU; the first "
      "steps are slow while it compiles)")
    a("--threads", type=int, default=0, help="CPU threads (0: torch's default)")
    a("--workers", type=int, default=None, help="data-loading processes (default: 4 on CUDA, "
      "0 on a CPU, where they would take cores from training)")
    a("--log-every", type=int, default=10, help="read the losses from the device and show "
      "them every N steps")


def apply_preset(args, presets):
    """Fill every flag left at None with the chosen preset's value, and the runtime defaults."""
    fill_open(args, presets[args.preset])
    if args.workers is None:
        args.workers = 4 if args.device.startswith("cuda") else 0
    return args


def fill_open(args, values):
    """Set each flag named in `values` that the command line left at None (or that is no flag
    at all: a preset may fix a value that the command line does not offer)."""
    for k, v in values.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    return args


def need(ok, msg):
    """A bad flag or input: one clear line (data.run_cli prints it), before anything heavy."""
    if not ok:
        raise UserError(msg)


def check_runtime_args(args):
    """The checks every training script makes on the flags above and on its batch."""
    for name in ("steps", "batch", "accum", "every", "log_every"):
        need(getattr(args, name) > 0, f"--{name.replace('_', '-')} must be positive")
    need(args.workers >= 0, "--workers must be >= 0")
    need(0 <= args.ema < 1, "--ema must be in [0, 1)")
    need(args.device == "cpu" or torch.cuda.is_available(),
         f"--device {args.device}: CUDA is not available here; use --device cpu")
    need(args.batch % world() == 0,
         f"--batch {args.batch} must be divisible by the {world()} processes")


def start(args):
    """Before a training script checks or builds anything: its processes and threads."""
    setup_distributed(args)
    if args.threads:
        torch.set_num_threads(args.threads)


# ---------------------------------------------------------------------------------------------
# 2. Processes: one per GPU under torchrun, else just one
# ---------------------------------------------------------------------------------------------
def rank():
    return dist.get_rank() if dist.is_initialized() else 0


def world():
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def setup_distributed(args):
    """Under torchrun (WORLD_SIZE set): one process per device, gloo on CPU, nccl on CUDA."""
    if int(os.environ.get("WORLD_SIZE", 1)) > 1 and not dist.is_initialized():
        cuda = args.device.startswith("cuda")
        dist.init_process_group("nccl" if cuda else "gloo")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", 0))
            torch.cuda.set_device(local)
            args.device = f"cuda:{local}"


def finish():
    """End of training: leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_grads(params):
    """Data parallelism, written out: average the gradients of all processes with one
    all-reduce over a flat buffer. (nn.parallel.DistributedDataParallel does the same, bucketed
    and overlapped with backward, but it only hooks a module's forward(); the autoencoder is
    called through encode/decode/render, so the plain version is both simpler and correct.)
    Called once per optimiser step, after all --accum micro-batches (optimiser_step)."""
    if world() == 1:
        return
    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
    flat = torch.cat([g.flatten() for g in grads])
    dist.all_reduce(flat)
    flat /= world()
    for p, g in zip(params, flat.split([g.numel() for g in grads])):
        p.grad = g.view_as(p)


# ---------------------------------------------------------------------------------------------
# 3. Data order
# ---------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def epoch_order(seed, epoch, n):
    """One epoch's data order, from (seed, epoch) alone: a permutation of 0..n-1 (n,) and a
    mirror bit per position (n,), as numpy arrays (9 bytes per image: 12 MB for ImageNet).
    Cached: a step needs only its epoch (or two at the seam)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(n, generator=g).numpy(), (torch.rand(n, generator=g) < 0.5).numpy()


def batch_indices(step, n, batch, seed, micro=0, accum=1):
    """(index, mirror) pairs this process uses in micro-batch `micro` of `step`.

    The data is read epoch by epoch in the order above. Step s covers the positions
    [s * G, (s + 1) * G) of that endless sequence, G = batch * accum; micro-batch k of it the
    k-th run of `batch` positions, split evenly over the processes. A pure function of (seed,
    step, micro, rank): a resumed run -- any number of DataLoader workers -- sees exactly the
    batches, mirror images included, that an uninterrupted one would."""
    per = batch // world()
    first = step * batch * accum + micro * batch + rank() * per
    out = []
    for i in range(first, first + per):
        order, mirror = epoch_order(seed, i // n, n)
        out.append((int(order[i % n]), bool(mirror[i % n])))
    return out


class StepBatches(torch.utils.data.Sampler):
    """The DataLoader's batch sampler: for each step from `start` to `steps`, the `accum`
    micro-batches of batch_indices in turn, as lists of (index, mirror) keys for ds[key].
    The DataLoader's workers decode them ahead of the training loop."""

    def __init__(self, n, batch, seed, start, steps, accum=1):
        self.n, self.batch, self.seed, self.accum = n, batch, seed, accum
        self.start, self.steps = start, steps

    def __len__(self):
        return (self.steps - self.start) * self.accum

    def __iter__(self):
        for step in range(self.start, self.steps):
            for k in range(self.accum):
                yield batch_indices(step, self.n, self.batch, self.seed, k, self.accum)


def make_loader(ds, sampler, workers, device):
    """Batches of dict(image (B, 3, H, W), depth (B, 1, H, W), label (B,)), decoded by
    `workers` processes (0: in this one) and, on CUDA, copied from pinned memory."""
    # Its own generator: a DataLoader draws its workers' seeds when it starts, and from the
    # global RNG that draw would shift every random number after it (no exact resume).
    return torch.utils.data.DataLoader(ds, batch_sampler=sampler, num_workers=workers,
                                       pin_memory=device.type == "cuda",
                                       persistent_workers=workers > 0,
                                       generator=torch.Generator().manual_seed(0))


# ---------------------------------------------------------------------------------------------
# 4. The step
# ---------------------------------------------------------------------------------------------
GRAD_CLIP = 1.0           # both stages clip the gradient norm at this
def optimiser_step(opt, batches, loss_fn, autocast, grad_clip=0.0):
    """Gradient accumulation, data parallelism and the update, shared by every training step.

    loss_fn(*batch) -> (loss, logs of scalar tensors, anything else) for one micro-batch.
    The micro-batches are run one at a time (under autocast) and each loss is backpropagated
    at once, divided by their number, so only one micro-batch's activations are alive at a
    time and the summed gradient is that of the mean loss over all of them: with per-image
    losses averaged over the batch, exactly the gradient of one --accum times larger batch.
    The processes' gradients are then averaged by one all-reduce (all_reduce_grads), once per
    optimiser step and not per micro-batch: what DistributedDataParallel's no_sync() does.
    Returns (the micro-batches' mean logs, plus gnorm when clipping; the list of extras)."""
    opt.zero_grad(set_to_none=True)
    logs_list, extras = [], []
    for batch in batches:
        with autocast:
            loss, logs, extra = loss_fn(*batch)
        (loss / len(batches)).backward()
        logs_list.append(logs)
        extras.append(extra)
    logs = {k: torch.stack([l[k] for l in logs_list]).mean() for k in logs_list[0]}
    params = [p for group in opt.param_groups for p in group["params"]]
    all_reduce_grads(params)
    if grad_clip > 0:
        logs["gnorm"] = nn.utils.clip_grad_norm_(params, grad_clip).detach()
    opt.step()
    return logs, extras


@torch.no_grad()
def ema_update(ema, model, decay):
    """ema <- decay * ema + (1 - decay) * model, parameter by parameter; buffers are copied.
    Both training scripts keep such an average and sample or evaluate with it: a constant
    learning rate leaves the last weights jittering around a minimum, their average sits in it."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.lerp_(p.detach(), 1 - decay)
    for be, b in zip(ema.buffers(), model.buffers()):
        be.copy_(b)


def ema_decay(step, decay):
    """The EMA's decay after STEP optimiser steps, with a warm-up: (1 + step) / (10 + step)
    until it reaches `decay`, so the early average is not dominated by the random start.
    It gets there at step (10 decay - 1) / (1 - decay): 0.999 at step 8990, so a 3000-step
    run ends at 0.997."""
    return min(decay, (1 + step) / (10 + step))


# ---------------------------------------------------------------------------------------------
# 5. Logs
# ---------------------------------------------------------------------------------------------
class StepLog:
    """The progress bar and the loss history of a training loop.

    The step's losses stay on the device and are summed there; the host reads them (one sync)
    only every `every` steps, so the GPU never waits for the Python loop. Each read adds a row
    of means (and `unit`: items per second) to `history` and to the progress bar."""

    def __init__(self, steps, start, every, items_per_step, unit):
        self.steps, self.every, self.items, self.unit = steps, every, items_per_step, unit
        self.bar = tqdm(total=steps, initial=start, disable=not is_main(), dynamic_ncols=True)
        self.sums, self.history = {}, []
        self.t_last, self.step_last = time.time(), start

    def add(self, step, logs):
        """The logs (scalar tensors) of the step that just ended as `step`."""
        for k, v in logs.items():                 # a loss may start mid-way: a count per key
            total, count = self.sums.get(k, (0, 0))
            self.sums[k] = (total + v, count + 1)
        self.bar.update(1)
        if step % self.every == 0 or step == self.steps:
            values = torch.stack([total for total, _ in self.sums.values()]).tolist()
            means = {k: v / n for (k, (_, n)), v in zip(self.sums.items(), values)}
            now = time.time()
            means[self.unit] = self.items * (step - self.step_last) / max(now - self.t_last, 1e-9)
            self.t_last, self.step_last, self.sums = now, step, {}
            self.history.append(dict(step=step, **means))
            self.bar.set_postfix({k: f"{v:.3g}" for k, v in means.items()})

    def close(self):
        self.bar.close()


# ---------------------------------------------------------------------------------------------
# 6. Checkpoints
# ---------------------------------------------------------------------------------------------
CHECKSUM = "sha256"                    # the entry that holds a checkpoint's checksum


def checksum(state):
    """SHA-256 of everything in a checkpoint, in a fixed order: each tensor's dtype, shape and
    bytes, and every other value's repr, walking dicts in sorted key order. Computed from the
    loaded objects, not the file, so it checks what training will actually use: a flipped byte
    inside a tensor (which torch.load reads without complaint) changes it, and so does one in
    a number or a string of the header."""
    h = hashlib.sha256()

    def walk(x):
        if isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())     # the raw bytes, no copy
        elif isinstance(x, dict):
            h.update(b"{")
            for k in sorted(x, key=repr):
                h.update(repr(k).encode())
                walk(x[k])
            h.update(b"}")
        elif isinstance(x, (list, tuple)):
            h.update(b"[")
            for v in x:
                walk(v)
            h.update(b"]")
        else:
            h.update(repr(x).encode())
    walk({k: v for k, v in state.items() if k != CHECKSUM})
    return h.hexdigest()


def tensor_bytes(x):
    """Bytes of the tensors in a nested dict/list: about a checkpoint's size on disk."""
    if isinstance(x, torch.Tensor):
        return x.numel() * x.element_size()
    if isinstance(x, dict):
        return sum(tensor_bytes(v) for v in x.values())
    if isinstance(x, (list, tuple)):
        return sum(tensor_bytes(v) for v in x)
    return 0


def save_checkpoint(path, state, safe=None):
    """Write `state` with its checksum, atomically: a crash or a full disk mid-write leaves
    the previous checkpoint intact and no temporary file (data.writing), and says so in one
    line. `safe` says what to do then; by default, which step the old file still holds."""
    def still_there():
        old = steps_done(path)
        return (f"the file still holds the checkpoint of step {old}, intact: free space and "
                f"run again with --resume" if old else "no checkpoint was written yet; free "
                "space and run again")
    state = dict(state, **{CHECKSUM: checksum(state)})
    what = f"the checkpoint of step {state['step']}" if "step" in state else "a checkpoint"
    with data.writing(path, what, safe or still_there, size=tensor_bytes(state)) as tmp:
        try:
            with open(tmp, "wb") as f:       # a Python file, so that a full disk is an OSError
                torch.save(state, f)
        except RuntimeError as e:            # ... which torch's zip writer then hides behind
            if isinstance(e.__context__, OSError):   # its own error while closing the file
                raise e.__context__ from None
            raise


def saved(path, step):
    """What is safe once the checkpoint of `step` is written: for a later write that fails."""
    return (f"the checkpoint of step {step} in {path} is intact; free space and run again with "
            f"--resume")


_unchecked = set()                           # old checkpoints already noted once


def load_checkpoint(path, kind, what):
    """torch.load with weights_only=True (a checkpoint is untrusted input), a kind check, and
    the checksum: a file whose contents changed since it was written (a bad disk, a broken
    copy) is refused in one line instead of being trained on."""
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise UserError(f"{path}: not a readable PyTorch checkpoint ({type(e).__name__}); "
                        f"expected {what}")
    if not isinstance(ckpt, dict) or ckpt.get("kind") != kind:
        found = ckpt.get("kind", "unknown") if isinstance(ckpt, dict) else type(ckpt).__name__
        raise UserError(f"{path}: this is a {found} checkpoint, expected {what}")
    if CHECKSUM not in ckpt:                 # written before checkpoints carried one
        if path not in _unchecked and is_main():
            print(f"note: {path} has no checksum (an older checkpoint), so it cannot be checked "
                  f"for corruption; its next save adds one")
        _unchecked.add(path)
    elif checksum(ckpt) != ckpt[CHECKSUM]:
        raise UserError(f"{path}: corrupted (its contents no longer match the checksum written "
                        f"with it); use an intact copy, or retrain")
    return ckpt


def steps_done(path):
    """The step a checkpoint was saved at (0 when there is none): what --resume skips. A file
    that does not load counts as 0 here; the training script then says what is wrong with it."""
    try:
        return int(torch.load(path, map_location="cpu", weights_only=True)["step"])
    except Exception:
        return 0


def resume_from(path, kind, config, seed, upgrade=None, args=None, **objects):
    """Exact resume: restore each object (model, optimiser, ...) from the entry of the same name,
    and this process's RNG state, so the run continues as if never stopped. Returns the step.

    With another number of processes than the checkpoint's, the data order still continues
    where it stopped (it depends on the step, not the processes), but the saved RNG states (one
    per process) no longer match: each process then draws a fresh one from (seed, step, rank),
    and the run goes on as a correct but no longer bit-exact continuation. `upgrade(path,
    config)` brings an older checkpoint's config to today's keys (or refuses it in one line)
    before comparing. With
    `args`, the flags that differ from the checkpoint's are named in one line: a loss that
    changed is a different training from here on.

    No checkpoint yet: a fresh start from step 0, so that every launch of a preemptible job
    (a SLURM requeue) can pass --resume."""
    if not os.path.exists(path):
        if is_main():
            print(f"note: --resume, but no {path} yet: starting from step 0")
        return 0
    ckpt = load_checkpoint(path, kind, f"a {kind} checkpoint to resume")
    saved_config = upgrade(path, ckpt["config"]) if upgrade else ckpt["config"]
    if saved_config != config:
        raise UserError(f"{path}: was trained with another model configuration (or data); "
                        f"use the same flags, or another --out")
    saved, now = ckpt.get("args", {}), vars(args) if args is not None else {}
    changed = [f"--{k.replace('_', '-')} {saved[k]} -> {v}" for k, v in now.items()
               if k in saved and saved[k] != v and k != "resume"]
    if changed and is_main():
        print(f"note: {path} continues with flags other than it was trained with: "
              + ", ".join(changed))
    for name, obj in objects.items():
        if name == "ema" and "ema" not in ckpt:     # saved without one (--ema 0):
            name = "model"                          # the average starts at today's weights
        try:
            obj.load_state_dict(ckpt[name])
        except (KeyError, RuntimeError, ValueError) as e:
            raise UserError(f"{path}: its {name} does not fit this run ({type(e).__name__}; "
                            f"e.g. the data gained or lost depth maps since); use another --out")
    if len(ckpt["rng"]) == world():
        set_rng_state(ckpt["rng"][rank()])
    else:
        if is_main():
            print(f"note: {path} was saved by {len(ckpt['rng'])} process(es), this run has "
                  f"{world()}: the random streams restart from (seed, step, rank)")
        torch.manual_seed((seed * 1_000_003 + ckpt["step"]) * 1_009 + rank())
    return ckpt["step"]


def rng_state():
    s = dict(torch=torch.get_rng_state())
    if torch.cuda.is_available():
        s["cuda"] = torch.cuda.get_rng_state_all()
    return s


def set_rng_state(s):
    torch.set_rng_state(s["torch"])
    if "cuda" in s and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])


def gather_rng():
    """Every process's RNG state (rank 0 writes them all, so each rank resumes its own)."""
    s = rng_state()
    if world() == 1:
        return [s]
    out = [None] * world()
    dist.all_gather_object(out, s)
    return out


def save_on_main(path, make_state):
    """Every rank calls this at the same step. Each hands its RNG state to rank 0 (a collective:
    if one rank skipped it the others would wait forever), and rank 0 writes the checkpoint
    make_state(rngs) atomically."""
    rngs = gather_rng()
    if is_main():
        save_checkpoint(path, make_state(rngs))


# ---------------------------------------------------------------------------------------------
# 7. Timing, and what a run will cost before it starts
# ---------------------------------------------------------------------------------------------
def saved_bytes(fn):
    """Bytes of the tensors autograd saves for the backward pass while fn() runs (the
    activation memory of a training step), each storage counted once."""
    seen, total = set(), [0]

    def pack(t):
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total[0] += s.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0]


def free_memory(device):
    """Bytes this process could still use: free GPU memory, or the host's available memory."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            return int(next(ln for ln in f if ln.startswith("MemAvailable")).split()[1]) * 1024
    except (OSError, StopIteration):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def preflight(loss_at, modules, batch, accum, steps, device, what, also_at=None):
    """Before the first step: say what the run will cost on this device, and stop in one line
    if its memory will not fit. loss_at(B) builds the training loss of B random images (a
    closure); `modules` are what the optimiser trains (their weights, gradients and Adam's two
    moments: 16 bytes per parameter) and anything else held (counted at 4). also_at(B), if
    given, is the rest of a step's work on B images (a second network's loss and backward).

    Memory: the fixed part plus the activations autograd saves for one image (measured on
    this device at batch 1) times the micro-batch. Time: one forward + backward of a whole
    micro-batch, and also_at's (once the memory is known to fit), timed after an untimed one
    of one image, times --accum: it leaves out the optimiser and the data (a few percent at
    every preset measured). The RNG state is put back afterwards, so the run is the same."""
    rng = rng_state()
    trained, held = modules
    fixed = sum(16 * p.numel() for m in trained for p in m.parameters()) + sum(
        4 * p.numel() for m in held for p in m.parameters())
    per_image = saved_bytes(lambda: loss_at(1))
    need, free = fixed + batch * per_image, free_memory(device)
    if need > 0.8 * free:                     # 20% for temporaries the estimate leaves out
        fit = int((0.8 * free - fixed) // per_image)
        # The same gradient: --batch x --accum images per step, as asked.
        total = batch * accum
        b = max((d for d in range(1, fit + 1) if total % d == 0), default=0)
        fix = (f"--batch {b} --accum {total // b} fits and gives the same gradient" if b else
               "not even one image fits: use --preset small or a larger device")
        raise UserError(f"{what} needs about {need / 1e9:.1f} GB ({fixed / 1e9:.1f} GB weights "
                        f"and optimiser + {per_image / 1e9:.2f} GB per image x batch {batch}); "
                        f"{device.type} has {free / 1e9:.1f} GB free: {fix}")
    also_at = also_at or (lambda B: None)

    def step_at(B):
        loss_at(B).backward()
        also_at(B)
    step_at(1)                                          # untimed: lazy initialisation
    sec = seconds_per_call(lambda: step_at(batch), warm=0, reps=1) * accum
    for m in trained:
        m.zero_grad(set_to_none=True)
    set_rng_state(rng)
    if is_main():
        threads = "" if device.type == "cuda" else f", {torch.get_num_threads()} threads"
        total = sec * steps
        total = f"{total / 60:.1f} min" if total < 3600 else f"{total / 3600:.1f} h"
        print(f"cost: about {need / 1e9:.2f} GB on {device.type}{threads}; about {sec:.2f} s per "
              f"step from a timed step, so about {total} for {steps} steps")
    return need, sec


def seconds_per_call(fn, warm=1, reps=3):
    """Median wall time of fn() over `reps` calls, after `warm` untimed ones (the first calls
    pay for memory allocation and lazy initialisation)."""
    def sync():                 # checked each time: fn() itself may be what first touches CUDA
        if torch.cuda.is_initialized():
            torch.cuda.synchronize()
    for _ in range(warm):
        fn()
    times = []
    for _ in range(reps):
        sync()                                  # GPU work is asynchronous: wait for it before
        t0 = time.perf_counter()                # reading the clock, on both sides
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]
