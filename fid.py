"""
Frechet Inception Distance (FID), computed the way the literature computes it, and a plot of FID against
training wall-clock time.

FID = ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between Gaussians fitted (in float64) to the 2048-d pool3
features of Inception-v3 with the TensorFlow 2015-12-05 weights. Images are uint8, resized bilinearly to
299x299 and scaled to [-1, 1] as pytorch-fid does. Statistics files are .npz with `mu` and `sigma`, the same
files pytorch-fid reads and writes. Usage:

    python fid.py samples.npz mnist --data-dir data         # FID between two sources
    python fid.py --save-stats cifar10 stats/cifar10.npz     # reference statistics of a dataset
    python fid.py run.pt stats/cifar10.npz --num-samples 50000   # one-step samples of a checkpoint
    python fid.py --plot runs/a.jsonl runs/b.jsonl --out fid_vs_time.png

A source is a folder of images, an .npz of uint8 images (arr_0, N x H x W x C, as sample.py writes), an .npz
of statistics, a torchvision dataset name (mnist, fashion-mnist, cifar10; NAME:test for the test split) or
a .pt generator checkpoint. The Inception weights are pytorch-fid's state dict (downloaded once to
torch.hub.get_dir()/checkpoints) or, with --inception PATH, that file or the TorchScript network of
StyleGAN2-ADA/StyleGAN3 and clean-fid, whose parameters are mapped into the same network.

References:
1) Heusel, Ramsauer, Unterthiner, Nessler, Hochreiter, "GANs Trained by a Two Time-Scale Update Rule Converge
   to a Local Nash Equilibrium", NeurIPS 2017 (FID; the TTUR code and the 2015-12-05 Inception graph).
2) Dowson, Landau, "The Frechet distance between multivariate normal distributions", J. Multivar. Anal. 1982.
3) Seitzer, pytorch-fid (github.com/mseitzer/pytorch-fid): FIDInception (TF's average pools skip padding, the
   last block max-pools), bilinear resize to 299, the eps retry on a singular product.
4) Karras et al., StyleGAN2-ADA / StyleGAN3 metrics, and Parmar, Zhang, Zhu, "On Aliased Resizing and
   Surprising Subtleties in GAN Evaluation" (clean-fid), CVPR 2022: the TorchScript inception-2015-12-05.pt.
"""

import argparse
import json
import math
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from scipy import linalg
from tqdm import tqdm

import drift

FID_WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                   "pt_inception-2015-12-05-6726825d.pth")
FID_WEIGHTS_HASH = "6726825d"  # sha256 prefix, in the file name as torch.hub expects
TORCHSCRIPT_URL = "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt"
IMAGE_EXTENSIONS = {".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp"}
DATASETS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "cifar10": "CIFAR10"}  # name -> torchvision
CHECKPOINT_SAMPLES = 50_000  # the usual FID-50k when a checkpoint is scored and --num-samples is not given

# ----------------------------------------------------------------------------------------------------------
# the Inception network (pytorch-fid's FIDInception: torchvision's Inception-v3 names, TF's pooling)


class BasicConv2d(nn.Module):
    """conv (no bias) -> batch norm (TF's eps 1e-3) -> ReLU."""

    def __init__(self, c_in, c_out, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel_size, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(c_out, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def tf_avg_pool(x):
    """3x3 average pool that, like TensorFlow's, leaves the zero padding out of the average."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b-5d, 35x35
    def __init__(self, c_in, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 64, 1)
        self.branch5x5_1 = BasicConv2d(c_in, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(c_in, pool_features, 1)

    def forward(self, x):
        b5 = self.branch5x5_2(self.branch5x5_1(x))
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch1x1(x), b5, b3, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a, 35x35 -> 17x17
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3 = BasicConv2d(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(c_in, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), b3, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b-6e, 17x17, factorised 7x7 convolutions
    def __init__(self, c_in, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(c_in, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        bd = x
        for i in range(1, 6):
            bd = getattr(self, f"branch7x7dbl_{i}")(bd)
        return torch.cat([self.branch1x1(x), b7, bd, self.branch_pool(tf_avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a, 17x17 -> 8x8
    def __init__(self, c_in):
        super().__init__()
        self.branch3x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(c_in, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b3 = self.branch3x3_2(self.branch3x3_1(x))
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([b3, b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (average pool) and Mixed_7c (max pool: a quirk of the TF graph), 8x8
    def __init__(self, c_in, pool):
        super().__init__()
        self.pool = pool
        self.branch1x1 = BasicConv2d(c_in, 320, 1)
        self.branch3x3_1 = BasicConv2d(c_in, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(c_in, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(c_in, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        b = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = tf_avg_pool(x) if self.pool == "avg" else F.max_pool2d(x, 3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(b), self.branch3x3dbl_3b(b), self.branch_pool(pooled)], 1)


class FIDInception(nn.Module):
    """Inception-v3 up to pool3: (N, 3, 299, 299) in [-1, 1] -> (N, 2048). State-dict names are pytorch-fid's."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b = InceptionA(192, pool_features=32)
        self.Mixed_5c = InceptionA(256, pool_features=64)
        self.Mixed_5d = InceptionA(288, pool_features=64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b = InceptionC(768, c7=128)
        self.Mixed_6c = InceptionC(768, c7=160)
        self.Mixed_6d = InceptionC(768, c7=160)
        self.Mixed_6e = InceptionC(768, c7=192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b = InceptionE(1280, pool="avg")
        self.Mixed_7c = InceptionE(2048, pool="max")

    def forward(self, x):
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))  # (N, 64, 147, 147)
        x = F.max_pool2d(x, 3, stride=2)  # (N, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (N, 192, 35, 35)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)  # ... -> (N, 2048, 8, 8)
        return x.mean((2, 3))  # (N, 2048) pool3


def convert_torchscript_state_dict(ts_state, model):
    """Parameters of a TorchScript FID network, named as `model` (an FIDInception) names them.

    The StyleGAN/clean-fid network keeps, per conv layer P, P.weight, P.beta, P.mean, P.var (batch norm with no
    scale), registered in the same order as FIDInception's layers (Mixed_7b: conv = branch1x1, tower_conv =
    branch3x3_1, tower_mixed_conv(_1) = branch3x3_2a(b), tower_1_* = branch3x3dbl_*, tower_2_conv =
    branch_pool), so layers are paired in order and every pair's shape is checked.
    """
    ours = model.state_dict()
    if all(k in ts_state for k in ours):  # a scripted FIDInception: already our names
        return {k: ts_state[k] for k in ours}
    prefixes = [k[: -len(".beta")] for k in ts_state if k.endswith(".beta")]
    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, BasicConv2d)]
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


def load_inception(path=None, device="cpu"):
    """The FID Inception network in eval mode, from pytorch-fid's state dict or a TorchScript file.

    With no path: pytorch-fid's weights (or inception-2015-12-05.pt) from torch.hub.get_dir()/checkpoints,
    downloaded there (sha256-checked) on first use.
    """
    with torch.device("meta"):  # no time spent on a random init that the weights replace
        model = FIDInception()
    if path is None:
        cache = Path(torch.hub.get_dir()) / "checkpoints"
        found = [cache / Path(u).name for u in (FID_WEIGHTS_URL, TORCHSCRIPT_URL) if (cache / Path(u).name).exists()]
        path = found[0] if found else cache / Path(FID_WEIGHTS_URL).name
        if not found:
            try:
                cache.mkdir(parents=True, exist_ok=True)
                torch.hub.download_url_to_file(FID_WEIGHTS_URL, str(path), hash_prefix=FID_WEIGHTS_HASH)
            except OSError as e:  # offline, proxy, read-only cache ...
                raise FileNotFoundError(
                    f"could not download the FID Inception weights ({e}): put {path.name} (from {FID_WEIGHTS_URL}) "
                    f"or inception-2015-12-05.pt (from {TORCHSCRIPT_URL}) in {cache}, or pass --inception PATH"
                ) from None
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no Inception weights at {path}: give pytorch-fid's {Path(FID_WEIGHTS_URL).name} "
                                f"or the TorchScript inception-2015-12-05.pt")
    if _is_torchscript(path):
        with warnings.catch_warnings():  # torch 2.9+ calls torch.jit deprecated; the file format is not
            warnings.simplefilter("ignore", FutureWarning)
            scripted = torch.jit.load(path, map_location="cpu")
        state = convert_torchscript_state_dict(scripted.state_dict(), model)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "AuxLogits."))}  # logits: unused
    state = {k: v.float() if v.is_floating_point() else v for k, v in state.items()}
    state |= {k: torch.tensor(0) for k in model.state_dict() if k.endswith("num_batches_tracked") and k not in state}
    missing, unexpected = model.state_dict().keys() - state.keys(), state.keys() - model.state_dict().keys()
    if missing or unexpected:
        raise ValueError(f"{path} is not the FID Inception network: missing {sorted(missing)[:3]}, unexpected "
                         f"{sorted(unexpected)[:3]} ({len(missing)} and {len(unexpected)} in all)")
    try:
        model.load_state_dict(state, assign=True)
    except RuntimeError as e:  # shapes
        raise ValueError(f"{path} is not the FID Inception network: {str(e).splitlines()[1].strip()}") from None
    return model.eval().requires_grad_(False).to(device, memory_format=torch.channels_last)  # ~1.5x faster


# ----------------------------------------------------------------------------------------------------------
# features, statistics and the Frechet distance


def preprocess(images):
    """uint8 images (N, H, W, C), C = 1 or 3 (or grey (N, H, W)) -> float (N, 3, 299, 299) in [-1, 1]."""
    channels = images.shape[-1] if images.dim() == 4 else 1
    if images.dtype != torch.uint8 or images.dim() not in (3, 4) or channels not in (1, 3):
        raise ValueError(f"images must be uint8 N x H x W x C with C = 1 or 3, got {images.dtype} "
                         f"{tuple(images.shape)}")
    x = images.unsqueeze(-1) if images.dim() == 3 else images
    x = x.permute(0, 3, 1, 2).float().div(255).expand(-1, 3, -1, -1)  # (N, 3, H, W) in [0, 1], grey -> RGB
    if x.shape[-2:] != (299, 299):
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


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
            x = preprocess(batch.to(device))  # (B, 3, 299, 299)
            x = x.contiguous(memory_format=torch.channels_last)
            features.append(model(x).double().cpu())  # (B, 2048)
    return torch.cat(features).numpy()


def calculate_activation_statistics(images, model, batch_size=50, device="cpu"):
    """Mean and covariance (float64) of the pool3 features of `images`."""
    act = get_activations(images, model, batch_size, device)
    if len(act) < 2:
        raise ValueError(f"a covariance needs at least 2 images, got {len(act)}")
    return act.mean(axis=0), np.cov(act, rowvar=False)


def calculate_frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """d^2 = ||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)) [2]."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
        raise ValueError(f"statistics do not match: mu {mu1.shape} vs {mu2.shape}, sigma {sigma1.shape} vs "
                         f"{sigma2.shape}; were they made with the same feature network?")
    diff = mu1 - mu2
    with warnings.catch_warnings(record=True) as caught:  # scipy warns (old versions: inf/nan) when singular
        warnings.simplefilter("always", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(sigma1 @ sigma2)
    singular = any(issubclass(w.category, linalg.LinAlgWarning) for w in caught)
    if singular or not np.isfinite(covmean).all():
        warnings.warn(f"FID: singular product sigma1 sigma2; adding {eps} to the diagonal of both covariances")
        offset = np.eye(len(mu1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):  # rounding gives a small imaginary part; a large one means a bad input
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"imaginary component {np.abs(covmean.imag).max():.3g} in sqrtm(sigma1 sigma2): "
                             f"the covariances are not positive semi-definite")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def save_statistics(path, mu, sigma):
    """Write mu and sigma (float64) to an .npz that pytorch-fid reads, atomically."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        np.savez_compressed(f, mu=np.asarray(mu, np.float64), sigma=np.asarray(sigma, np.float64))
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


def fid_from_images(images, ref_stats_path, model, batch_size=50, device="cpu"):
    """FID of uint8 images (N, H, W, C) against reference statistics (.npz) - what train.py logs."""
    mu_ref, sigma_ref = load_statistics(ref_stats_path)  # fail before the expensive part
    mu, sigma = calculate_activation_statistics(images, model, batch_size, device)
    return calculate_frechet_distance(mu, sigma, mu_ref, sigma_ref)


# ----------------------------------------------------------------------------------------------------------
# sources: folder, .npz, dataset name, checkpoint


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
        model, _ = drift.load_generator(str(path), device=device)
        n = num_samples or CHECKPOINT_SAMPLES
        return drift.generate_images(model, n, batch_size=batch_size, device=device, seed=seed)
    elif source.split(":")[0] in DATASETS:
        import torchvision

        name, _, split = source.partition(":")
        if split not in ("", "train", "test"):
            raise ValueError(f"unknown split {split!r} in {source}: use {name} (train) or {name}:test")
        dataset = getattr(torchvision.datasets, DATASETS[name])(data_dir, train=split != "test", download=True)
        images = np.asarray(dataset.data)  # (N, H, W) grey or (N, H, W, 3)
    else:
        raise ValueError(f"{source} is not a folder, .npz, .pt checkpoint or dataset name ({', '.join(DATASETS)})")
    return images[:num_samples]


def compute_statistics_of_path(source, model, batch_size=50, device="cpu", num_samples=None, data_dir="data"):
    """(mu, sigma) of any source; an .npz of statistics is read as it is."""
    source = str(source)
    if source.endswith(".npz") and "mu" in _npz_keys(source):
        return load_statistics(source)
    images = load_images(source, num_samples, data_dir, batch_size, device)
    return calculate_activation_statistics(images, model, batch_size, device)


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
    log = min(fids) > 0 and max(fids) / min(fids) > 20  # FID falls by orders of magnitude early on
    pad = 0 if max(fids) > min(fids) else 1  # a single value still gets an axis around it
    xticks, yticks = nice_ticks(0, max(t_max / per, 1)), nice_ticks(min(fids) - pad, max(fids) + pad, log)
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
    parser = argparse.ArgumentParser(description="FID between two sources (folder, .npz images or statistics, "
                                     "dataset name, .pt checkpoint), reference statistics, or FID-vs-time plots")
    parser.add_argument("paths", nargs="*", help="two sources; with --save-stats: source and output .npz; "
                        "with --plot: train.py JSONL logs")
    parser.add_argument("--save-stats", action="store_true", help="write the statistics of PATH1 to PATH2 (.npz)")
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
        is_stats = lambda p: p.endswith(".npz") and "mu" in _npz_keys(p)  # noqa: E731
        model = None if all(map(is_stats, sources)) else load_inception(args.inception, args.device)
        stats = lambda p: compute_statistics_of_path(p, model, args.batch_size, args.device,  # noqa: E731
                                                     args.num_samples, args.data_dir)
        if args.save_stats:
            save_statistics(args.paths[1], *stats(args.paths[0]))
            print(f"wrote {args.paths[1]}")
            return
        (mu1, sigma1), (mu2, sigma2) = stats(args.paths[0]), stats(args.paths[1])
        print(f"FID: {calculate_frechet_distance(mu1, sigma1, mu2, sigma2):.4f}")
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"error: {e}")


if __name__ == "__main__":
    main()
