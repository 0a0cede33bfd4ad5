"""Throughput of every method, and a check of the GPU code paths (printed, never asserted by pytest).

    python tests/benchmark.py data                       # views/s of the SimCLR CIFAR pipeline, one core
    python tests/benchmark.py loader                     # CPU ms per image of each method's ImageNet views, one core
    python tests/benchmark.py methods --arch resnet_small --batch-size 128 --steps 5     # CPU: one table row per method
    python tests/benchmark.py methods --amp auto --channels-last                         # GPU: each method's CIFAR recipe
    python tests/benchmark.py gpu-check                  # GPU: PASS/FAIL per line, exit 1 on any FAIL

`methods` runs each method's own main() (its views, model, loss, optimizer and
train_one_epoch: no copy of them here) for --warmup + --steps optimizer steps
through the real loader. It wraps the loader's iterator to time every next():
the time the loop waits for its next batch. Before them the same
train_one_epoch runs on the first batch, already on the device, repeated (the
compute alone; the Run is put back afterwards, so the real steps are numbered
and logged as if it had not run). Warm-up steps (worker start-up,
cudnn.benchmark's kernel search) are left out of both. Columns: images/s end to
end and of the compute alone, the share of wall time spent waiting for data,
seconds per CIFAR-10 epoch at the end-to-end rate (50,000 images), peak GPU
memory (or the training process's peak RSS on the CPU, loader workers not
included), and the cost per image relative to SimCLR's (compute alone) next to
two predictions of it: from passes (each backbone pass of the compute alone
counted by a hook, its pixels x 3 when back-propagated, forward 1 + backward 2,
x 1 when only forwarded: keys, targets, teachers) and from pixels (views x
pixels per view, as the loader delivers them), both over SimCLR's two
back-propagated full-size views.

`loader` times each method's ImageNet view recipe (its own Views class at
224 px, JPEG decoding included) on one core over generated 500x375 JPEGs
(ILSVRC-2012's typical size): the loader CPU time per image, and what it
makes of an ImageNet epoch (1.28M images) on 64 loader workers.

`gpu-check` runs, for every method, short fp16 and bf16 + channels-last runs
under torch.cuda.set_sync_debug_mode("warn") (a sync inside the loop outside the
log step fails; fp16's GradScaler.step has one by design), checks finite losses,
the loss scaler not skipping every step, a resume from the checkpoint written
under AMP, SyncBN and nccl under torchrun on 2+ GPUs, and prints SimCLR's
compute-alone rate in NCHW and in channels-last (which layout to default to)
and the `methods` table at each recipe's batch size. Without CUDA it says so
and runs the bf16 autocast checks on the CPU.
"""
import argparse
import contextlib
import gc
import importlib
import io
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
import common  # noqa: E402
import simclr  # noqa: E402

CIFAR10_TRAIN = 50_000

# name -> (module, extra flags). CLSA-Multi at CIFAR scale: the README's command (sizes scaled from ImageNet's).
MULTI = ["32", "28", "24", "20", "16"]
METHODS = {
    "simclr": ("SimCLR", "simclr", []),
    "aag": ("AAG", "aag", []),
    "clsa-single": ("CLSA-Single", "clsa", []),
    "clsa-multi": ("CLSA-Multi", "clsa", ["--weak-sizes", *MULTI, "--strong-sizes", *MULTI]),
    "ressl": ("ReSSL 1x", "ressl", []),
    "dssl-simsiam": ("DSSL-SimSiam", "dssl", ["--framework", "simsiam"]),
    "dssl-byol": ("DSSL-BYOL", "dssl", ["--framework", "byol"]),
    "dssl-simclr": ("DSSL-SimCLR", "dssl", ["--framework", "simclr"]),
}
SYNC_MESSAGE = "synchronizing CUDA operation"


# ---------------------------------------------------------------------------
# data: one loader worker's share of the work
# ---------------------------------------------------------------------------

def bench_data(args):
    ds = common.dataset("synthetic", args.data_dir, True, image_size=32) if args.data == "synthetic" \
        else common.dataset(args.data, args.data_dir, True, download=False)
    views = common.SeededViews(ds, simclr.SimCLRViews(simclr.get_args(["--data", args.data])))
    n = min(len(ds), args.images)
    for i in range(50):
        views[(i, i)]
    t0 = time.perf_counter()
    for i in range(n):
        views[(i, i)]
    dt = time.perf_counter() - t0
    print(f"data: {2 * n / dt:.0f} views/s on one core ({n / dt:.0f} images/s, 2 views each; {args.data} 32x32)")


# ---------------------------------------------------------------------------
# loader: CPU time per image of each method's ImageNet views
# ---------------------------------------------------------------------------

IMAGENET_SIZES = ["224", "192", "160", "128", "96"]
LOADER_RECIPES = {  # label -> (module, flags after --data imagenet)
    "SimCLR": ("simclr", []),
    "AAG": ("aag", []),
    "CLSA-Single": ("clsa", []),
    "CLSA-Multi": ("clsa", ["--weak-sizes", *IMAGENET_SIZES, "--strong-sizes", *IMAGENET_SIZES]),
    "ReSSL 1x": ("ressl", []),
    "ReSSL 5 crops": ("ressl", ["--student-crops", *IMAGENET_SIZES]),
    "DSSL (SimSiam, BYOL)": ("dssl", ["--framework", "simsiam"]),
    "DSSL-SimCLR": ("dssl", ["--framework", "simclr"]),
}
IMAGENET_TRAIN, LOADER_WORKERS = 1_281_167, 64


def jpeg_folder(root, n, size=(500, 375)):
    """n JPEGs of ILSVRC-2012's typical size in root/train/c0/: smooth colour fields
    with fine noise (quality 90), so decoding costs what a photo's does."""
    from PIL import Image
    folder = os.path.join(root, "train", "c0")
    os.makedirs(folder, exist_ok=True)
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        coarse = torch.rand(3, 6, 8, generator=g)
        img = torch.nn.functional.interpolate(coarse[None], size=size[::-1], mode="bicubic", align_corners=False)[0]
        img = (img + 0.08 * torch.randn(img.shape, generator=g)).clamp(0, 1)
        pixels = (img.permute(1, 2, 0) * 255).to(torch.uint8).numpy()
        Image.fromarray(pixels).save(os.path.join(folder, f"{i:04d}.JPEG"), quality=90)
    return root


def bench_loader(args):
    torch.set_num_threads(1)  # one loader worker's share
    with tempfile.TemporaryDirectory() as root:
        ds = common.dataset("imagenet", jpeg_folder(root, args.images), True, download=False)
        print(f"loader: each method's ImageNet views, one core, {len(ds)} generated 500x375 JPEGs, "
              f"median of 3 passes; epoch = {IMAGENET_TRAIN:,} images on {LOADER_WORKERS} workers\n")
        print("| recipe | views per image | CPU ms per image | CPU hours per epoch | minutes per epoch, 64 workers |")
        print("|---|---|---|---|---|")
        for label, (module, flags) in LOADER_RECIPES.items():
            method = importlib.import_module(module)
            views_class = next(v for k, v in vars(method).items() if k.endswith("Views") and isinstance(v, type))
            views = common.SeededViews(ds, views_class(method.get_args(["--data", "imagenet", *flags])))
            count = len(views[(0, 0)][0])
            passes = []
            for p in range(3):
                t0 = time.process_time()
                for i in range(len(ds)):
                    views[(i, p * len(ds) + i)]
                passes.append((time.process_time() - t0) / len(ds))
            ms = sorted(passes)[1] * 1e3
            hours = ms * IMAGENET_TRAIN / 3.6e6
            print(f"| {label} | {count} | {ms:.1f} | {hours:.1f} | {hours * 60 / LOADER_WORKERS:.1f} |", flush=True)


# ---------------------------------------------------------------------------
# Instrumenting a method's own training loop
# ---------------------------------------------------------------------------

class Record:
    """What one run measured. `timing`: time a window after `warmup` batches
    (with a device sync at its start); `caught`: the list warnings are recorded
    into, to attribute each to the loop step it happened in."""

    def __init__(self, warmup, timing=True, caught=None, steps=0):
        self.warmup, self.timing, self.caught, self.steps = warmup, timing, caught, steps
        self.batches = self.measured = 0
        self.wait = self.wall = 0.0
        self.window_start = None
        self.first_batch = None
        self.passes = 0            # pass-weighted pixels through the backbones (count_passes)
        self.step0 = None          # the loop's step counter when the current call began
        self.owner = []            # per caught warning: the loop step it belongs to, None outside the loop
        self.ctx = self.args = None

    def attribute(self, step):
        """Warnings caught since the last call belong to `step` (None: outside the loop)."""
        if self.caught is not None:
            self.owner += [step] * (len(self.caught) - len(self.owner))


class TimedLoader:
    """The training loader, with the host time spent in each next() recorded."""

    def __init__(self, loader, record):
        self.loader, self.record = loader, record

    def __len__(self):
        return len(self.loader)

    def __getattr__(self, name):  # e.g. loader.sampler.steps (DSSL's momentum schedule)
        return getattr(self.loader, name)

    def __iter__(self):
        r, k = self.record, 0
        batches = iter(self.loader)
        try:
            while True:
                r.attribute(r.step0 + k if k else None)  # the body of the previous step ends here
                if r.timing and r.batches >= r.warmup and r.window_start is None:
                    if r.ctx.device.type == "cuda":
                        torch.cuda.synchronize()  # the window starts with the device idle
                    r.window_start = time.perf_counter()
                t0 = time.perf_counter()
                try:
                    batch = next(batches)
                except StopIteration:
                    return
                if r.window_start is not None:
                    r.wait += time.perf_counter() - t0
                    r.measured += 1
                if r.first_batch is None:
                    r.first_batch = batch
                r.batches += 1
                k += 1
                r.attribute(r.step0 + k)  # a sync inside next() counts as the step it feeds
                yield batch
        finally:
            r.attribute(r.step0 + k if k else None)


class Repeat:
    """A loader that yields one batch n times (the compute alone); anything else
    the loop reads of its loader (its sampler, ...) is the real loader's."""

    def __init__(self, batch, n, loader):
        self.batch, self.n, self.loader = batch, n, loader

    def __len__(self):
        return self.n

    def __getattr__(self, name):
        return getattr(self.loader, name)

    def __iter__(self):
        return iter([self.batch] * self.n)


def on_device(x, device):
    if isinstance(x, (list, tuple)):
        return type(x)(on_device(v, device) for v in x)
    return x.to(device) if torch.is_tensor(x) else x


def first_batch(loader):
    """The loader's first batch, made in this process: the same views its workers would make."""
    keys = list(itertools.islice(iter(loader.sampler), loader.batch_size))
    return loader.collate_fn([loader.dataset[k] for k in keys])


def close_window(r):
    """End r's timed window once the device has done the work queued in it."""
    if r.window_start is not None:
        if r.ctx.device.type == "cuda":
            torch.cuda.synchronize()
        r.wall += time.perf_counter() - r.window_start
        r.window_start = None


@contextlib.contextmanager
def set_aside(run, stop_at):
    """A pass of the loop that the Run does not keep: inside, run.stop_at is
    `stop_at`; afterwards the Run's step, stop point, stop state and epoch sums
    (loss and z-std, steps, optimizer steps) and non-finite count are back as
    they were, and its clock (the epoch's images/s, the progress line's rate
    and ETA) leaves the pass's time out. What the pass trained (weights,
    optimizer and scaler state) stays trained."""
    saved = dict(step=run.step, stop_at=run.stop_at, stopped=run.stopped, sums=run.sums.clone(), n=run.n,
                 optimizer_steps=run.optimizer_steps, nonfinite=run.nonfinite)
    t0 = time.perf_counter()
    run.stop_at = stop_at
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(run, name, value)
        run.t0 += time.perf_counter() - t0


def count_passes(model, record):
    """Forward pre-hooks on every backbone of `model` (the trained encoder and its
    momentum or EMA copies) that add each pass's pixels to record.passes, weighed
    by what the pass costs: 3 when it is back-propagated (forward 1, backward 2),
    1 when it is only forwarded (keys, targets, teachers). Returns the hooks."""
    kind = type(common.unwrap(model).backbone)

    def hook(module, inputs):
        x = inputs[0]
        trained = torch.is_grad_enabled() and any(p.requires_grad for p in module.parameters())
        record.passes += x.shape[0] * x.shape[-2] * x.shape[-1] * (3 if trained else 1)

    return [m.register_forward_pre_hook(hook) for m in model.modules() if type(m) is kind]


def instrument(original, record, compute=None):
    """train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx)
    with its loader timed. Before the first real step, `compute` (a Record)
    times the same function on the first batch, already on the device,
    repeated n times (run.stop_at at run.step + n): before the loader's workers
    start, so that they do not compete with it for the cores; count_passes
    weighs the backbone passes of that pass (compute.passes). The Run is then
    put back (set_aside): the real steps are numbered, logged and counted as
    if that pass had not happened."""

    def train_one_epoch(model, loader, optimizer, scaler, lr_at, run, args, ctx):
        if compute is not None and compute.ctx is None:
            compute.ctx, compute.args, compute.step0 = ctx, args, run.step
            n = compute.warmup + compute.steps
            compute.first_batch = on_device(first_batch(loader), ctx.device)
            hooks = count_passes(model, compute)
            with set_aside(run, stop_at=run.step + n):
                original(model, TimedLoader(Repeat(compute.first_batch, n, loader), compute), optimizer, scaler,
                         lr_at, run, args, ctx)
                close_window(compute)
            for h in hooks:
                h.remove()
            compute.passes /= n * len(compute.first_batch[1])  # per image: the batch's labels count its images
        record.ctx, record.args, record.step0 = ctx, args, run.step
        out = original(model, TimedLoader(loader, record), optimizer, scaler, lr_at, run, args, ctx)
        close_window(record)
        record.attribute(None)
        return out

    return train_one_epoch


@contextlib.contextmanager
def patched(module, name, value):
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


def reset_peak_rss():
    """Linux: restart the peak-RSS counter of this process (VmHWM)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss():
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    except (OSError, StopIteration):
        import resource
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def run_method(key, flags, out, record, compute=None):
    """Run method `key`'s main() with `flags`, its train_one_epoch instrumented.
    Returns (stdout text, peak bytes)."""
    _, module_name, extra = METHODS[key]
    module = importlib.import_module(module_name)
    argv = [*flags, *extra, "--out", out, "--knn-every", "0"]
    text = io.StringIO()
    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    reset_peak_rss()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}  # main() installs its own
    try:
        with patched(module, "train_one_epoch", instrument(module.train_one_epoch, record, compute)), \
                contextlib.redirect_stdout(text):
            module.main(argv)
    finally:
        for s, handler in handlers.items():
            signal.signal(s, handler)
    gc.collect()  # the loader's persistent workers end with it, before the next run
    return text.getvalue(), torch.cuda.max_memory_allocated() if cuda else peak_rss()


# ---------------------------------------------------------------------------
# methods: one table row per method
# ---------------------------------------------------------------------------

HEADER = ("| method | views x pixels per image | images/s end to end | images/s compute alone | data wait | "
          "s per CIFAR-10 epoch | peak memory | cost vs SimCLR | expected (passes) | expected (pixels) |")


def pixels_per_image(batch):
    views = batch[0]
    return [int(v.shape[-1]) * int(v.shape[-2]) for v in views]


def passed_on(opts):
    """The options of `methods` that are the training scripts' own flags, as flags."""
    flags = [f for name in ("arch", "batch_size", "workers", "amp") if getattr(opts, name) is not None
             for f in (f"--{name.replace('_', '-')}", str(getattr(opts, name)))]
    return flags + (["--channels-last"] if opts.channels_last else [])


def measure(key, opts):
    """Train method `key` for opts.warmup + opts.steps steps; returns a dict of figures."""
    flags = ["--data", opts.data, "--data-dir", opts.data_dir, "--no-download", "--resume", "none",
             "--max-steps", str(opts.warmup + opts.steps), "--log-every", str(10 ** 9), *passed_on(opts)]
    record, compute = Record(opts.warmup), Record(opts.warmup, steps=opts.steps)
    with tempfile.TemporaryDirectory() as out:
        _, peak = run_method(key, flags, out, record, compute)
    args = record.args
    if record.measured == 0:
        common.fail(f"{key}: no step after the {opts.warmup} warm-up steps was timed; raise --steps", common.USAGE)
    pixels = pixels_per_image(record.first_batch)
    ips = record.measured * args.batch_size / record.wall
    compute_ips = compute.measured * args.batch_size / compute.wall
    return dict(key=key, name=METHODS[key][0], batch_size=args.batch_size, arch=args.arch, image_size=args.image_size,
                views=len(pixels), pixels=sum(pixels), passes=compute.passes, images_per_s=ips,
                compute_images_per_s=compute_ips,
                wait_share=record.wait / record.wall, epoch_s=CIFAR10_TRAIN / ips, peak_bytes=peak,
                amp=str(record.ctx.amp_dtype).replace("torch.", "") if record.ctx.amp_dtype else "off",
                device=str(record.ctx.device), workers=args.workers)


def row(r, simclr_row):
    base_pixels = 2 * r["image_size"] ** 2  # SimCLR: two views at the full size, both back-propagated (3 per pixel)
    cost = f"{simclr_row['compute_images_per_s'] / r['compute_images_per_s']:.2f}" if simclr_row else "-"
    memory = f"{r['peak_bytes'] / 2**30:.2f} GiB" + ("" if r["device"].startswith("cuda") else " RSS")
    return (f"| {r['name']} (B={r['batch_size']}) | {r['views']} x {r['pixels'] // r['views']} | {r['images_per_s']:.0f} | "
            f"{r['compute_images_per_s']:.0f} | {r['wait_share']:.2f} | {r['epoch_s']:.1f} | {memory} | {cost} | "
            f"{r['passes'] / (3 * base_pixels):.2f} | {r['pixels'] / base_pixels:.2f} |")


def parse_row(line):
    """A table row of `methods` as a dict of numbers (the inverse of row(); used by the tests)."""
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    name, views, ips, compute, wait, epoch_s, memory, cost, passes, pixels = cells
    n_views, per_view = (int(v) for v in views.split(" x "))
    return dict(name=name, views=n_views, pixels_per_view=per_view, images_per_s=float(ips),
                compute_images_per_s=float(compute), wait_share=float(wait), epoch_s=float(epoch_s),
                peak_gib=float(memory.split()[0]), cost=None if cost == "-" else float(cost),
                expected_passes=float(passes), expected_pixels=float(pixels))


def measure_apart(key, opts):
    """measure() in a fresh process: peak memory per method, no loader or allocator left over from the last one."""
    argv = [sys.executable, os.path.abspath(__file__), "methods", "--json", "--methods", key, "--data", opts.data,
            "--data-dir", opts.data_dir, "--steps", str(opts.steps), "--warmup", str(opts.warmup), *passed_on(opts)]
    proc = subprocess.run(argv, capture_output=True, text=True)
    if proc.returncode != 0:
        common.fail(f"{key}: the benchmark run exited {proc.returncode}: {proc.stderr.strip()[-500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def bench_methods(opts):
    keys = opts.methods or list(METHODS)
    if opts.json:  # one method, for measure_apart
        print(json.dumps(measure(keys[0], opts)))
        return None
    results, simclr_row = [], None
    for i, key in enumerate(keys):
        r = measure_apart(key, opts)
        if key == "simclr":
            simclr_row = r
        if i == 0:
            print(f"{opts.steps} steps after {opts.warmup} warm-up on {r['device']}"
                  + (f" ({torch.cuda.get_device_name()}, {os.cpu_count()} CPU cores)" if r["device"].startswith("cuda") else
                     f" ({os.cpu_count()} cores, {torch.get_num_threads()} threads)")
                  + f", {r['arch']}, {opts.data}, amp {r['amp']}{', channels-last' if opts.channels_last else ''}, "
                    f"{r['workers']} loader workers", flush=True)
            print(HEADER)
            print("|" + "---|" * (HEADER.count("|") - 1), flush=True)
        results.append(r)
        print(row(r, simclr_row), flush=True)
    return results


def compare_layouts(opts):
    """SimCLR's compute-alone rate in NCHW and in channels-last (each in a process of its own),
    the rest as `opts`: the figures that decide the scripts' default memory layout."""
    rates = [measure_apart("simclr", argparse.Namespace(**{**vars(opts), "channels_last": cl})) for cl in (False, True)]
    nchw, nhwc = (r["compute_images_per_s"] for r in rates)
    r = rates[0]
    print(f"layout: SimCLR compute alone on {r['device']} ({r['arch']}, B={r['batch_size']}, amp {r['amp']}): "
          f"NCHW {nchw:.0f} images/s, channels-last {nhwc:.0f} images/s ({nhwc / nchw:.2f}x)", flush=True)
    return nchw, nhwc


# ---------------------------------------------------------------------------
# gpu-check
# ---------------------------------------------------------------------------

def unexpected_syncs(syncs, stop_at, log_every, fp16):
    """The syncs inside the loop that the loop does not claim: any outside a
    log step, except fp16's GradScaler.step (it reads its inf check on the host).
    syncs: (the loop step of a warning (None: outside the loop), the file that raised it)."""
    bad = []
    for step, where in syncs:
        if step is None or step % log_every == 0 or step == stop_at:
            continue
        if fp16 and "grad_scaler" in os.path.basename(where):
            continue
        bad.append((step, where))
    return bad


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


class Checks:
    def __init__(self):
        self.failed = 0

    def __call__(self, ok, text):
        self.failed += not ok
        print(f"{'PASS' if ok else 'FAIL'}  {text}", flush=True)
        return ok


def amp_run(key, amp_flags, label, opts, check):
    """A short run under `amp_flags`, then a resume of its checkpoint for 2 more steps."""
    cuda = torch.cuda.is_available()
    steps, log_every = opts.check_steps, opts.check_log_every
    flags = ["--data", opts.data, "--data-dir", opts.data_dir, "--no-download", "--batch-size", str(opts.check_batch),
             "--workers", str(opts.workers if opts.workers is not None else min(8, os.cpu_count() or 1)),
             "--log-every", str(log_every), *amp_flags] + (["--arch", opts.arch] if opts.arch else [])
    fp16 = "fp16" in amp_flags
    name = f"{METHODS[key][0]} {label}"
    with tempfile.TemporaryDirectory() as out:
        record = Record(0, timing=False)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                record.caught = caught
                if cuda:
                    torch.cuda.set_sync_debug_mode("warn")
                try:
                    run_method(key, [*flags, "--max-steps", str(steps), "--resume", "none"], out, record)
                finally:
                    if cuda:
                        torch.cuda.set_sync_debug_mode("default")
            log = read_log(out)
        except (Exception, SystemExit) as e:
            return check(False, f"{name}: the run failed: {type(e).__name__}: {str(e)[-300:]}")
        losses = [r["loss"] for r in log]
        check(all(math.isfinite(v) for v in losses), f"{name}: losses finite ({', '.join(f'{v:.3f}' for v in losses)})")
        skipped = sum(r.get("skipped_steps", 0) for r in log)
        if fp16:
            check(skipped < steps, f"{name}: the loss scaler skipped {skipped} of {steps} steps")
        if cuda:
            syncs = [(s, w.filename) for s, w in zip(record.owner, record.caught) if SYNC_MESSAGE in str(w.message)]
            bad = unexpected_syncs(syncs, steps, log_every, fp16)
            where = sorted({f"{os.path.basename(f)} (step {s})" for s, f in bad})[:5]
            check(not bad, f"{name}: {len(syncs)} host syncs in {steps} steps, none outside the log steps "
                           f"(every {log_every}){' but ' + ', '.join(where) if bad else ''}")
        scale = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)["scaler"].get("scale")
        try:
            text, _ = run_method(key, [*flags, "--max-steps", str(steps + 2)], out, Record(0, timing=False))
            ckpt = torch.load(os.path.join(out, "last.pt"), map_location="cpu", weights_only=True)
            log2 = read_log(out)[len(log):]
        except (Exception, SystemExit) as e:
            return check(False, f"{name}: resuming the checkpoint failed: {type(e).__name__}: {str(e)[-300:]}")
        # fp16: the scale only halts or halves in 2 steps; a scaler started afresh would be back at 2**16
        scale_ok = not fp16 or (scale is not None and ckpt["scaler"].get("scale", math.inf) <= scale)
        check(f"from step {steps}" in text and ckpt["step"] == steps + 2 and scale_ok
              and all(math.isfinite(r["loss"]) for r in log2),
              f"{name}: resumed from its checkpoint at step {steps} and trained to step {ckpt['step']}"
              + (f" (loss scale {scale} restored)" if fp16 else ""))


def distributed_run(key, opts, check):
    """SyncBN and nccl: 2 processes on 2 GPUs for a few steps."""
    _, module_name, extra = METHODS[key]
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               os.path.join(ROOT, f"{module_name}.py"), *extra, "--data", opts.data, "--data-dir", opts.data_dir,
               "--no-download", "--batch-size", str(opts.check_batch), "--max-steps", "4", "--log-every", "2",
               "--knn-every", "0", "--out", out]
        proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        ok = proc.returncode == 0 and os.path.isfile(os.path.join(out, "log.jsonl")) \
            and all(math.isfinite(r["loss"]) for r in read_log(out))
        check(ok, f"{METHODS[key][0]}: 2 processes, nccl + SyncBN, 4 steps"
                  + ("" if ok else f" (exit {proc.returncode}: {proc.stderr.strip()[-300:]})"))


def gpu_check(opts):
    cuda = torch.cuda.is_available()
    check = Checks()
    keys = opts.methods or list(METHODS)
    if not cuda:
        print("no CUDA device: running the CPU subset (bf16 autocast, channels-last, resume); fp16, the sync check, "
              "SyncBN/nccl and the GPU table need a GPU", flush=True)
    else:
        print(f"gpu-check on {torch.cuda.get_device_name()} ({torch.cuda.device_count()} GPU(s)), {opts.data}", flush=True)
    for key in keys:
        if cuda:
            amp_run(key, ["--amp", "fp16"], "fp16", opts, check)
        amp_run(key, ["--amp", "bf16", "--channels-last"], "bf16 + channels-last", opts, check)
    if cuda and torch.cuda.device_count() >= 2:
        for key in keys:
            distributed_run(key, opts, check)
    elif cuda:
        print("SKIP  SyncBN and nccl need 2 GPUs (torchrun --nproc_per_node=2)", flush=True)
    if cuda and not opts.no_table:
        table = argparse.Namespace(**{**vars(opts), "batch_size": None, "amp": "auto", "channels_last": True})
        try:
            compare_layouts(table)
            bench_methods(table)
        except (Exception, SystemExit) as e:
            check(False, f"the methods table failed: {type(e).__name__}: {str(e)[-300:]}")
    print(f"gpu-check: {check.failed} FAIL" if check.failed else "gpu-check: all PASS", flush=True)
    return 1 if check.failed else 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("what", choices=("data", "loader", "methods", "gpu-check"))
    parser.add_argument("--data", default=None, choices=("cifar10", "synthetic"),
                        help="default cifar10 when ./data (or --data-dir) has it, else synthetic (2,048 images)")
    parser.add_argument("--data-dir", default="./data")
    parser.add_argument("--images", type=int, default=None, help="data: images to transform (2000); loader: JPEGs (32)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=None, help="default: all")
    parser.add_argument("--arch", default=None, choices=common.ARCHS, help="default: each method's CIFAR recipe")
    parser.add_argument("--batch-size", type=int, default=None, help="default: each method's CIFAR recipe")
    parser.add_argument("--workers", type=int, default=None, help="loader workers (default: the scripts' min(8, cores))")
    parser.add_argument("--amp", default=None, choices=("auto", "bf16", "fp16", "off"))
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--steps", type=int, default=10, help="timed optimizer steps per method")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (worker start-up, kernel search)")
    parser.add_argument("--check-batch", type=int, default=None, help="gpu-check: batch of the AMP runs (128; CPU 32)")
    parser.add_argument("--check-steps", type=int, default=None, help="gpu-check: steps of the AMP runs (12; CPU 4)")
    parser.add_argument("--check-log-every", type=int, default=None, help="gpu-check: log step of the AMP runs (5; CPU 2)")
    parser.add_argument("--no-table", action="store_true", help="gpu-check: skip the methods table")
    parser.add_argument("--json", action="store_true", help=argparse.SUPPRESS)  # one method's figures, as JSON
    opts = parser.parse_args(argv)
    if opts.data is None:
        has_cifar = os.path.isfile(os.path.join(opts.data_dir, "cifar-10-batches-py", "test_batch"))
        opts.data = "cifar10" if has_cifar else "synthetic"
    cuda = torch.cuda.is_available()
    for name, gpu, cpu in (("check_batch", 128, 32), ("check_steps", 12, 4), ("check_log_every", 5, 2)):
        if getattr(opts, name) is None:
            setattr(opts, name, gpu if cuda else cpu)
    if opts.what == "gpu-check" and not cuda and opts.arch is None:
        opts.arch = "resnet_small"  # the CPU subset: small and quick
    if opts.what == "data":
        opts.images = opts.images or 2000
        bench_data(opts)
    elif opts.what == "loader":
        opts.images = opts.images or 32
        bench_loader(opts)
    elif opts.what == "methods":
        bench_methods(opts)
    else:
        sys.exit(gpu_check(opts))


if __name__ == "__main__":
    main()
