"""
Benchmarks for drift.py, with numbers anyone can reproduce on their own machine:
1) fields: the exact field (Algorithm 2), the one-sided mean-shift field and the projected (Nystrom) field,
   timed against their floor, the matrix products they cannot avoid, measured in the same run, interleaved;
   with GFLOP/s and the exact field's error against a float64 transcription of Algorithm 2.
2) memory: peak memory of the exact field as N grows, and the largest N that fits in a memory budget.
3) fidelity: projected against exact attraction on the same positives, on real features, as the number of
   landmarks per class grows (random and k-means landmarks): time per step, cosine, relative L2, target MSE.
4) step: one training step of train.py split into generator, encoder, field and optimizer, for both fields,
   MNIST and Fashion-MNIST with their defaults, the generator in fp32 and under bf16 autocast.

    python bench.py --quick                                   # seconds: a smoke test on small shapes
    python bench.py --data-dir /path/to/data --json bench.json  # the tables in BENCHMARKS.md

Times are medians over --repeats runs, the candidates run interleaved so that a noisy machine slows them
alike; ratios are taken between numbers measured side by side. CUDA is used with --device cuda.
Every flag is a name in the defaults block below (underscores become dashes).
"""

import argparse
import copy
import json
import math
import multiprocessing
import os
import platform
import re
import statistics
import tempfile
import time

import numpy as np
import torch

import drift
import sample

# -----------------------------------------------------------------------------------------------------------
# defaults (the DriftXpress CIFAR-10 setting: batch 1000, 500 landmarks and 5,000 samples per class)
_before = set(globals())
sections = "fields,memory,fidelity,step"  # comma list of fields,memory,fidelity,step
device = "cpu"  # cpu | cuda
threads = 0  # torch threads; 0 = torch's default
repeats = 7  # timed runs per candidate; the median is reported
shapes = "1000x1000x768,256x256x768,4096x4096x768"  # N x Np x D for the field micro-benchmark
temperatures = "0.02,0.05,0.2"  # as in the loss: effective temperature T * sqrt(D) on normalised features
queries = "data"  # data: queries drawn like the positives | far: a collapsed batch far from them
landmarks = 500  # M, landmarks of the projected field in the micro-benchmark
memory_sizes = "2048,4096,8192,16384"  # N = Np for the memory table (D = 768)
memory_budget_gib = 1.0  # "the largest N that fits in this many GiB beyond the inputs and outputs"
data_dir = "data"  # torchvision layout: MNIST/raw, FashionMNIST/raw, cifar10-partial/cifar10_partial.npz
datasets = "mnist,fashion-mnist,cifar10-partial"  # or "synthetic": clustered Gaussians, no files needed
encoder = "resnet18-random"  # resnet18-random (fixed random init, up to layer3, global mean) | pixels
positives_per_class = 5000  # Np real positives per class (fidelity)
queries_per_class = 100  # held-out queries per class: a batch of 1000 over 10 classes
landmark_counts = "50,100,200,500"  # M per class (fidelity)
strategies = "random,kmeans"  # landmark strategies (fidelity)
fidelity_temperatures = "0.02,0.05,0.2"  # temperatures of the fidelity table
feature_cache = ""  # folder to keep encoded features between runs ("" = none)
step_steps = 5  # train.py steps timed per field and dtype
step_datasets = "mnist,fashion-mnist"  # datasets of the step benchmark, each with train.py's defaults for it
step_dtypes = "fp32,bf16"  # the generator in fp32, and under bf16 autocast (train.py's --dtype), steps interleaved
step_images = 15000  # training images kept for the step benchmark (a step's cost does not depend on it; >= 1,024 a class)
_defaults = {k: v for k, v in globals().items() if k not in _before and not k.startswith("_")}
CHOICES = {"queries": ("data", "far"), "encoder": ("resnet18-random", "pixels")}
SECTIONS = ("fields", "memory", "fidelity", "step")


# -----------------------------------------------------------------------------------------------------------
# timing and tables

def sync(dev):
    if dev.type == "cuda":
        torch.cuda.synchronize()


def measure(candidates, repeats, dev):
    """Run each candidate once (warm-up), then `repeats` rounds in which every candidate runs once, in turn.
    Returns {name: (median wall ms, median process-CPU ms)}. Process CPU time is what this process spent
    on the CPU: under load from other programs it is steadier than wall time."""
    for fn in candidates.values():
        fn()
    wall, cpu = {k: [] for k in candidates}, {k: [] for k in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            sync(dev)
            w, c = time.perf_counter(), time.process_time()
            fn()
            sync(dev)
            wall[name].append(1e3 * (time.perf_counter() - w))
            cpu[name].append(1e3 * (time.process_time() - c))
    return {k: (statistics.median(wall[k]), statistics.median(cpu[k])) for k in candidates}


def machine():
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), cpu)
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads(),
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d %H:%M"),
            "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}


def table(rows, columns):
    """A fixed-width text table of dict rows; columns: [(key, format)], a missing value prints as '-'."""
    cells = [[key for key, _ in columns]]
    cells += [[fmt.format(r[key]) if r.get(key) is not None else "-" for key, fmt in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells)


def relative_error(v, ref):
    """max |v - ref| / max |ref|, in float64."""
    return ((v.double() - ref.double()).abs().max() / ref.double().abs().max()).item()


def clustered(n, dim, gen, clusters=20):
    """Points around `clusters` centres: distances spread like features of real classes do."""
    centres = torch.randn(clusters, dim, generator=gen) * 1.5
    return centres[torch.randint(0, clusters, (n,), generator=gen)] + torch.randn(n, dim, generator=gen)


# -----------------------------------------------------------------------------------------------------------
# 1) fields against their floor

def algorithm2_reference(x, y_pos, temperature, dtype):
    """Algorithm 2 of [Deng et al.] written plainly in `dtype`, negatives = the queries, self masked (the
    general form, with other negatives and CFG weights, is the reference of tests/test_fields.py)."""
    x, y_pos = x.to(dtype), y_pos.to(dtype)
    logits = -torch.cdist(x, torch.cat([y_pos, x])) / temperature
    logits[:, len(y_pos):].fill_diagonal_(-math.inf)
    a = (logits.softmax(-1) * logits.softmax(-2)).sqrt()
    a_pos, a_neg = a[:, :len(y_pos)], a[:, len(y_pos):]
    return (a_pos * a_neg.sum(-1, keepdim=True)) @ y_pos - (a_neg * a_pos.sum(-1, keepdim=True)) @ x


FIELD_FLOORS = {"exact": "exact floor", "one-sided": "exact floor", "projected": "projected floor",
                "exact attraction": "attraction floor", "projected attraction": "proj. attraction floor"}
FIELD_COLUMNS = [("shape", "{}"), ("T", "{:g}"), ("field", "{}"), ("M", "{}"), ("ms", "{:.1f}"), ("gflops", "{:.0f}"),
                 ("floor_ms", "{:.1f}"), ("x_floor", "{:.2f}"), ("x_floor_cpu", "{:.2f}"), ("vs_exact", "{:.2f}"),
                 ("peak_mib", "{:.0f}"), ("err_vs_float64", "{:.1e}"), ("naive_float32_err", "{:.1e}")]


def cuda_peak_mib(fn):
    """Peak CUDA memory of one call beyond what was allocated before it (CPU peaks: see the memory section)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / 2**20


def bench_fields(args, dev):
    gen, rows = torch.Generator().manual_seed(0), []
    for shape in args.shapes.split(","):
        n, n_pos, dim = (int(s) for s in shape.split("x"))
        x, y_pos = clustered(n, dim, gen), clustered(n_pos, dim, gen)
        if args.queries == "far":  # early training: a collapsed batch far from the data
            x = 0.3 * torch.randn(n, dim, generator=gen) + 8 * torch.randn(1, dim, generator=gen)
        scale = drift.feature_scale(x, torch.cat([x, y_pos]))
        x, y_pos = (x / scale).to(dev), (y_pos / scale).to(dev)  # normalised as drift_loss does
        m = min(args.landmarks, n_pos)
        u = y_pos[torch.randperm(n_pos, generator=gen)[:m].to(dev)]  # (M, D)
        zero = torch.zeros_like(x[:1])  # a negative at the origin: mean_shift_field(x, y, zero) = b_pos(x)
        y_exact = torch.cat([y_pos, x])  # (Np + N, D): the columns the exact field sees
        # floor operands: a distance product and an aggregation product of the same shapes as each field's
        a_exact, a_pos, a_self, a_land = (torch.rand(n, k, generator=gen).to(dev) for k in (n + n_pos, n_pos, n, m))
        u_summ = torch.randn(m, dim + 1, generator=gen).to(dev)  # folded summaries [S, s]

        def products(y, a, rhs):  # distances (baddbmm, as pairwise_distance) and aggregation
            return torch.baddbmm(y[:, :1].mT.unsqueeze(0), x.unsqueeze(0), y.mT.unsqueeze(0), alpha=-2), a @ rhs

        flops = {"exact": 4 * n * (n + n_pos) * dim, "one-sided": 4 * n * (n + n_pos) * dim,
                 "projected": 2 * n * m * (2 * dim + 1) + 4 * n * n * dim, "exact attraction": 4 * n * n_pos * dim,
                 "projected attraction": 2 * n * m * (2 * dim + 1)}
        for t in (float(s) for s in args.temperatures.split(",")):
            t_eff = t * math.sqrt(dim)
            nys = drift.NystromField(u, t_eff).fit(y_pos)
            candidates = {
                "exact": lambda: drift.drift_field(x, y_pos, None, t_eff),
                "exact floor": lambda: products(y_exact, a_exact, y_exact),
                "one-sided": lambda: drift.mean_shift_field(x, y_pos, None, t_eff),
                "projected": lambda: nys(x),
                "projected floor": lambda: (products(u, a_land, u_summ), products(x, a_self, x)),
                "exact attraction": lambda: drift.mean_shift_field(x, y_pos, zero, t_eff),
                "attraction floor": lambda: products(y_pos, a_pos, y_pos),
                "projected attraction": lambda: nys.attraction(x),
                "proj. attraction floor": lambda: products(u, a_land, u_summ),
            }
            times = measure(candidates, args.repeats, dev)
            for name, floor in FIELD_FLOORS.items():
                (wall, cpu), (floor_wall, floor_cpu) = times[name], times[floor]
                exact = "exact" if name in ("exact", "one-sided", "projected") else "exact attraction"
                rows.append({"shape": shape, "M": m if "projected" in name else None, "T": t, "field": name,
                             "ms": wall, "gflops": flops[name] / wall / 1e6, "floor_ms": floor_wall,
                             "x_floor": wall / floor_wall, "x_floor_cpu": cpu / floor_cpu,
                             "vs_exact": times[exact][0] / wall,
                             "peak_mib": cuda_peak_mib(candidates[name]) if dev.type == "cuda" else None})
            if n * (n + n_pos) <= 4096 * 8192:  # the float64 reference needs a few (N, N+Np) matrices
                v = drift.drift_field(x, y_pos, None, t_eff).cpu()
                ref = algorithm2_reference(x.cpu(), y_pos.cpu(), t_eff, torch.float64)
                naive = algorithm2_reference(x.cpu(), y_pos.cpu(), t_eff, torch.float32)
                rows[-5].update(err_vs_float64=relative_error(v, ref), naive_float32_err=relative_error(naive, ref))
    return rows


# -----------------------------------------------------------------------------------------------------------
# 2) memory

MEMORY_COLUMNS = [("N=Np", "{}"), ("D", "{}"), ("distances_mib", "{:.0f}"), ("mode", "{}"), ("seconds", "{:.2f}"),
                  ("peak_beyond_inputs_mib", "{:.0f}")]


def _status_mib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _peak_memory_child(n, dim, device_name, threads):
    """In a fresh process: peak memory of one exact field at N = Np beyond its inputs and output. CPU: the
    peak resident set (VmHWM) reset just before the call (write 5 to /proc/self/clear_refs), minus the
    resident set before it, minus the output; an upper bound on what torch allocated, since memory freed
    but kept by the C allocator still counts. CUDA: max_memory_allocated minus what was allocated before."""
    dev = torch.device(device_name)
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    x, y_pos = clustered(n, dim, gen).to(dev), clustered(n, dim, gen).to(dev)
    scale = drift.feature_scale(x[:1024], y_pos[:1024])
    x, y_pos = x / scale, y_pos / scale
    output_mib = n * dim * 4 / 2**20
    if dev.type == "cuda":
        start = time.perf_counter()
        peak = cuda_peak_mib(lambda: drift.drift_field(x, y_pos, None, 0.05 * math.sqrt(dim)))
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current resident set
        base = _status_mib("VmRSS")
        start = time.perf_counter()
        drift.drift_field(x, y_pos, None, 0.05 * math.sqrt(dim))
        peak = _status_mib("VmHWM") - base
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_beyond_inputs_mib": peak - output_mib, "output_mib": output_mib}


def bench_memory(args, dev):
    """Returns (rows, summary), or None where the peak cannot be measured."""
    if dev.type == "cpu" and not os.path.exists("/proc/self/clear_refs"):
        print("memory: skipped (needs Linux /proc/self/clear_refs to reset the peak resident set)")
        return None
    rows, ctx = [], multiprocessing.get_context("spawn")
    dim = 768 if not args.quick else 64
    for n in (int(s) for s in args.memory_sizes.split(",")):
        whole = 4 * n * 2 * n <= drift.FIELD_MEMORY  # are the distances kept whole?
        with ctx.Pool(1) as pool:  # a fresh process per size: peaks never mix
            r = pool.apply(_peak_memory_child, (n, dim, dev.type, torch.get_num_threads()))
        rows.append({"N=Np": n, "D": dim, "distances_mib": 4 * n * 2 * n / 2**20,
                     "mode": "whole" if whole else f"chunks of {max(1, drift.FIELD_MEMORY // (8 * n))}", **r})
    # The largest N within the budget. Whole, the distances take 8 N^2 bytes (N x 2N float32) and the rest
    # grows like N (points, centred copies, output): its slope is read off the largest whole-mode run.
    # Chunked, the distances take FIELD_MEMORY at most, so the peak is about FIELD_MEMORY + slope * N.
    budget_mib, field_mib = args.memory_budget_gib * 1024, drift.FIELD_MEMORY / 2**20
    whole_rows = [r for r in rows if r["mode"] == "whole"]
    largest = None
    if whole_rows:
        r = whole_rows[-1]
        slope = max(r["peak_beyond_inputs_mib"] - r["distances_mib"], 1e-6) / r["N=Np"]  # MiB per query
        if budget_mib > field_mib:
            largest = int((budget_mib - field_mib) / slope)
        else:
            largest = int(math.sqrt(budget_mib * 2**20 / 8))
    # a chunked field gives the same result as the whole one
    gen = torch.Generator().manual_seed(1)
    x, y_pos = clustered(300, 32, gen).to(dev), clustered(200, 32, gen).to(dev)
    t = 0.05 * math.sqrt(32) * drift.feature_scale(x, y_pos).item()
    chunk_err = relative_error(drift.drift_field(x, y_pos, None, t, chunk_size=37), drift.drift_field(x, y_pos, None, t))
    fits = [r["N=Np"] for r in rows if r["peak_beyond_inputs_mib"] <= budget_mib]
    return rows, {"budget_gib": args.memory_budget_gib, "largest_N_in_budget_model": largest,
                  "largest_N_measured_in_budget": max(fits) if fits else None, "chunk_vs_whole_err": chunk_err,
                  "field_memory_mib": field_mib}


# -----------------------------------------------------------------------------------------------------------
# 3) fidelity of the projected attraction on real features

FIDELITY_COLUMNS = [("dataset", "{}"), ("D", "{}"), ("Np", "{}"), ("T", "{:g}"), ("strategy", "{}"), ("M", "{}"),
                    ("exact_ms", "{:.1f}"), ("projected_ms", "{:.2f}"), ("speedup", "{:.1f}"), ("speedup_cpu", "{:.1f}"),
                    ("attr_cos", "{:.4f}"), ("attr_rel_l2", "{:.3f}"), ("cos", "{:.4f}"), ("rel_l2", "{:.3f}"),
                    ("target_mse", "{:.2e}"), ("cos_unfolded", "{:.4f}"), ("cos_float64", "{:.4f}"),
                    ("float32_vs_float64", "{:.1e}")]
MNIST_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def link_raw(root, name, tmp):
    """Link root/FOLDER/raw into tmp and return tmp: torchvision extracts the .gz files next to them, so it
    works on the links and never writes into the data folder."""
    folder = MNIST_FOLDERS[name]
    raw = os.path.join(root, folder, "raw")
    if not os.path.isdir(raw):
        raise SystemExit(f"error: {raw} not found: pass --data-dir with the data, or --datasets synthetic")
    os.makedirs(os.path.join(tmp, folder, "raw"), exist_ok=True)
    for f in os.listdir(raw):
        os.symlink(os.path.abspath(os.path.join(raw, f)), os.path.join(tmp, folder, "raw", f))
    return tmp


def load_images(name, root, train):
    """uint8 images [n, C, H, W] and labels [n] from the torchvision layout under root (no download)."""
    if name == "cifar10-partial":
        path = os.path.join(root, "cifar10-partial", "cifar10_partial.npz")
        if not os.path.exists(path):
            raise SystemExit(f"error: {path} not found: pass --data-dir with the data, or --datasets synthetic")
        d = np.load(path)
        x, y = (d["x_train"], d["y_train"]) if train else (d["x_test"], d["y_test"])
        return torch.from_numpy(x).permute(0, 3, 1, 2), torch.from_numpy(y).long()
    import torchvision
    cls = torchvision.datasets.MNIST if name == "mnist" else torchvision.datasets.FashionMNIST
    with tempfile.TemporaryDirectory() as tmp:
        ds = cls(link_raw(root, name, tmp), train=train, download=True)
        return ds.data.unsqueeze(1).clone(), ds.targets.clone()


@torch.no_grad()
def encode(images, kind, batch=500):
    """Features [n, C]: a fixed random-init torchvision resnet18 up to layer3, global mean (256-d), or pixels."""
    x = images.float() / 127.5 - 1  # (n, C, H, W) in [-1, 1]
    if kind == "pixels":
        return x.flatten(1)
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet18(weights=None).eval()
    trunk = torch.nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool, net.layer1, net.layer2, net.layer3)
    return torch.cat([trunk(b.expand(-1, 3, -1, -1)).mean((2, 3)) for b in x.split(batch)])


def class_features(args, name):
    """Per-class positives [K, Np, C] and held-out queries [K, Nq, C], cached in --feature-cache if given."""
    if name == "synthetic":
        gen, dim, k = torch.Generator().manual_seed(2), 64, 10
        centres = torch.randn(k, 8, dim, generator=gen) * 1.5  # each class: 8 clusters

        def draw(n):  # (K, n, dim)
            picked = torch.stack([c[torch.randint(0, 8, (n,), generator=gen)] for c in centres])
            return picked + torch.randn(k, n, dim, generator=gen)

        return draw(args.positives_per_class), draw(args.queries_per_class)
    path = args.feature_cache and os.path.join(
        args.feature_cache, f"{name}-{args.encoder}-{args.positives_per_class}-{args.queries_per_class}.pt")
    if path and os.path.exists(path):
        return torch.load(path, weights_only=True)
    out = []
    for train in (True, False):
        images, labels = load_images(name, args.data_dir, train)
        count = args.positives_per_class if train else args.queries_per_class
        count = min([count] + [int((labels == c).sum()) for c in range(10)])  # the partial CIFAR-10 has ~500
        index = torch.stack([(labels == c).nonzero().squeeze(1)[:count] for c in range(10)])  # (K, count)
        out.append(encode(images[index.flatten()], args.encoder).view(10, count, -1))
    if path:
        os.makedirs(args.feature_cache, exist_ok=True)
        torch.save(out, path + ".tmp")
        os.replace(path + ".tmp", path)
    return out


def fidelity_row(x, y_pos, u, t_eff, repeats, dev):
    """Projected against exact attraction of the queries x [K, Nq, C] to the positives y_pos [K, Np, C] with
    landmarks u [K, M, C] at temperature t_eff: times, and the field_fidelity of attraction and field."""
    zero = torch.zeros_like(x[:, :1])  # a negative at the origin: mean_shift_field(x, y, zero) = b_pos(x)
    b_exact = drift.mean_shift_field(x, y_pos, zero, t_eff)  # exact attraction over all positives
    b_neg = b_exact - drift.mean_shift_field(x, y_pos, None, t_eff)  # exact repulsion of the batch
    start = time.perf_counter()
    field = drift.NystromField(u, t_eff).fit(y_pos)
    row = {"fit_s": time.perf_counter() - start}
    times = measure({"exact": lambda: drift.mean_shift_field(x, y_pos, zero, t_eff),
                     "projected": lambda: field.attraction(x)}, repeats, dev)
    row.update(exact_ms=times["exact"][0], projected_ms=times["projected"][0],
               speedup=times["exact"][0] / times["projected"][0], speedup_cpu=times["exact"][1] / times["projected"][1])
    b_proj = field.attraction(x)
    attraction = drift.field_fidelity(b_proj - x, b_exact - x)
    row.update(attr_cos=attraction["cos"], attr_rel_l2=attraction["rel_l2"])
    row.update(drift.field_fidelity(b_proj - b_neg, b_exact - b_neg))  # cos, rel_l2, target_mse
    unfolded = drift.NystromField(u, t_eff, folded=False).fit(y_pos)
    row["cos_unfolded"] = drift.field_fidelity(unfolded.attraction(x) - b_neg, b_exact - b_neg)["cos"]
    b_64 = field.attraction(x.double()).float()  # the same projection without float32 rounding
    row["cos_float64"] = drift.field_fidelity(b_64 - b_neg, b_exact - b_neg)["cos"]
    row["float32_vs_float64"] = drift.field_fidelity(b_proj - b_neg, b_64 - b_neg)["rel_l2"]
    return row


def bench_fidelity(args, dev):
    """Per class: Np real positives, Nq held-out real queries. attr_*: the attraction b_pos(x) - x, projected
    against exact; cos, rel_l2, target_mse: the one-sided field b_pos - b_neg with the same exact repulsion
    from the queries' batch (a harder test: near the data b_pos and b_neg almost cancel)."""
    rows = []
    for name in args.datasets.split(","):
        start = time.perf_counter()
        y_pos, x = class_features(args, name)  # (K, Np, C), (K, Nq, C)
        k, n_pos, dim = y_pos.shape
        flat = y_pos.reshape(-1, dim)
        scale = drift.feature_scale(flat[::7][:4000], flat[::5][:4000])
        y_pos, x = (y_pos / scale).to(dev), (x / scale).to(dev)  # normalised units, as drift_loss uses
        labels = torch.arange(k).repeat_interleave(n_pos)
        print(f"fidelity: {name}: {k} classes x {n_pos} positives, {x.shape[1]} queries each, D={dim} "
              f"({args.encoder if name != 'synthetic' else 'synthetic'}; {time.perf_counter() - start:.0f} s to load)")
        for strategy in args.strategies.split(","):
            for m in (int(s) for s in args.landmark_counts.split(",") if int(s) <= n_pos):
                gen = torch.Generator().manual_seed(0)
                u = drift.select_landmarks(flat.to(dev) / scale, m, strategy, labels, gen)  # (K, M, C)
                for t in (float(s) for s in args.fidelity_temperatures.split(",")):
                    row = {"dataset": name, "D": dim, "Np": n_pos, "T": t, "strategy": strategy, "M": m,
                           **fidelity_row(x, y_pos, u, t * math.sqrt(dim), args.repeats, dev)}
                    rows.append(row)
                    print(f"  {strategy} M={m} T={t:g}: {row['speedup']:.1f}x faster, attraction cos "
                          f"{row['attr_cos']:.4f}, field cos {row['cos']:.4f}", flush=True)
    return rows


# -----------------------------------------------------------------------------------------------------------
# 4) a training step of train.py, piece by piece

STEP_COLUMNS = [("field", "{}"), ("dataset", "{}"), ("encoder", "{}"), ("model", "{}"), ("batch", "{}"), ("dtype", "{}"),
                ("generator_ms", "{:.1f}"), ("encoder_ms", "{:.1f}"), ("field_ms", "{:.1f}"), ("backward_ms", "{:.1f}"),
                ("optimizer_ms", "{:.1f}"), ("other_ms", "{:.1f}"), ("step_ms", "{:.1f}"), ("field_share", "{:.0%}")]


class Timed:
    """Calls fn and adds its synchronised wall seconds to clock[name]. train.drift_step reaches the generator's
    methods through .module, as it would through DistributedDataParallel."""

    def __init__(self, fn, clock, name, dev):
        self.module, self.clock, self.name, self.dev = fn, clock, name, dev

    def __call__(self, *args, **kwargs):
        sync(self.dev)
        start = time.perf_counter()
        out = self.module(*args, **kwargs)
        sync(self.dev)
        self.clock[self.name] += time.perf_counter() - start
        return out


def time_steps(targs, model, encoder, by_class, feats, scales, fields, steps, dev, dtypes=("fp32",)):
    """train.py's own step (train.drift_step) with the generator, the encoder and drift.drift_loss timed
    apart, then backward and the optimizer (clip, AdamW, EMA), for each dtype in turn (a copy of the model
    each, the generator under bf16 autocast for "bf16"), so that they share the machine's noise. Returns
    {dtype: [{part: seconds}, one a step]}, after one warm-up step each."""
    import train
    clock, runs, records = {}, {}, {d: [] for d in dtypes}
    for d in dtypes:
        m = copy.deepcopy(model)
        opt = torch.optim.AdamW(m.parameters(), lr=targs.lr, betas=(0.9, 0.95), weight_decay=targs.weight_decay)
        runs[d] = (m, Timed(m, clock, "generator", dev), copy.deepcopy(m).requires_grad_(False), opt,
                   torch.Generator().manual_seed(0), torch.autocast(dev.type, torch.bfloat16, enabled=d == "bf16"))
    timed_encoder = Timed(encoder, clock, "encoder", dev)
    drift_loss = drift.drift_loss
    drift.drift_loss = Timed(drift_loss, clock, "field", dev)  # train.drift_step calls it as drift.drift_loss
    try:
        for i in range(steps + 1):
            for d, (m, timed_model, ema_model, opt, gen, autocast) in runs.items():
                clock.update(generator=0.0, encoder=0.0, field=0.0)
                sync(dev)
                t0 = time.perf_counter()
                loss, _ = train.drift_step(targs, timed_model, timed_encoder, by_class, feats, scales, fields, gen,
                                           dev, autocast)
                sync(dev)
                t1 = time.perf_counter()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                sync(dev)
                t2 = time.perf_counter()
                torch.nn.utils.clip_grad_norm_(m.parameters(), targs.grad_clip)
                opt.step()
                train.update_ema(ema_model, m, targs.ema)
                sync(dev)
                t3 = time.perf_counter()
                if i > 0:  # the first step is a warm-up
                    records[d].append({**clock, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0})
    finally:
        drift.drift_loss = drift_loss
    return records


def bench_step(args, dev):
    """One step of train.py with its defaults, for both fields, each dataset and dtype (--quick: train.py's
    fake data)."""
    try:
        import train
    except ImportError as e:
        print(f"step: skipped (train.py cannot be imported: {e})")
        return None
    rows = []
    for name in ["fake"] if args.quick else args.step_datasets.split(","):
        with tempfile.TemporaryDirectory() as tmp:
            data = ["--dataset", name] + (["--landmarks", "16"] if args.quick else ["--download"])
            if not args.quick:
                link_raw(args.data_dir, name, tmp)
            for field in ("exact", "nystrom"):
                targs = train.parse_args(["--field", field, "--data-dir", tmp, "--cache-dir", tmp,
                                          "--device", dev.type] + data)
                images, labels = train.load_dataset(targs)
                keep = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:args.step_images]
                images, labels = images[keep], labels[keep]  # a step costs the same; the one-off summaries less
                by_class = [(labels == k).nonzero().squeeze(1) for k in range(int(labels.max()) + 1)]
                # what train.train sets up before its first step
                targs.channels, targs.image_size, targs.num_classes = images.shape[1], images.shape[-1], len(by_class)
                targs.temperatures = tuple(targs.temperatures) or train.FIELD_TEMPERATURES[field]
                targs.data_hash = train.data_hash(images, labels)
                torch.manual_seed(0)
                encoder = train.make_encoder(targs, images, dev, 0)
                model = sample.generator_from_args(vars(targs)).to(dev)
                feats, scales, fields = train.encode_dataset(targs, encoder, images, dev, 0), {}, {}
                if field == "nystrom":
                    scales, fields = train.build_fields(targs, feats, labels, len(by_class), dev, 0, 1)
                records = time_steps(targs, model, encoder, by_class, feats, scales, fields, args.step_steps, dev,
                                     args.step_dtypes.split(","))
                for dtype, recs in records.items():
                    row = {"field": field, "dataset": targs.dataset, "encoder": targs.encoder, "model": targs.model,
                           "batch": f"{targs.classes_per_step}x{targs.gen_per_class}", "dtype": dtype}
                    row.update({f"{k}_ms": 1e3 * statistics.median(r[k] for r in recs) for k in recs[0]})
                    parts = ("generator", "encoder", "field", "backward", "optimizer")
                    row["other_ms"] = row["step_ms"] - sum(row[f"{k}_ms"] for k in parts)
                    row["field_share"] = row["field_ms"] / row["step_ms"]
                    rows.append(row)
    return rows


# -----------------------------------------------------------------------------------------------------------

def parse_args(argv=None):
    """The flags of the defaults block, with their comments as help; --quick shrinks every size."""
    helps = dict(re.findall(r"^(\w+) = .*?  # (.*)$", open(__file__).read(), re.M))
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shapes and synthetic data: a smoke test in seconds")
    for name, value in _defaults.items():
        p.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, choices=CHOICES.get(name),
                       help=helps.get(name, "") + f" (default: {value})")
    p.add_argument("--json", default=None, help="write every number to this file")
    args = p.parse_args(argv)
    if set(args.step_dtypes.split(",")) - {"fp32", "bf16"} or set(args.step_datasets.split(",")) - set(MNIST_FOLDERS):
        raise SystemExit(f"error: --step-dtypes takes fp32,bf16 and --step-datasets {','.join(MNIST_FOLDERS)}; got "
                         f"{args.step_dtypes!r} and {args.step_datasets!r}")
    if args.quick:  # every size small, synthetic data: runs in seconds, needs no files
        args.shapes, args.temperatures, args.landmarks, args.repeats = "128x96x32", "0.05", 24, 3
        args.memory_sizes, args.datasets, args.positives_per_class = "512", "synthetic", 300
        args.queries_per_class, args.landmark_counts, args.strategies = 20, "10,40", "random,kmeans"
        args.fidelity_temperatures = "0.05"
        args.step_steps = 1
    return args


def main(argv=None):
    args = parse_args(argv)
    dev = torch.device(args.device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu")
    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = set(args.sections.split(","))
    if wanted - set(SECTIONS):
        raise SystemExit(f"error: unknown sections {sorted(wanted - set(SECTIONS))}; choose among {','.join(SECTIONS)}")
    results = {"machine": machine(), "args": vars(args)}
    print(f"machine: {results['machine']}")
    if "fields" in wanted:
        results["fields"] = bench_fields(args, dev)
        print("\nfields (ms: median wall time; x floor: time / time of the same-shape matrix products, same run)")
        print(table(results["fields"], FIELD_COLUMNS))
    if "memory" in wanted and (out := bench_memory(args, dev)):
        results["memory"], results["memory_summary"] = out
        print("\nmemory of the exact field (N = Np, negatives = the queries; peak beyond inputs and output)")
        print(table(results["memory"], MEMORY_COLUMNS))
        print(results["memory_summary"])
    if "fidelity" in wanted:
        results["fidelity"] = bench_fidelity(args, dev)
        print("\nprojected vs exact attraction (attr_*: attraction b_pos - x; cos, rel_l2, target_mse: one-sided field)")
        print(table(results["fidelity"], FIDELITY_COLUMNS))
    if "step" in wanted:
        results["step"] = bench_step(args, dev)
        if results["step"]:
            print("\ntrain.py step (ms, medians; field = drift.drift_loss forward, backward = through encoder and generator)")
            print(table(results["step"], STEP_COLUMNS))
    results["machine"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return results


if __name__ == "__main__":
    main()
