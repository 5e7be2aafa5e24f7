"""
FID with pytorch-fid's Inception network and Frechet distance, improved precision and recall on the same
features, and what pytorch-fid leaves out: image sources, cached reference statistics, offline TorchScript
weights and a plot of FID against training wall-clock time.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted (in float64) to the 2048-d pool3
features of Inception-v3 with the TensorFlow 2015-12-05 weights [1, 2]. The network, its input handling
(bilinear resize to 299, scaling to [-1, 1]) and the distance are pytorch-fid's own code [3]; this file feeds it
uint8 images. Precision and recall [4] ask what share of the generated features lies inside the manifold of the
real ones, and the reverse, with k = 3 nearest neighbours. Statistics files are .npz with `mu` and `sigma`, as
pytorch-fid reads and writes them, plus `features` (float32) for precision and recall. Usage:

    python fid.py samples.npz mnist --data-dir data             # FID, precision, recall of samples against mnist
    python fid.py --save-stats cifar10 stats/cifar10.npz         # reference statistics (and features) of a dataset
    python fid.py run.pt stats/cifar10.npz --num-samples 50000   # one-step samples of a checkpoint
    python fid.py --plot runs/a.jsonl runs/b.jsonl --out fid_vs_time.png

A source is a folder of images, an .npz of uint8 images (arr_0, N x H x W x C, as sample.py writes), an .npz
of statistics, a torchvision dataset name (mnist, fashion-mnist, cifar10; NAME:test for the test split) or
a .pt generator checkpoint. The weights are pytorch-fid's state dict (downloaded once to
torch.hub.get_dir()/checkpoints) or, with --inception PATH, that file or the TorchScript network of
StyleGAN2-ADA/StyleGAN3 and clean-fid [5], whose parameters are mapped into pytorch-fid's network.

References:
1) Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by a Two Time-Scale Update Rule Converge
   to a Local Nash Equilibrium", NeurIPS 2017 (FID; the TTUR code and the 2015-12-05 Inception graph).
2) Dowson, Landau, "The Frechet distance between multivariate normal distributions", J. Multivar. Anal. 1982.
3) Seitzer, pytorch-fid (github.com/mseitzer/pytorch-fid): pytorch_fid.inception.InceptionV3 and
   pytorch_fid.fid_score.calculate_frechet_distance, used here as they are.
4) Kynkaanniemi, Karras, Laine, Lehtinen, Aila, "Improved Precision and Recall Metric for Assessing Generative
   Models", NeurIPS 2019, Section 3 (k-NN balls, k = 3).
5) Karras et al., StyleGAN2-ADA / StyleGAN3 metrics, and Parmar, Zhang, Zhu, "On Aliased Resizing and
   Surprising Subtleties in GAN Evaluation" (clean-fid), CVPR 2022: the TorchScript inception-2015-12-05.pt.
"""

import argparse
import hashlib
import json
import math
import os
import re
import warnings
import zipfile
from pathlib import Path
from unittest import mock

import numpy as np
import pytorch_fid.inception
import torch
import torchvision
from pytorch_fid.fid_score import calculate_frechet_distance  # noqa: F401  (re-exported: the distance papers report)
from pytorch_fid.inception import FID_WEIGHTS_URL, InceptionV3
from tqdm import tqdm

import sample

FID_WEIGHTS_HASH = "6726825d"  # sha256 prefix of pytorch-fid's weights, in the file name as torch.hub expects
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}  # name -> torchvision
CHECKPOINT_SAMPLES = 50_000  # the usual FID-50k when a checkpoint is scored and --num-samples is not given
NEIGHBOURS = 3  # k of improved precision and recall [4]
DISTANCE_BLOCK = 2**24  # distances held at once by precision_recall (64 MiB in float32)

# ----------------------------------------------------------------------------------------------------------
# the Inception network: pytorch-fid's, with weights from its state dict or the TorchScript file


def inception_skeleton():
    """torchvision's Inception-v3 on the meta device: the parameter names and shapes of pytorch-fid's state dict.

    pytorch-fid's FID blocks subclass torchvision's and change only their pooling, so the names are the same.
    """
    with torch.device("meta"):
        return torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)


def convert_torchscript_state_dict(ts_state, skeleton):
    """Parameters of the TorchScript FID network, named as pytorch-fid names them.

    The StyleGAN/clean-fid network keeps, per conv layer P, P.weight, P.beta, P.mean, P.var (batch norm with no
    scale), registered in the same order as torchvision's Inception-v3 registers its conv layers (Mixed_7b: conv =
    branch1x1, tower_conv = branch3x3_1, tower_mixed_conv(_1) = branch3x3_2a(b), tower_1_* = branch3x3dbl_*,
    tower_2_conv = branch_pool), so layers are paired in order and every pair's shape is checked.
    """
    prefixes = [k[: -len(".beta")] for k in ts_state if k.endswith(".beta")]
    layers = [(name, m) for name, m in skeleton.named_modules() if type(m).__name__ == "BasicConv2d"]
    if len(prefixes) != len(layers):
        raise ValueError(f"the TorchScript network has {len(prefixes)} conv layers with batch norm, the FID "
                         f"Inception has {len(layers)}: this is not inception-2015-12-05")
    state = {}
    for p, (name, layer) in zip(prefixes, layers):
        weight = ts_state[p + ".weight"]
        if weight.shape != layer.conv.weight.shape:
            raise ValueError(f"TorchScript layer {p} has shape {tuple(weight.shape)} where {name} needs "
                             f"{tuple(layer.conv.weight.shape)}: this is not inception-2015-12-05")
        state[f"{name}.conv.weight"] = weight
        state[f"{name}.bn.weight"] = torch.ones_like(ts_state[p + ".beta"])
        state[f"{name}.bn.bias"] = ts_state[p + ".beta"]
        state[f"{name}.bn.running_mean"] = ts_state[p + ".mean"]
        state[f"{name}.bn.running_var"] = ts_state[p + ".var"]
    return state


def _is_torchscript(path):
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as z:
        return any(n.endswith("constants.pkl") or "/code/" in n for n in z.namelist())


def inception_state_dict(path):
    """pytorch-fid's state dict, read from its .pth or mapped from the TorchScript network; names and shapes checked."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights at {path}: give pytorch-fid's {Path(FID_WEIGHTS_URL).name} "
                                f"or the TorchScript inception-2015-12-05.pt")
    skeleton = inception_skeleton()
    expected = skeleton.state_dict()
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.9+ calls torch.jit deprecated; the file format is not
            warnings.simplefilter("ignore", FutureWarning)
            state = convert_torchscript_state_dict(torch.jit.load(path, map_location="cpu").state_dict(), skeleton)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for k, v in expected.items():  # the logits and batch-norm counters: in the state dict, unused by pool3
        if k.startswith("fc.") or k.endswith("num_batches_tracked"):
            state.setdefault(k, torch.zeros(v.shape, dtype=v.dtype))
    missing, unexpected = expected.keys() - state.keys(), state.keys() - expected.keys()
    misshapen = sorted(k for k in expected.keys() & state.keys() if state[k].shape != expected[k].shape)
    if missing or unexpected or misshapen:
        raise ValueError(f"{path} is not the FID Inception network: missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]}, wrong shape {misshapen[:3]} ({len(missing)}, "
                         f"{len(unexpected)} and {len(misshapen)} in all)")
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def fid_inception(state_dict):
    """pytorch-fid's InceptionV3 (FID blocks, pool3 output) with these weights, in eval mode.

    Its constructor fetches the weights by URL; it is handed `state_dict` instead, so nothing is downloaded.
    """
    with mock.patch.object(pytorch_fid.inception, "load_state_dict_from_url", lambda *args, **kwargs: state_dict):
        model = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]])  # resizes to 299, scales [0, 1] to [-1, 1]
    return model.eval()


def default_weights():
    """pytorch-fid's weights (or inception-2015-12-05.pt) in torch.hub.get_dir()/checkpoints, downloaded once."""
    cache = Path(torch.hub.get_dir()) / "checkpoints"
    for url in (FID_WEIGHTS_URL, TORCHSCRIPT_URL):
        if (cache / Path(url).name).exists():
            return cache / Path(url).name
    path = cache / Path(FID_WEIGHTS_URL).name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_HASH)
    except OSError as e:  # offline, proxy, read-only cache ...
        raise FileNotFoundError(f"could not download the FID Inception weights ({e}): put {path.name} (from "
                                f"{FID_WEIGHTS_URL}) or inception-2015-12-05.pt (from {TORCHSCRIPT_URL}) in {cache}, "
                                f"or pass --inception PATH") from None
    return path


def load_inception(path=None, device="cpu"):
    """The FID Inception network from a weights file (pytorch-fid's .pth or the TorchScript .pt), or the default."""
    model = fid_inception(inception_state_dict(path or default_weights()))
    return model.to(device, memory_format=torch.channels_last)  # ~1.5x faster on CPU


def inception_fingerprint(model):
    """A short hash of the network's weights: cached statistics are only valid for the weights that made them."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:12]


# ----------------------------------------------------------------------------------------------------------
# features and statistics


def preprocess(images):
    """uint8 images (N, H, W, C), C = 1 or 3 (or grey (N, H, W)) -> float (N, 3, H, W) in [0, 1] for InceptionV3."""
    channels = images.shape[-1] if images.dim() == 4 else 1
    if images.dtype != torch.uint8 or images.dim() not in (3, 4) or channels not in (1, 3):
        raise ValueError(f"images must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.unsqueeze(-1) if images.dim() == 3 else images
    x = x.permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)  # (N, 3, H, W), grey -> RGB
    return x.contiguous(memory_format=torch.channels_last)


def load_image_files(files):
    """Image files (all one size) -> uint8 (N, H, W, 3), read as pytorch-fid reads them (PIL, RGB)."""
    from PIL import Image

    arrays = [np.asarray(Image.open(f).convert("RGB")) for f in files]
    if len({a.shape for a in arrays}) > 1:
        raise ValueError(f"images in a folder must share one size, found {sorted({a.shape for a in arrays})}")
    return np.stack(arrays)


def get_activations(images, model, batch_size=50, device="cpu"):
    """pool3 features, float64 (N, 2048), of uint8 images (N, H, W, C) (array or tensor) or a list of image files."""
    if len(images) == 0:
        raise ValueError("no images to score")
    features = []
    for i in tqdm(range(0, len(images), batch_size), desc="inception features", unit="batch", leave=False):
        batch = images[i: i + batch_size]
        if isinstance(batch, list) and isinstance(batch[0], (str, os.PathLike)):
            batch = load_image_files(batch)
        batch = batch if torch.is_tensor(batch) else torch.from_numpy(np.ascontiguousarray(batch))
        with torch.no_grad():
            pooled = model(preprocess(batch.to(device)))[0]  # (B, 2048, 1, 1), InceptionV3 returns a list
            features.append(pooled.flatten(1).double().cpu())  # (B, 2048)
    return torch.cat(features).numpy()


def statistics(features):
    """Mean and covariance (float64) of features (N, D)."""
    if len(features) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def calculate_activation_statistics(images, model, batch_size=50, device="cpu"):
    """Mean and covariance (float64) of the pool3 features of `images`."""
    return statistics(get_activations(images, model, batch_size, device))


def save_statistics(path, mu, sigma, features=None):
    """Write mu, sigma (float64) and features (float32, when given) to an .npz that pytorch-fid reads, atomically."""
    arrays = {"mu": np.asarray(mu, np.float64), "sigma": np.asarray(sigma, np.float64)}
    if features is not None:
        arrays["features"] = np.asarray(features, np.float32)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **arrays)
    os.replace(tmp, path)


def _npz_keys(path):
    """The array names in an .npz, or one clear ValueError when it is not one."""
    try:
        with np.load(path) as f:
            return sorted(f.files)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, AttributeError) as e:  # AttributeError: a .npy
        raise ValueError(f"{path} is not a readable .npz ({type(e).__name__}: {e})") from None


def load_statistics(path):
    """(mu, sigma) from an .npz with `mu` (D,) and `sigma` (D, D), ours or pytorch-fid's; refuses anything else."""
    keys = _npz_keys(path)
    if not {"mu", "sigma"} <= set(keys):
        raise ValueError(f"{path} holds {keys}, not FID statistics: expected arrays 'mu' and 'sigma'")
    with np.load(path) as f:
        mu, sigma = f["mu"].astype(np.float64), f["sigma"].astype(np.float64)
    if mu.ndim != 1 or sigma.shape != mu.shape * 2 or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} are not a finite mean (D,) and "
                         f"covariance (D, D)")
    return mu, sigma


def load_features(path):
    """The features (N, D) kept beside the statistics in an .npz, or None (pytorch-fid's files have none)."""
    if "features" not in _npz_keys(path):
        return None
    with np.load(path) as f:
        return f["features"]


# ----------------------------------------------------------------------------------------------------------
# improved precision and recall [4]


def precision_recall(real_features, fake_features, k=NEIGHBOURS, device="cpu"):
    """Improved precision and recall [4]: the share of fakes inside the real manifold, and of reals inside the fake one.

    A set's manifold is the union of balls around its samples, each reaching the sample's k-th nearest neighbour
    in the same set (Section 3, Eq. 1-2). Distances are computed in float32, a block of rows at a time.
    """
    real = torch.as_tensor(np.asarray(real_features), dtype=torch.float32, device=device)  # (N, D)
    fake = torch.as_tensor(np.asarray(fake_features), dtype=torch.float32, device=device)  # (M, D)
    if real.dim() != 2 or fake.shape[1:] != real.shape[1:]:
        raise ValueError(f"precision and recall need two feature sets (N, D) of one D, got {tuple(real.shape)} "
                         f"and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"precision and recall with k = {k} need more than {k} samples in each set, got "
                         f"{len(real)} real and {len(fake)} generated")

    def distance_rows(a, b):  # ||a_i - b_j|| for blocks of rows i, (rows, len(b)) each: memory stays bounded
        rows = max(1, DISTANCE_BLOCK // len(b))
        for i in range(0, len(a), rows):
            yield torch.cdist(a[i: i + rows], b)

    def radii(x):  # distance from each sample to its k-th nearest neighbour in x; the sample itself is the 0th
        return torch.cat([d.kthvalue(k + 1, dim=1).values for d in distance_rows(x, x)])  # (len(x),)

    def share_inside(x, manifold):  # share of x inside at least one ball of the manifold
        r = radii(manifold)
        inside = torch.cat([(d <= r).any(dim=1) for d in distance_rows(x, manifold)])  # (len(x),) bool
        return inside.sum().item() / len(inside)

    return {"precision": share_inside(fake, real), "recall": share_inside(real, fake)}


def fid_precision_recall(stats, reference, k=NEIGHBOURS, device="cpu"):
    """{"fid", "precision", "recall"} of stats (mu, sigma, features) against a reference (mu, sigma, features).

    Precision and recall are None when either side has no features (a pytorch-fid statistics file) or only k or
    fewer of them.
    """
    (mu, sigma, features), (mu_ref, sigma_ref, features_ref) = stats, reference
    if mu.shape != mu_ref.shape:
        raise ValueError(f"statistics do not match: mu {mu.shape} vs {mu_ref.shape}; were they made with the same "
                         f"feature network?")
    scores = {"fid": float(calculate_frechet_distance(mu, sigma, mu_ref, sigma_ref)), "precision": None, "recall": None}
    if features is not None and features_ref is not None and min(len(features), len(features_ref)) > k:
        scores |= precision_recall(features_ref, features, k, device)
    return scores


def fid_from_images(images, ref_stats_path, model, batch_size=50, device="cpu"):
    """{"fid", "precision", "recall"} of uint8 images (N, H, W, C) against a reference .npz - what train.py logs."""
    reference = (*load_statistics(ref_stats_path), load_features(ref_stats_path))  # fail before the expensive part
    features = get_activations(images, model, batch_size, device)
    return fid_precision_recall((*statistics(features), features), reference, device=device)


# ----------------------------------------------------------------------------------------------------------
# sources: folder, .npz, dataset name, checkpoint; reference statistics cached


def load_images(source, num_samples=None, data_dir="data", batch_size=50, device="cpu", seed=0):
    """uint8 images (N, H, W, C) or a sorted list of image files, the first num_samples of them.

    A checkpoint (.pt) is sampled in one step per image (num_samples of them, 50k by default), in memory.
    """
    source, path = str(source), Path(source)
    if path.is_dir():
        images = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f"{source} holds no images ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    elif path.suffix == ".npz":
        if "arr_0" not in _npz_keys(path):
            raise ValueError(f"{source} holds {_npz_keys(path)}: expected uint8 images in arr_0 (or mu and sigma)")
        with np.load(path) as f:
            images = f["arr_0"]
    elif path.suffix == ".pt":
        model, _ = sample.load_generator(str(path), device=device)
        n = num_samples or CHECKPOINT_SAMPLES
        return sample.generate_images(model, n, batch_size=batch_size, device=device, seed=seed)
    elif source.split(":")[0] in DATASETS:
        name, _, split = source.partition(":")
        if split not in ("", "train", "test"):
            raise ValueError(f"unknown split {split!r} in {source}: use {name} (train) or {name}:test")
        dataset = getattr(torchvision.datasets, DATASETS[name])(data_dir, train=split != "test", download=True)
        images = np.asarray(dataset.data)  # (N, H, W) grey or (N, H, W, 3)
    else:
        raise ValueError(f"{source} is not a folder, .npz, .pt checkpoint or dataset name ({', '.join(DATASETS)})")
    return images[:num_samples]


def _is_statistics(source):
    return str(source).endswith(".npz") and "mu" in _npz_keys(source)


def compute_statistics_of_path(source, model, batch_size=50, device="cpu", num_samples=None, data_dir="data"):
    """(mu, sigma, features) of any source; an .npz of statistics is read as it is (features None if it has none)."""
    if _is_statistics(source):
        return (*load_statistics(source), load_features(source))
    features = get_activations(load_images(source, num_samples, data_dir, batch_size, device), model, batch_size,
                               device)
    return (*statistics(features), features)


def reference_statistics(source, model, num_samples=None, cache_dir="cache", data_dir="data", batch_size=50,
                         device="cpu"):
    """Path of an .npz (mu, sigma, features) of a reference source, computed the first time only.

    The file is named by the source (dataset name and split, or the file with its size and modification time),
    the sample count and a fingerprint of the Inception weights. A statistics .npz is returned as it is.
    """
    source = str(source)
    if _is_statistics(source):
        return source
    if source in DATASETS:
        source += ":train"  # mnist and mnist:train are the same images
    key = [source, num_samples, inception_fingerprint(model)]
    if os.path.exists(source):
        key += [os.path.abspath(source), os.path.getsize(source), os.path.getmtime(source)]
    slug = re.sub(r"[^A-Za-z0-9]+", "-", Path(source).stem if os.path.exists(source) else source).strip("-")
    digest = hashlib.sha256(json.dumps(key).encode()).hexdigest()[:12]
    path = Path(cache_dir) / f"fid-ref-{slug}-{num_samples or 'all'}-{digest}.npz"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        save_statistics(path, *compute_statistics_of_path(source, model, batch_size, device, num_samples, data_dir))
    return str(path)


# ----------------------------------------------------------------------------------------------------------
# FID against training wall-clock, drawn with PIL

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]


def read_fid_log(path):
    """(label, [(train_seconds, fid), ...]) from a train.py JSONL log."""
    label, points, lines = Path(path).stem, [], Path(path).read_text().splitlines()
    for i, line in enumerate(lines):
        try:
            record = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                continue  # a run still writing its last line
            raise ValueError(f"{path}:{i + 1} is not JSON: a train.py log holds one JSON object per line") from None
        if record.get("event") == "config":
            args = record.get("args", {})
            label = " / ".join(str(args[k]) for k in ("field", "dataset") if args.get(k)) or label
        elif record.get("event") == "fid":
            points.append((float(record["train_seconds"]), float(record["fid"])))
    return label, sorted(points)


def nice_ticks(lo, hi, log=False, count=6):
    """Round tick values covering [lo, hi]: steps 1-2-5 x 10^k (linear) or 1, 2, 5 x 10^k (log)."""
    if log:
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1)
                 for m in (1, 2, 5)]
        return [t for t in ticks if max(t for t in ticks if t <= lo) <= t <= min(t for t in ticks if t >= hi)]
    raw = max(hi - lo, 1e-9) / count
    step = min(s for s in (m * 10.0 ** math.floor(math.log10(raw)) for m in (1, 2, 5, 10)) if s >= raw)
    return [k * step for k in range(math.floor(lo / step), math.ceil(hi / step) + 1)]


def plot_fid_vs_time(jsonl_paths, out_png, title="FID against training wall-clock"):
    """A PNG of FID against training seconds, one line per train.py log (label: field / dataset)."""
    from PIL import Image, ImageDraw, ImageFont

    runs = [read_fid_log(p) for p in jsonl_paths]
    if not any(points for _, points in runs):
        raise ValueError(f'no {{"event": "fid"}} lines in {", ".join(map(str, jsonl_paths))}: '
                         f"train with --fid-every K --fid-ref STATS.npz")
    labels = [label for label, _ in runs]
    runs = [(f"{label} ({Path(p).stem})" if labels.count(label) > 1 else label, points)
            for (label, points), p in zip(runs, jsonl_paths)]
    t_max = max(t for _, points in runs for t, _ in points)
    unit, per = ("h", 3600) if t_max >= 3 * 3600 else ("min", 60) if t_max >= 180 else ("s", 1)
    fids = [f for _, points in runs for _, f in points]
    log = min(fids) > 0 and max(fids) / min(fids) > 5  # FID falls tenfold early on: log keeps the tail legible
    pad = 0 if max(fids) > min(fids) else 1  # a single value still gets an axis around it
    xticks, yticks = nice_ticks(0, max(round(t_max / per, 2), 1)), nice_ticks(min(fids) - pad, max(fids) + pad, log)
    if not log:
        yticks = [t for t in yticks if t >= 0] or [0.0]

    s = 2  # draw at 2x and downsample: smooth lines without an antialiasing rasteriser
    width, height, left, right, top, bottom = 960 * s, 600 * s, 90 * s, 30 * s, 60 * s, 80 * s
    font, small = ImageFont.load_default(size=16 * s), ImageFont.load_default(size=13 * s)
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    fy = (lambda v: math.log10(v)) if log else (lambda v: v)
    x0, x1, y0, y1 = xticks[0], xticks[-1], fy(yticks[0]), fy(yticks[-1])
    px = lambda t: left + (t / per - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    py = lambda v: height - bottom - (fy(v) - y0) / (y1 - y0 or 1) * (height - top - bottom)  # noqa: E731

    for t in xticks:  # grid, ticks and their labels
        x = left + (t - x0) / (x1 - x0) * (width - left - right)
        draw.line([(x, top), (x, height - bottom)], fill="#e6e6e6", width=s)
        draw.text((x, height - bottom + 8 * s), f"{t:g}", fill="black", font=small, anchor="mt")
    for v in yticks:
        draw.line([(left, py(v)), (width - right, py(v))], fill="#e6e6e6", width=s)
        draw.text((left - 8 * s, py(v)), f"{v:g}", fill="black", font=small, anchor="rm")
    draw.rectangle([left, top, width - right, height - bottom], outline="black", width=s)
    draw.text(((left + width - right) / 2, height - 28 * s), f"training wall-clock ({unit}), evaluation time excluded",
              fill="black", font=font, anchor="mm")
    draw.text(((left + width - right) / 2, top / 2), title, fill="black", font=font, anchor="mm")
    ylabel = Image.new("RGB", (200 * s, 24 * s), "white")
    ImageDraw.Draw(ylabel).text((100 * s, 12 * s), "FID" + (" (log scale)" if log else ""), fill="black",
                                font=font, anchor="mm")
    img.paste(ylabel.rotate(90, expand=True), (14 * s, (top + height - bottom) // 2 - 100 * s))

    for k, (label, points) in enumerate(runs):  # the curves, then the legend
        colour = PALETTE[k % len(PALETTE)]
        xy = [(px(t), py(f)) for t, f in points]
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=3 * s, joint="curve")
        for x, y in xy:
            draw.ellipse([x - 4 * s, y - 4 * s, x + 4 * s, y + 4 * s], fill=colour)
    row = 22 * s
    box_w = max(draw.textlength(label, font=small) for label, _ in runs) + 60 * s
    bx, by = width - right - box_w - 12 * s, top + 12 * s
    draw.rectangle([bx, by, bx + box_w, by + row * len(runs) + 12 * s], fill="white", outline="#999999", width=s)
    for k, (label, _) in enumerate(runs):
        y = by + 6 * s + row * k + row / 2
        draw.line([(bx + 10 * s, y), (bx + 40 * s, y)], fill=PALETTE[k % len(PALETTE)], width=3 * s)
        draw.text((bx + 50 * s, y), label, fill="black", font=small, anchor="lm")
    img.resize((width // s, height // s), Image.LANCZOS).save(out_png)


# ----------------------------------------------------------------------------------------------------------


def main(argv=None):
    parser = argparse.ArgumentParser(description="FID, precision and recall between two sources (folder, .npz "
                                     "images or statistics, dataset name, .pt checkpoint), reference statistics, "
                                     "or FID-vs-time plots")
    parser.add_argument("paths", nargs="*", help="two sources, generated then reference; with --save-stats: source "
                        "and output .npz; with --plot: train.py JSONL logs")
    parser.add_argument("--save-stats", action="store_true", help="write the statistics and features of PATH1 to "
                        "PATH2 (.npz)")
    parser.add_argument("--plot", action="store_true", help="plot FID against training time from JSONL logs")
    parser.add_argument("--out", default="fid_vs_time.png", help="PNG written by --plot")
    parser.add_argument("--inception", default=None, help="Inception weights: pytorch-fid .pth or TorchScript .pt "
                        "(default: pytorch-fid's, downloaded to torch.hub.get_dir()/checkpoints)")
    parser.add_argument("--num-samples", type=int, default=None, help="first N images of each source "
                        f"(checkpoints: N samples, default {CHECKPOINT_SAMPLES})")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--data-dir", default="data", help="torchvision root for dataset names")
    args = parser.parse_args(argv)
    try:
        if args.plot:
            plot_fid_vs_time(args.paths, args.out)
            print(f"wrote {args.out}")
            return
        if len(args.paths) != 2:
            parser.error("give two paths: SOURCE SOURCE, or --save-stats SOURCE OUT.npz, or --plot LOG...")
        sources = args.paths[:1] if args.save_stats else args.paths
        model = None if all(map(_is_statistics, sources)) else load_inception(args.inception, args.device)
        stats = lambda p: compute_statistics_of_path(p, model, args.batch_size, args.device,  # noqa: E731
                                                     args.num_samples, args.data_dir)
        if args.save_stats:
            save_statistics(args.paths[1], *stats(args.paths[0]))
            print(f"wrote {args.paths[1]}")
            return
        scores = fid_precision_recall(stats(args.paths[0]), stats(args.paths[1]), device=args.device)
        if scores["precision"] is None:
            print(f"FID: {scores['fid']:.4f}  precision: n/a  recall: n/a  (they need the features of both sources; "
                  f"a statistics file without them: rewrite it with --save-stats)")
        else:
            print(f"FID: {scores['fid']:.4f}  precision: {scores['precision']:.4f}  recall: {scores['recall']:.4f}")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
