"""
Train a one-step image generator by drifting [Deng et al. 2602.04770] in a frozen encoder's feature space,
with the exact field (Algorithm 2) or DriftXpress's projected Nystrom attraction [2605.12183].

    python train.py --dataset mnist --data-dir data --download                  # pixel features, Nystrom field
    python train.py --dataset mnist --field exact --time-limit 15                # exact field, 15 minutes
    python train.py --stage encoder --dataset cifar10 --out-dir out/mae          # train the MAE encoder
    python train.py --dataset cifar10 --encoder mae --encoder-weights out/mae/encoder.pt
    torchrun --nproc_per_node=2 train.py --dataset cifar10                      # DistributedDataParallel
    python train.py --resume --out-dir out                                       # continue a killed run

Every flag is a name in the defaults block below (underscores become dashes).
"""

import copy
import gc
import hashlib
import json
import math
import os
import re
import resource
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

import drift
import sample

# ---------------------------------------------------------------------------------------------- defaults
_before = set(globals())
stage = "generator"  # generator | encoder (train the small ResNet MAE encoder instead)
# data
dataset = "mnist"  # mnist | fashion-mnist | cifar10 | cifar100 | svhn | imagefolder | fake (synthetic blobs, for tests)
data_dir = "data"  # torchvision root (or a folder with DATASET_train.npz), or the root of an ImageNet-style folder
download = False  # let torchvision download the dataset into --data-dir
image_size = 0  # resize images to this many pixels a side (0: the dataset's own; imagefolder needs one)
fake_size = 256  # images in --dataset fake
# method
field = "nystrom"  # nystrom (DriftXpress projected attraction) | exact (Algorithm 2 against real batches)
encoder = "auto"  # auto (by dataset) | pixel | mae (trained and cached on first use) | resnet18 | resnet50 | dinov2_vits14 | dinov2_vitb14
encoder_weights = ""  # local weights file (mae: empty = the cached one for this dataset, trained if missing)
encoder_resolution = 0  # resize images to this before the encoder (0: as they are)
groups = "auto"  # feature groups used, comma-separated (e.g. pixel,x4.loc); auto: pixel alone for --encoder pixel, else all
temperatures = ()  # summed, each drift RMS-normalised [1] A.6; empty: 0.02 0.05 0.2 (exact, [1]), 0.05 0.1 0.2 (nystrom)
classes_per_step = 10  # Nc classes per batch
gen_per_class = 16  # Nneg generated samples per class (they are also the negatives)
pos_per_class = 64  # Npos real positives per class (exact field; drawn from the feature cache)
unc_per_class = 16  # Nunc real unconditional negatives per class, weighted for CFG [1] §3.5
extra_negatives = 0  # more generated samples per class, forward only (no gradient), that join the negatives
cfg_max = 4.0  # alpha in [1, cfg-max] drawn with p(alpha) ~ alpha^-cfg_power
cfg_power = 3.0
landmarks = 128  # Nystrom landmarks per class (real samples)
loc_landmarks = 0  # of those, how many serve the per-location groups (L fields of M x M each; 0: all of them)
loc_field = "nystrom"  # the per-location groups' field under --field nystrom: nystrom | exact (against --pos-per-class)
landmark_strategy = "random"  # random | kmeans | kcenter (on pooled global features)
ridge = 1e-4  # Nystrom ridge
affinity_floor = 0.0  # exact field: every affinity at least this, as Deng et al.'s released code (1e-3); 0: Algorithm 2
cache_dir = ""  # encoded training sets, auto-trained MAE encoders, FID statistics (default: $DRIFT_CACHE or ~/.cache/drift)
save_fields = False  # also write the Nystrom summaries to <out-dir>/fields.pt
# generator and optimiser
model = "tiny"  # tiny | small | base: DiTs; conv: a small convolutional decoder (drift.GENERATORS)
patch_size = 0  # 0: image-size // 4, a 4x4 token grid (CPU-friendly; DiT uses 2 or 4 on GPUs)
out_init = 1.0  # RMS of the output pixels at initialisation, a function of the noise (0: DiT's zero output, every sample starts identical)
black_floor = False  # the generator's output is max(x, -1): below black is black (MNIST-style data: most pixels are)
style_tokens = 32  # random style tokens summed into the conditioning (0: none)
lr = 2e-3  # high for a small model and a short run (DiT-size models: 2e-4)
warmup = 100  # linear warm-up steps
lr_decay = 0.0  # the last fraction of the run (by --max-steps, or --time-limit if that ends first) over which the lr falls linearly to 0
weight_decay = 0.01
grad_clip = 2.0
ema = 0.995  # EMA decay (papers: 0.999-0.9999 for long runs)
max_steps = 2000
time_limit = 0.0  # minutes of training before stopping with a checkpoint (0: none)
encoder_steps = 2000  # MAE encoder: steps of masked-autoencoder training
encoder_batch = 128
mask_ratio = 0.5  # MAE encoder: fraction of 4x4 patches hidden
# run
out_dir = "out"
resume = False  # continue from <out-dir>/ckpt.pt exactly where it stopped, with its own settings
log_every = 25
sample_every = 250  # PNG grid of EMA samples (0: only at the end)
ckpt_every = 250  # (0: only at the end)
sample_cfg = 1.0  # CFG scale of the sample grids and FID samples
fid_every = 0  # FID, precision and recall every K steps (0: none)
fid_samples = 5000  # generated samples per FID
fid_ref = ""  # reference: a statistics .npz, or a dataset (mnist:test, cifar10); empty: the training images, cached
inception = ""  # local Inception weights for fid.py
seed = 0
device = "auto"  # auto | cpu | cuda | cuda:1 ...
dtype = "bf16"  # bf16 | fp32: the generator under bf16 autocast on GPUs, and on CPUs with bf16 instructions (fields always fp32)
compile = False  # torch.compile the generator
_defaults = {k: v for k, v in globals().items() if k not in _before and not k.startswith("_")}
# defaults that depend on --dataset (a flag given on the command line wins). Pixel-space drifting fails on
# natural images ([1] §5.2; public ports got "beige blobs"), so colour datasets default to the MAE encoder,
# trained once and cached; the sizes follow [1] A.2 and [2]'s CIFAR-10 setting (500 landmarks a class).
_natural = dict(encoder="mae", model="small", patch_size=2, gen_per_class=64, pos_per_class=128, unc_per_class=32,
                landmarks=500, lr=4e-4, warmup=1000, ema=0.999, max_steps=50000, encoder_steps=5000,
                sample_every=1000, ckpt_every=1000, fid_every=5000, fid_samples=10000)
# MNIST-style: 4x4-pixel patches (a 7x7 token grid; 7x7 patches left seams and one style a class), 256
# positives a class for the exact field and 1,024 landmarks a class for the Nystrom one (128 summarised each
# class too coarsely: FID 82 against 56 in the same 30 minutes; BENCHMARKS.md §5 measures all three), and the
# black floor (without it the digits sat in a grey haze: FID 70.5 against 34.2 at 12 minutes, §5b); 16,000 steps,
# for recall still grows at 7,500, about 0.05 a doubling (§5r; an H200 makes 16,000 in about 8 minutes, §6; the
# README's CPU runs stop at 30 minutes)
# and each 4x4 block's edge energy per location (e4.loc; drift.edge_energy), drifted by the exact field: 30 minutes
# of one thread, FID 17.7 -> 13.6 (Nystrom; exact 14.4), precision 0.66 -> 0.74 (BENCHMARKS.md §5p)
_digits = dict(encoder="pixel", groups="pixel,e4.loc", loc_field="exact", patch_size=4, pos_per_class=256,
               landmarks=1024, black_floor=True, max_steps=16000)
# Fashion-MNIST: every 4x4-pixel block is also a drift problem of its own (x4.loc), so that a sample can match
# different garments in different places: at 15 minutes FID 93.4 -> 81.5 and twice the recall (BENCHMARKS.md §5c);
# not on MNIST, where the mostly black blocks pulled every sample to black (and speckled every digit when the floor
# passed gradients). The 16 tiles of 7x7 pixels too (x7.loc): 30 minutes, one thread, FID 61.5 -> 55.5 (exact)
# and 72.4 -> 65.9 (Nystrom), §5f. A Nystrom run drifts blocks and tiles with the exact field (--loc-field exact):
# 65.9 -> 62.1 against 55.5 exact, §5g; their own Nystrom fields (--loc-field nystrom) use 128 landmarks a class
# (256 and 512 scored worse).
# and the convolutional generator (--model conv): 30 minutes, one thread, FID 55.4 -> 35.0 and 32.4 (exact, two
# seeds), recall 0.15 -> 0.34, Nystrom 33.6; on MNIST 17.2 against the DiT's 16.2, so MNIST keeps the DiT (§5l);
# with two blocks at each scale (drift.GENERATORS["conv"]) Nystrom 30.2, exact 32.3; both cores 32.1 -> 29.3 (§5m)
# 16,000 steps, as MNIST (6,000 until 2026-12-07): the README's Nystrom run continued on this CPU from 30 to 60, 90
# and 120 minutes (5,899, 10,339, 14,471, 19,078 steps) scored FID 27.5, 27.0, 25.4, 25.6 and recall 0.386,
# 0.424, 0.425, 0.433 (§5z)
_fashion = dict(_digits, groups="pixel,x4.loc,x7.loc", loc_landmarks=128, loc_field="exact", model="conv")
PRESETS = {"mnist": _digits, "fashion-mnist": _fashion, "cifar10": _natural,
           "cifar100": dict(_natural, landmarks=150), "svhn": _natural, "imagefolder": _natural,
           "fake": dict(encoder="pixel")}
# --------------------------------------------------------------------------------------------------------

DATASETS = tuple(PRESETS)
# Nystrom at 30 minutes, 1,024 landmarks (BENCHMARKS.md §5b): 0.1 0.2 0.4 averaged too much (MNIST FID 35.9 against
# 18.7 at these); [1]'s 0.02 0.05 0.2 tied on MNIST (18.3) but lost on Fashion-MNIST (88.5 against 82.0)
FIELD_TEMPERATURES = {"exact": (0.02, 0.05, 0.2), "nystrom": (0.05, 0.1, 0.2)}
STILL_STEPS = 50  # a run whose gradient is exactly zero this many steps in a row is stopped with the reason
RUN_FLAGS = ("max_steps", "time_limit", "log_every", "sample_every", "ckpt_every", "fid_every", "fid_samples",
             "fid_ref", "inception", "device", "compile", "resume", "out_dir", "data_dir", "cache_dir", "download")


def load_dataset(args):
    """The training set as uint8 images [n, C, H, W] and int64 labels [n], or one clear SystemExit."""
    from torchvision import datasets, transforms
    name, root = args.dataset, args.data_dir
    if name not in DATASETS:
        raise SystemExit(f"error: unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")
    try:
        if name == "fake":  # 16x16 synthetic classes: a soft red, green, blue or white blob of random place and size
            g = torch.Generator().manual_seed(0)
            labels = torch.arange(args.fake_size) % 4
            centre, width = torch.rand(2, args.fake_size, 1, 1, generator=g) * 8 + 4, torch.rand(args.fake_size, 1, 1, generator=g) * 6 + 2
            grid = torch.arange(16.0)
            blob = torch.exp(-((grid[:, None] - centre[0]) ** 2 + (grid - centre[1]) ** 2) / width)  # (n, 16, 16)
            colour = torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 1]])[labels]  # (n, 3)
            images = (255 * blob[:, None] * colour[:, :, None, None]).round().to(torch.uint8)
        elif os.path.isfile(npz := os.path.join(root, f"{name}_train.npz")):  # x: uint8 [n, H, W, C], y: labels
            with np.load(npz) as f:
                if "x" not in f or "y" not in f:
                    raise SystemExit(f"error: {npz} holds {sorted(f.keys())}; expected x (uint8 [n, H, W, C]) and y (labels)")
                x, labels = torch.from_numpy(f["x"]), torch.from_numpy(f["y"])
            if x.dtype != torch.uint8 or x.dim() != 4 or len(x) != len(labels):
                raise SystemExit(f"error: {npz}: x must be uint8 [n, H, W, C] with one label in y each, "
                                 f"got x {x.dtype} {tuple(x.shape)} and {len(labels)} labels")
            images = x.permute(0, 3, 1, 2)
        elif name in ("mnist", "fashion-mnist"):
            ds = (datasets.MNIST if name == "mnist" else datasets.FashionMNIST)(root, train=True, download=args.download)
            images, labels = ds.data.unsqueeze(1), ds.targets
        elif name in ("cifar10", "cifar100"):
            ds = (datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100)(root, train=True, download=args.download)
            images, labels = torch.from_numpy(ds.data).permute(0, 3, 1, 2), torch.tensor(ds.targets)
        elif name == "svhn":
            ds = datasets.SVHN(root, split="train", download=args.download)
            images, labels = torch.from_numpy(ds.data), torch.from_numpy(ds.labels)
        else:
            if args.image_size <= 0:
                raise SystemExit("error: --dataset imagefolder needs --image-size (e.g. 64)")
            tf = transforms.Compose([transforms.Resize(args.image_size), transforms.CenterCrop(args.image_size),
                                     transforms.PILToTensor()])
            ds = datasets.ImageFolder(root, transform=tf)
            loader = torch.utils.data.DataLoader(ds, batch_size=256, num_workers=min(8, os.cpu_count() or 1))
            batches = list(tqdm(loader, desc="loading images"))
            images, labels = torch.cat([b[0] for b in batches]), torch.cat([b[1] for b in batches])
    except SystemExit:
        raise
    except Exception as e:
        hint = "" if args.download or name in ("imagefolder", "fake") else "; pass --download to fetch it"
        raise SystemExit(f"error: could not load {name} from {os.path.abspath(root)} "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}){hint}")
    if len(images) == 0:
        raise SystemExit(f"error: dataset {name} at {root} has no images")
    if labels.min() < 0:
        raise SystemExit(f"error: dataset {name} at {root} has negative labels; expected classes 0..K-1")
    if args.image_size > 0 and images.shape[-1] != args.image_size:
        images = F.interpolate(images.float(), size=(args.image_size,) * 2, mode="bilinear", antialias=True)
        images = images.round().clamp(0, 255).to(torch.uint8)
    return images.contiguous(), labels.long()


def to_float(images):
    return images.float() / 127.5 - 1  # uint8 -> [-1, 1]


def data_hash(images, labels):
    """SHA-256 of the training images' and labels' bytes: what every cache built from them is keyed on."""
    h = hashlib.sha256(str(tuple(images.shape)).encode())
    h.update(images.contiguous().numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


def cache_folder(args):
    return args.cache_dir or os.environ.get("DRIFT_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "drift")


def make_encoder(args, images, device, rank):
    """The frozen encoder. --encoder mae without --encoder-weights uses the MAE trained on this very data
    (keyed by its contents, steps and seed) from the cache, and trains it there the first time."""
    if args.encoder == "mae" and not args.encoder_weights:
        path = os.path.join(cache_folder(args), f"mae-{args.dataset}-{args.data_hash[:12]}-{args.encoder_steps}steps-"
                                                f"seed{args.seed}.pt")
        if rank == 0 and not os.path.exists(path):
            print(f"no MAE encoder for this data yet: training one ({args.encoder_steps} steps), cached at {path}")
            fit_mae(args, images, device, path)
        if dist.is_initialized():
            dist.barrier()
        args.encoder_weights = path
    try:
        encoder = drift.Encoder(args.encoder, args.encoder_weights or None, images.shape[1], args.encoder_resolution or None)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    names = set(encoder(torch.zeros(2, *images.shape[1:])))
    if args.groups == "auto":  # on raw pixels the per-location and patch statistics pull to the dominant
        args.groups = "pixel" if args.encoder == "pixel" else ""  # background (tested on MNIST); networks use all
    if not set(args.groups.split(",") if args.groups else []) <= names:
        raise SystemExit(f"error: unknown feature groups in --groups {args.groups}; this encoder has {', '.join(sorted(names))}")
    return encoder.to(device)


def chosen(groups, args):
    """The feature groups --groups keeps (all by default), an ablation of [1] A.5."""
    return {g: v for g, v in groups.items() if not args.groups or g in args.groups.split(",")}


# ---------------------------------------------------------------------------------------------- features

def encode_dataset(args, encoder, images, device, rank):
    """Every training image through the frozen encoder once, cached to disk as float16 {group: [L, n, C]}, keyed
    by what the features depend on: the images' and labels' bytes, the encoder (name, weights hash,
    resolution) and the groups kept. A cache that cannot be read, or holds other groups than the encoder gives,
    is named and rebuilt."""
    key = hashlib.sha256(json.dumps([args.data_hash, encoder.identity, args.groups]).encode()).hexdigest()[:16]
    path = os.path.join(cache_folder(args), f"features-{args.dataset}-{encoder.identity['name']}-{key}.pt")
    feats = None
    if rank == 0 and os.path.exists(path):
        try:
            feats = torch.load(path, weights_only=True)
        except Exception as e:
            print(f"warning: the feature cache {path} cannot be read ({type(e).__name__}); rebuilding it")
        if feats is not None:
            with torch.no_grad():
                names = set(chosen(encoder(torch.zeros(1, *images.shape[1:], device=device)), args))  # names only
            if set(feats) != names:  # written by an older encoder with other groups
                print(f"warning: the feature cache {path} holds other groups than the encoder gives; rebuilding it")
                feats = None
    if rank == 0 and feats is None:
        parts = {}
        with torch.no_grad():
            for i in tqdm(range(0, len(images), 500), desc="encoding the training set"):
                for g, v in chosen(encoder(to_float(images[i:i + 500]).to(device)), args).items():
                    parts.setdefault(g, []).append(v.half().cpu())
        feats = {g: torch.cat(v, 1) for g, v in parts.items()}  # {group: (L, n, C)}
        for g, v in feats.items():
            bad = (~torch.isfinite(v)).flatten(2).any(-1).any(0).nonzero().flatten()  # images with a non-finite feature
            if len(bad):
                raise SystemExit(f"error: the encoder gave non-finite {g} features for {len(bad)} training images "
                                 f"(first: index {bad[0].item()}); check the encoder weights and the data")
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            torch.save(feats, path + ".tmp")
            os.replace(path + ".tmp", path)
        except OSError as e:
            if os.path.exists(path + ".tmp"):
                os.remove(path + ".tmp")
            print(f"warning: could not write the feature cache {path} ({e.strerror or e}); continuing without it")
    if dist.is_initialized():  # the other processes read what rank 0 wrote
        dist.barrier()
        if rank != 0:
            feats = torch.load(path, weights_only=True)
    return feats


def build_fields(args, feats, labels, num_classes, device, rank, world):
    """Fixed per-group scales, per-class landmarks (the same samples for every group and location) and the
    Nystrom summaries, each process on its own shard of the data, all-reduced."""
    scales, pooled = {}, []
    for g, y in feats.items():  # y (L, n, C)
        per_class = [(labels == k).nonzero().squeeze(1)[:128] for k in range(min(num_classes, 10))]
        scales[g] = torch.stack([drift.feature_scale(y[:, i].float()) for i in per_class if len(i) > 1]).mean()
        pooled.append(y.float().mean(0) / (scales[g] * math.sqrt(y.shape[-1])))  # (n, C) location-pooled, scaled
    gen = torch.Generator().manual_seed(args.seed)
    try:
        _, index = drift.select_landmarks(torch.cat(pooled, -1), args.landmarks, args.landmark_strategy, labels, gen,
                                          return_index=True)  # (K, M)
    except ValueError as e:
        raise SystemExit(f"error: {e}; lower --landmarks")
    fields = {}
    fitted = {g: y for g, y in feats.items() if len(y) == 1 or args.loc_field == "nystrom"}  # else exact, no fields
    for g, y in tqdm(fitted.items(), desc="Nystrom summaries", disable=rank != 0):
        # per-location groups keep the first --loc-landmarks of each class's landmarks: each location is a field
        # of its own (Fashion-MNIST's 49 pixel blocks at M = 1,024 were not fitted after 8 minutes of one core)
        u = y[:, index if len(y) == 1 else index[:, :args.loc_landmarks or None]].float().to(device)  # (L, K, M, C)
        fields[g] = drift.build_nystrom_fields(y[:, rank::world].float(), u, args.temperatures, scales[g].to(device),
                                               labels[rank::world], args.ridge, all_reduce=world > 1)
    return {g: s.to(device) for g, s in scales.items()}, fields


# ---------------------------------------------------------------------------------------------- training

def sample_alpha(n, args, gen):
    """CFG scales alpha on [1, cfg_max] with density ~ alpha^-k, by inverting the CDF ([1] A.7)."""
    u, k = torch.rand(n, generator=gen), args.cfg_power
    if args.cfg_max <= 1:
        return torch.ones(n)
    if k == 1:  # density 1/alpha: log-uniform
        return args.cfg_max ** u
    return (1 - u * (1 - args.cfg_max ** (1 - k))) ** (1 / (1 - k))


def drift_step(args, model, encoder, by_class, feats, scales, fields, gen, device, autocast):
    """One drifting loss: Nc classes x Nneg generated samples; negatives are the class's own samples plus
    Nunc real unconditional samples weighted w = (alpha - 1)(Nneg - 1)/Nunc. Real samples (positives of the
    exact field, unconditional negatives) are looked up in the feature cache, so both fields see the same
    features and differ only in the field. Returns (loss, drift norm)."""
    raw = getattr(model, "module", model)
    nc, nneg, npos, nunc = min(args.classes_per_step, len(by_class)), args.gen_per_class, args.pos_per_class, args.unc_per_class
    n = sum(len(i) for i in by_class)
    classes = torch.randperm(len(by_class), generator=gen)[:nc]  # (Nc,)
    alpha = sample_alpha(nc, args, gen)  # (Nc,)
    noise, style = raw.make_noise(nc * nneg, gen, device)
    unc = torch.randint(n, (nc * nunc,), generator=gen)
    nx = args.extra_negatives  # generated negatives without gradient: the repulsion averages over more samples
    w_unc = (alpha - 1) * (nneg + nx - 1) / max(nunc, 1)  # (Nc,)
    weights = torch.cat([torch.ones(nc, nneg + nx), w_unc[:, None].expand(nc, nunc)], -1).to(device)  # (Nc, Nneg+Nx+Nunc)
    if len(fields) < len(feats):  # Npos real positives of each of the batch's classes, for groups without fields
        pos = torch.stack([by_class[k][torch.randint(len(by_class[k]), (npos,), generator=gen)] for k in classes])
    with autocast:
        x = model(noise, classes.repeat_interleave(nneg).to(device), alpha.repeat_interleave(nneg).to(device), style)
        gen_feats = chosen(encoder(x), args)  # {group: (L, Nc*Nneg, C)}
        extra = {}
        if nx:
            with torch.no_grad():  # the bare module: no gradient to synchronise across processes
                noise_x, style_x = raw.make_noise(nc * nx, gen, device)
                extra = chosen(encoder(raw(noise_x, classes.repeat_interleave(nx).to(device),
                                           alpha.repeat_interleave(nx).to(device), style_x)), args)
    loss, norms = 0.0, []
    for g, xg in gen_feats.items():
        L, C = xg.shape[0], xg.shape[-1]
        xg = xg.float().view(L, nc, nneg, C)
        field = "nystrom" if g in fields else "exact"  # --loc-field exact: the per-location groups have no fields
        y_pos = feats[g][:, pos.flatten()].to(device).float().view(L, nc, npos, C) if field == "exact" else None
        y_unc = feats[g][:, unc].to(device).float().view(L, nc, nunc, C)
        y_extra = [extra[g].float().view(L, nc, nx, C)] if nx else []
        y_neg = torch.cat([xg.detach(), *y_extra, y_unc], -2)  # (L, Nc, Nneg+Nx+Nunc, C): the samples themselves first
        loss_g, stats = drift.drift_loss(xg, y_pos, y_neg, args.temperatures, field, fields.get(g),
                                         weights, True, scales.get(g), classes.to(device), args.affinity_floor)
        loss, norms = loss + loss_g, norms + [stats["drift_norm"]]
    return loss, torch.stack(norms).mean()


def learning_rate(args, step, train_seconds):
    """Linear warm-up over --warmup steps, then constant, then (--lr-decay) a linear fall to 0 over the last
    fraction of the run, measured in steps or, with --time-limit, in seconds, whichever is further along."""
    progress = step / args.max_steps
    if args.time_limit > 0:
        progress = max(progress, train_seconds / (60 * args.time_limit))
    decay = min(1.0, max(0.0, 1 - progress) / args.lr_decay) if args.lr_decay > 0 else 1.0
    return args.lr * min(1.0, (step + 1) / max(args.warmup, 1)) * decay


@torch.no_grad()
def update_ema(ema_model, model, decay):
    for e, p in zip(ema_model.parameters(), model.parameters()):
        e.lerp_(p.detach(), 1 - decay)


def setup(args):
    """(rank, world size, device); torchrun sets RANK and WORLD_SIZE, then gloo on CPU or nccl on GPUs."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if "RANK" not in os.environ:
        return 0, 1, torch.device(device)
    if device.startswith("cuda"):
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device(device)


def cpu_has_bf16():
    """Whether the CPU computes in bf16 natively (Linux's flags for AVX-512 BF16 or AMX). There the convolutional
    generator's 30-minute run makes 1.37x the steps under bf16 autocast (BENCHMARKS.md §5n); elsewhere bf16 would
    be emulated, so the CPU stays fp32."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool({"avx512_bf16", "amx_bf16"} & flags)


def check_settings(args):
    """Every setting that cannot define a run, refused before any work, in one line that says how to fix it."""
    def need(ok, message):
        if not ok:
            raise SystemExit(f"error: {message}")
    need(args.dataset in DATASETS, f"unknown dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    need(args.field in ("exact", "nystrom"), f"unknown field {args.field!r}; choose exact or nystrom")
    need(args.model in drift.GENERATORS, f"unknown model {args.model!r}; choose one of {', '.join(drift.GENERATORS)}")
    need(args.encoder in drift.ENCODERS, f"unknown encoder {args.encoder!r}; choose auto or one of {', '.join(drift.ENCODERS)}")
    need(args.classes_per_step >= 1, f"--classes-per-step must be at least 1, got {args.classes_per_step}")
    need(args.gen_per_class >= 2, f"--gen-per-class must be at least 2 (a sample is not its own negative), "
                                  f"got {args.gen_per_class}")
    need(args.loc_field in ("exact", "nystrom"), f"unknown --loc-field {args.loc_field!r}; choose exact or nystrom")
    need(args.pos_per_class >= 1 or (args.field, args.loc_field) == ("nystrom", "nystrom"),
         f"--pos-per-class must be at least 1, got {args.pos_per_class}")
    need(args.extra_negatives >= 0, f"--extra-negatives must be >= 0, got {args.extra_negatives}")
    need(args.unc_per_class >= 0 and args.landmarks >= 1 and args.loc_landmarks >= 0,
         "--unc-per-class and --loc-landmarks must be >= 0, --landmarks >= 1")
    need(args.cfg_max >= 1 and math.isfinite(args.cfg_max * args.cfg_power * args.sample_cfg),
         f"--cfg-max must be >= 1 and --cfg-power, --sample-cfg finite, got {args.cfg_max}, {args.cfg_power}, {args.sample_cfg}")
    need(all(math.isfinite(t) and t > 0 for t in args.temperatures),
         f"--temperatures must be positive, got {' '.join(map(str, args.temperatures))}")
    for name in ("lr", "ridge", "weight_decay", "grad_clip", "warmup", "time_limit", "affinity_floor", "out_init"):
        need(math.isfinite(getattr(args, name)) and getattr(args, name) >= 0, f"--{name.replace('_', '-')} must be >= 0, "
                                                                               f"got {getattr(args, name)}")
    need(args.lr > 0 and args.grad_clip > 0, "--lr and --grad-clip must be positive")
    need(0 <= args.ema < 1, f"--ema must lie in [0, 1), got {args.ema}")
    need(0 <= args.lr_decay <= 1, f"--lr-decay must lie in [0, 1] (a fraction of the run), got {args.lr_decay}")
    need(0 < args.mask_ratio < 1 and args.encoder_steps >= 1 and args.encoder_batch >= 1,
         "--mask-ratio must lie in (0, 1), --encoder-steps and --encoder-batch must be >= 1")
    need(args.max_steps >= 1 and args.log_every >= 1, "--max-steps and --log-every must be at least 1")
    need(min(args.sample_every, args.ckpt_every, args.fid_every) >= 0, "--sample-every, --ckpt-every, --fid-every must be >= 0")
    need(args.fid_every == 0 or args.fid_samples >= 2, f"--fid-samples must be at least 2, got {args.fid_samples}")
    need(not args.fid_ref.endswith(".npz") or os.path.isfile(args.fid_ref), f"--fid-ref {args.fid_ref} does not exist")
    need(args.dtype in ("bf16", "fp32"), f"--dtype must be bf16 or fp32, got {args.dtype}")
    need(not args.device.startswith("cuda") or torch.cuda.is_available(),
         f"--device {args.device} asked for, but this machine has no CUDA GPU; use --device cpu (or auto)")
    need(args.image_size >= 0 and args.patch_size >= 0, "--image-size and --patch-size must be >= 0")
    need(args.stage in ("generator", "encoder"), f"unknown --stage {args.stage!r}; choose generator or encoder")


def resume_settings(args, ckpt, explicit):
    """A resumed run continues the same run: its settings come from the checkpoint. A run-control flag given on
    the command line (--max-steps, --ckpt-every, ...) changes it; any other flag that differs is refused."""
    same = lambda a, b: json.loads(json.dumps(a)) == json.loads(json.dumps(b))
    # a setting newer than the checkpoint counts as saved at its default: the run's behaviour before it existed
    for k, saved in {**_defaults, **ckpt["args"]}.items():
        if k in explicit and k not in RUN_FLAGS and not same(getattr(args, k, saved), saved):
            raise SystemExit(f"error: --{k.replace('_', '-')} {getattr(args, k)} differs from the checkpoint's "
                             f"{saved}; a resumed run keeps its settings: drop the flag, or start a new --out-dir")
        if k not in explicit or k not in RUN_FLAGS:
            setattr(args, k, saved)


def train(args):
    explicit = set(vars(args).pop("explicit", ()))
    ckpt_path = os.path.join(args.out_dir, "ckpt.pt")
    try:
        ckpt = sample.load_checkpoint(ckpt_path) if args.resume else None
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if ckpt is not None:
        resume_settings(args, ckpt, explicit)
    args.temperatures = tuple(args.temperatures) or FIELD_TEMPERATURES.get(args.field, ())
    check_settings(args)
    rank, world, device = setup(args)
    images, labels = load_dataset(args)
    digest = data_hash(images, labels)
    if ckpt is not None and args.data_hash != digest:
        raise SystemExit(f"error: the data at {args.data_dir} is not the data this run was trained on "
                         f"(content hash {digest[:12]}, checkpoint {args.data_hash[:12]}); point --data-dir at it")
    args.data_hash = digest
    by_class = [(labels == k).nonzero().squeeze(1) for k in range(int(labels.max()) + 1)]
    if min(len(i) for i in by_class) == 0:
        raise SystemExit(f"error: class {[len(i) for i in by_class].index(0)} has no images; labels must be 0..K-1")
    args.channels, args.image_size, args.num_classes = images.shape[1], images.shape[-1], len(by_class)
    patch = args.patch_size or args.image_size // 4
    if patch < 1 or args.image_size % patch:
        raise SystemExit(f"error: patch size {patch} does not divide the image size {args.image_size}; "
                         f"choose a divisor with --patch-size")
    inception = []  # the FID network and the reference statistics, loaded before any training work
    if args.fid_every > 0 and rank == 0:
        import fid
        try:
            inception.append(fid.load_inception(args.inception or None, device=device))
        except Exception as e:
            raise SystemExit(f"error: --fid-every needs the Inception network: {e}")
        inception.append(fid_reference(args, images, inception[0], device))
    try:
        os.makedirs(os.path.join(args.out_dir, "samples"), exist_ok=True)
    except OSError as e:
        raise SystemExit(f"error: cannot write to --out-dir {args.out_dir} ({e.strerror or e}); choose a writable folder")
    t_setup = time.time()
    torch.manual_seed(args.seed)
    encoder = make_encoder(args, images, device, rank)
    if ckpt is not None and ckpt["encoder"] != encoder.identity:
        raise SystemExit(f"error: the checkpoint was trained with encoder {ckpt['encoder']}, not {encoder.identity}")
    model = sample.generator_from_args(vars(args)).to(device)
    ema_model = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=args.weight_decay)
    gen = torch.Generator().manual_seed(args.seed + rank)  # every random draw of training comes from here
    step, train_seconds = 0, 0.0
    if ckpt is not None:
        try:
            sample.load_weights(model, ckpt["model"], ckpt_path, args.model)
            sample.load_weights(ema_model, ckpt["ema"], ckpt_path, args.model)
        except ValueError as e:
            raise SystemExit(f"error: {e}")
        opt.load_state_dict(ckpt["optimizer"])
        if len(ckpt["rng"]) != world:
            raise SystemExit(f"error: the checkpoint was written by {len(ckpt['rng'])} processes; resume it with as many")
        gen.set_state(ckpt["rng"][rank])
        step, train_seconds = ckpt["step"], ckpt["train_seconds"]
    saved_step = step
    feats = encode_dataset(args, encoder, images, device, rank)  # both fields look real samples up here
    scales, fields = {}, {}
    if args.field == "nystrom":
        scales, fields = build_fields(args, feats, labels, len(by_class), device, rank, world)
        if args.save_fields and rank == 0:
            torch.save({g: {"scale": scales[g].cpu(), "s": [f.s.cpu() for f in fs], "S": [f.S.cpu() for f in fs]}
                        for g, fs in fields.items()}, os.path.join(args.out_dir, "fields.pt"))
    train_seconds += time.time() - t_setup
    net = torch.nn.parallel.DistributedDataParallel(model) if world > 1 else model
    net = torch.compile(net) if args.compile else net
    use_bf16 = args.dtype == "bf16" and (device.type == "cuda" or cpu_has_bf16())
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16)
    if rank == 0:
        print(f"generator in {'bf16 (autocast)' if use_bf16 else 'fp32'} on {device}; fields in fp32")
    # the JSONL log: a config line, then every logged number; a resumed run drops what came after its checkpoint
    log_path = os.path.join(args.out_dir, "log.jsonl")
    if rank == 0:
        lines = []
        if ckpt is not None and os.path.exists(log_path):
            lines = [l for l in open(log_path) if l.endswith("}\n") and json.loads(l).get("step", 0) <= step]
        lines.append(json.dumps({"event": "config" if ckpt is None else "resume", "step": step, "args": vars(args)}) + "\n")
        with open(log_path, "w") as f:
            f.writelines(lines)

    def log(record):
        if rank == 0:
            with open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def checkpoint():
        states = [gen.get_state()]
        if world > 1:
            states = [None] * world
            dist.all_gather_object(states, gen.get_state())
        if rank == 0:
            try:
                sample.save_checkpoint(ckpt_path, {"model": model.state_dict(), "ema": ema_model.state_dict(),
                                                  "optimizer": opt.state_dict(), "step": step, "args": vars(args),
                                                  "encoder": encoder.identity, "rng": states,
                                                  "train_seconds": train_seconds})
            except OSError as e:
                raise SystemExit(f"error: {e}")

    def evaluate(final):  # sample grid and FID (every --fid-every steps and at the end), outside the training clock
        if rank != 0:
            return
        k = min(args.num_classes, 10)
        grid = sample.generate_images(ema_model, 8 * k, 256, device, args.seed, args.sample_cfg, list(range(k)))
        sample.save_grid(grid, os.path.join(args.out_dir, "samples", f"step{step:06d}.png"), nrow=k)
        if args.fid_every > 0 and (step % args.fid_every == 0 or final):
            import fid
            t0 = time.time()
            imgs = sample.generate_images(ema_model, args.fid_samples, 250, device, args.seed + 1, args.sample_cfg)
            scores = fid.fid_from_images(imgs, inception[1], inception[0], 250, device)  # fid, precision, recall
            log({"event": "fid", "step": step, **scores, "train_seconds": train_seconds, "eval_seconds": time.time() - t0})
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items() if v is not None))

    bar = tqdm(total=args.max_steps, initial=step, disable=rank != 0, desc="drifting")
    sums = [0.0, 0.0, 0.0, 0]  # loss, drift norm, seconds, steps since the last log line
    still = 0  # steps in a row whose gradient was exactly zero
    while step < args.max_steps:
        t0 = time.time()
        for group in opt.param_groups:
            group["lr"] = learning_rate(args, step, train_seconds)
        stopped = f"stopped without updating. The last good checkpoint (step {saved_step}) is {ckpt_path}; try a lower --lr"
        try:
            loss, drift_norm = drift_step(args, net, encoder, by_class, feats, scales, fields, gen, device, autocast)
        except ValueError as e:  # drift.py refuses non-finite generated features
            raise SystemExit(f"error: step {step + 1}: {e}; {stopped}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        finite = torch.isfinite(loss.detach() + grad_norm).float()
        if world > 1:
            dist.all_reduce(finite, op=dist.ReduceOp.MIN)
        finite, grad_zero = torch.stack([finite, (grad_norm == 0).float()]).tolist()  # one device sync for both
        if not finite:  # stop before the optimiser writes NaN into the weights; the checkpoint stays good
            raise SystemExit(f"error: the loss or its gradient is not finite at step {step + 1}; {stopped}")
        still = still + 1 if grad_zero else 0
        if still == STILL_STEPS:  # nothing moves the weights but weight decay: the run cannot learn from here
            cause = ("every generated pixel is below black, and the drift lifts none of them (BENCHMARKS.md §5c, "
                     "§5s)") if args.black_floor \
                else "the drift is zero everywhere"
            raise SystemExit(f"error: the generator has had no gradient for {still} steps (to step {step + 1}): {cause}. "
                             f"The last checkpoint (step {saved_step}) is {ckpt_path}; start again with other settings")
        opt.step()
        update_ema(ema_model, model, args.ema)
        step += 1
        bar.update(1)
        seconds = time.time() - t0
        sums = [sums[0] + loss.item(), sums[1] + drift_norm.item(), sums[2] + seconds, sums[3] + 1]
        train_seconds += seconds
        if world > 1 and args.time_limit > 0:  # rank 0's clock decides, so that all ranks agree on lr and stopping
            clock = torch.tensor([train_seconds], dtype=torch.float64, device=device)
            dist.broadcast(clock, 0)
            train_seconds = clock.item()
        out_of_time = args.time_limit > 0 and train_seconds > 60 * args.time_limit
        if step % args.log_every == 0 or step == args.max_steps or out_of_time:
            rate = sums[3] / sums[2]
            peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else \
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
            record = {"step": step, "steps_averaged": sums[3], "loss": sums[0] / sums[3], "drift_norm": sums[1] / sums[3],
                      "train_seconds": round(train_seconds, 3), "steps_per_sec": rate,
                      "images_per_sec": rate * world * args.gen_per_class * min(args.classes_per_step, len(by_class)),
                      "peak_mem_gb": peak, "lr": opt.param_groups[0]["lr"]}
            log(record)
            bar.write(f"step {step}: loss {record['loss']:.4f}, drift norm {record['drift_norm']:.4f}, "
                      f"{rate:.2f} steps/s, {record['images_per_sec']:.0f} img/s, peak mem {peak:.2f} GB")
            sums = [0.0, 0.0, 0.0, 0]
        done = step == args.max_steps or out_of_time
        if done or (args.ckpt_every and step % args.ckpt_every == 0):
            checkpoint()
            saved_step = step
        if done or (args.sample_every and step % args.sample_every == 0) or (args.fid_every and step % args.fid_every == 0):
            evaluate(done)
        if out_of_time:
            break
    bar.close()
    if world > 1:  # free DDP (its reducer holds the process group) and wait for rank 0 before the group goes;
        del net  # left to the interpreter's exit, a Gloo worker thread could abort the shutdown
        gc.collect()
        dist.barrier()
        dist.destroy_process_group()
    return {"step": step, "train_seconds": train_seconds, "model": model, "ema": ema_model}


def fid_reference(args, images, inception, device):
    """The FID reference statistics file: --fid-ref as given (.npz), a dataset's cached statistics (mnist:test,
    cifar10), or, by default, those of up to 50,000 training images, computed once and cached by content."""
    import fid
    if args.fid_ref.endswith(".npz"):
        return args.fid_ref
    if args.fid_ref:
        return fid.reference_statistics(args.fid_ref, inception, None, cache_folder(args), args.data_dir, device=device)
    n = min(len(images), 50_000)
    path = os.path.join(cache_folder(args), f"fid-{args.dataset}-{args.data_hash[:12]}-{n}-"
                                            f"{fid.inception_fingerprint(inception)}.npz")
    if not os.path.exists(path):
        index = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))[:n]
        features = fid.get_activations(images[index].permute(0, 2, 3, 1).numpy(), inception, 250, device)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        fid.save_statistics(path, *fid.statistics(features), features)
    return path


def fit_mae(args, images, device, path):
    """The small ResNet as a masked autoencoder (hide 4x4 patches, predict their pixels), written to path."""
    torch.manual_seed(args.seed)
    net, decoder = drift.SmallResNet(images.shape[1]).to(device), drift.MAEDecoder(images.shape[1]).to(device)
    opt = torch.optim.AdamW(list(net.parameters()) + list(decoder.parameters()), lr=1e-3, weight_decay=0.01)
    size = images.shape[-1]
    for step in (bar := tqdm(range(args.encoder_steps), desc="MAE encoder")):
        x = to_float(images[torch.randint(len(images), (args.encoder_batch,))]).to(device)
        mask = (torch.rand(len(x), 1, -(-size // 4), -(-size // 4), device=device) < args.mask_ratio).float()
        mask = F.interpolate(mask, scale_factor=4.0)[..., :size, :size]  # (B, 1, H, W), 1 = hidden
        pred = decoder(net(x * (1 - mask))["stage4"], x.shape[-2:])
        loss = ((pred - x).square() * mask).sum() / (mask.sum() * x.shape[1]).clamp_min(1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0:
            bar.set_postfix(loss=f"{loss.item():.4f}")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    torch.save({"encoder": net.state_dict(), "config": net.config, "dataset": args.dataset}, path + ".tmp")
    os.replace(path + ".tmp", path)
    return path


def train_encoder(args):
    """--stage encoder: train the MAE encoder into <out-dir>/encoder.pt (train.py does this by itself, cached,
    when --encoder mae is given without --encoder-weights)."""
    check_settings(args)
    images, _ = load_dataset(args)
    path = fit_mae(args, images, setup(args)[2], os.path.join(args.out_dir, "encoder.pt"))
    print(f"wrote {path}: use --encoder mae --encoder-weights {path}")
    return path


def parse_args(argv=None):
    """The flags of the defaults block; those the command line leaves out take --dataset's PRESETS, then the
    block's values. args.explicit lists the flags given, so that --resume can tell them apart."""
    import argparse
    helps = dict(re.findall(r"^(\w+) = .*?  # (.*)$", open(__file__).read(), re.M))
    depends = lambda name: [d for d, p in PRESETS.items() if name in p]
    epilog = "defaults that depend on --dataset:\n" + "\n".join(
        f"  {d}: " + ", ".join(f"--{k.replace('_', '-')} {v}" for k, v in p.items()) for d, p in PRESETS.items())
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=epilog,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name, value in _defaults.items():
        note = f" (default: {value}" + (f"; by dataset, see below)" if depends(name) else ")")
        flag, kw = "--" + name.replace("_", "-"), {"default": value, "help": helps.get(name, "") + note}
        if isinstance(value, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif isinstance(value, tuple):
            parser.add_argument(flag, type=float, nargs="+", **kw)
        else:
            parser.add_argument(flag, type=type(value), **kw)
    args = parser.parse_args(argv)
    for action in parser._actions:  # parse again with no defaults: what is left was given
        action.default = argparse.SUPPRESS
    explicit = set(vars(parser.parse_args(argv)))
    preset = PRESETS.get(args.dataset, {})
    for k, v in preset.items():  # encoder comes first, so args.encoder is settled when groups come
        if k == "groups" and args.encoder != preset["encoder"]:
            continue  # a preset's groups name its own encoder's maps; another encoder keeps auto (all its groups)
        if k not in explicit or getattr(args, k) == "auto":
            setattr(args, k, v)
    args.explicit = sorted(explicit)
    return args


def main(argv=None):
    args = parse_args(argv)
    return train_encoder(args) if args.stage == "encoder" else train(args)


if __name__ == "__main__":
    main()
