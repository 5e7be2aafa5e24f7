"""fid.py: the Frechet distance against closed forms, statistics files, every image source, the two Inception
weight formats, and the FID-vs-time plot. CPU, offline; the Inception network is replaced by a tiny one where
the maths is what is tested, and randomly initialised where the loaders are."""

import json
import os
import sys
import types
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def random_covariance(d, rng, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def tiny_network():
    """Stand-in for Inception: (N, 3, 299, 299) -> (N, 12) mean colour of each 2x2 cell."""
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten()).eval()


# ---- the Frechet distance -------------------------------------------------------------------------------


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_covariance(16, rng)
    assert abs(fid.calculate_frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(16), rng.standard_normal(16), random_covariance(16, rng)
    assert fid.calculate_frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_one_dimensional_gaussians():
    # N(m1, s1^2) vs N(m2, s2^2): d^2 = (m1 - m2)^2 + (s1 - s2)^2
    for m1, s1, m2, s2 in [(0.0, 1.0, 0.0, 1.0), (1.5, 0.5, -2.0, 3.0), (10.0, 2.0, 10.0, 0.1)]:
        d2 = fid.calculate_frechet_distance(np.array([m1]), np.array([[s1**2]]), np.array([m2]), np.array([[s2**2]]))
        assert d2 == pytest.approx((m1 - m2) ** 2 + (s1 - s2) ** 2, rel=1e-10, abs=1e-12)


def eigen_frechet_distance(mu1, s1, mu2, s2):
    """float64 reference: Tr (S1 S2)^(1/2) = Tr (S1^(1/2) S2 S1^(1/2))^(1/2), a symmetric PSD root via eigh."""
    w, v = np.linalg.eigh(s1)
    root1 = v @ np.diag(np.sqrt(np.clip(w, 0, None))) @ v.T
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh(root1 @ s2 @ root1), 0, None)).sum()
    return np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * tr_covmean


def test_general_covariances_match_a_float64_eigen_transcription():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(12), rng.standard_normal(12)
    s1, s2 = random_covariance(12, rng), random_covariance(12, rng)
    assert fid.calculate_frechet_distance(mu1, s1, mu2, s2) == pytest.approx(eigen_frechet_distance(mu1, s1, mu2, s2),
                                                                             rel=1e-9)


def test_rank_deficient_covariances_from_fewer_samples_than_dimensions():
    # the usual case of a quick FID (2,000 images, 2048 features): sqrtm copes without the eps retry
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 64)), rng.standard_normal((31, 64)) + 1
    args = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert fid.calculate_frechet_distance(*args) == pytest.approx(eigen_frechet_distance(*args), rel=1e-6)


def test_singular_product_takes_the_eps_path():
    # S1 = diag(1, 0), S2 = diag(0, 1): S1 S2 = 0. With eps on both diagonals the root is
    # diag(sqrt((1 + eps) eps), sqrt(eps (1 + eps))), so d^2 = 2 - 4 sqrt(eps (1 + eps)), not the 2 of no eps.
    eps = 1e-4
    s1, s2, mu = np.diag([1.0, 0.0]), np.diag([0.0, 1.0]), np.zeros(2)
    with pytest.warns(UserWarning, match="singular"):
        d2 = fid.calculate_frechet_distance(mu, s1, mu, s2, eps=eps)
    assert d2 == pytest.approx(2 - 4 * np.sqrt(eps * (1 + eps)), rel=1e-9)


def test_not_positive_semidefinite_is_refused():
    with pytest.raises(ValueError, match="imaginary component"):
        fid.calculate_frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))


def test_mismatched_dimensions_are_refused():
    with pytest.raises(ValueError, match="same feature network"):
        fid.calculate_frechet_distance(np.zeros(4), np.eye(4), np.zeros(8), np.eye(8))


# ---- statistics files -----------------------------------------------------------------------------------


def test_statistics_round_trip_and_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma = rng.standard_normal(32), random_covariance(32, rng)
    fid.save_statistics(tmp_path / "ours.npz", mu, sigma)
    mu2, sigma2 = fid.load_statistics(tmp_path / "ours.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu2.dtype == np.float64
    with np.load(tmp_path / "ours.npz") as f:  # what pytorch-fid does with our file
        assert np.array_equal(f["mu"][:], mu) and np.array_equal(f["sigma"][:], sigma)
    # a file as pytorch-fid's --save-stats writes it (float32 here, as some tools store them)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, sigma3 = fid.load_statistics(tmp_path / "theirs.npz")
    assert mu3.dtype == np.float64 and np.allclose(sigma3, sigma, atol=1e-6)


def test_corrupt_or_mismatched_statistics_are_refused(tmp_path):
    (tmp_path / "garbage.npz").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(ValueError, match="not a readable .npz"):
        fid.load_statistics(tmp_path / "garbage.npz")
    np.savez(tmp_path / "images.npz", arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="expected arrays 'mu' and 'sigma'"):
        fid.load_statistics(tmp_path / "images.npz")
    np.savez(tmp_path / "shapes.npz", mu=np.zeros(4), sigma=np.eye(3))
    with pytest.raises(ValueError, match="not a finite mean"):
        fid.load_statistics(tmp_path / "shapes.npz")
    np.savez(tmp_path / "nan.npz", mu=np.full(3, np.nan), sigma=np.eye(3))
    with pytest.raises(ValueError, match="not a finite mean"):
        fid.load_statistics(tmp_path / "nan.npz")
    with pytest.raises(ValueError, match="not a readable"):
        fid.fid_from_images(np.zeros((4, 8, 8, 3), np.uint8), tmp_path / "garbage.npz", tiny_network())


# ---- image sources --------------------------------------------------------------------------------------


@pytest.fixture
def images():
    return np.random.default_rng(5).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)


def test_every_source_gives_the_same_features(tmp_path, images, monkeypatch):
    model = tiny_network()
    expected = fid.get_activations(images, model, batch_size=3)
    assert expected.dtype == np.float64 and expected.shape == (7, 12)

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images):  # lossless PNGs, sorted names in the image order
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images)

    class FakeCIFAR10:  # torchvision's layout: .data uint8 (N, H, W, 3)
        def __init__(self, root, train=True, download=False):
            self.data = images if train else images[::-1]

    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)

    calls = {}

    def load_generator(ckpt_path, device="cpu", ema=True):
        calls["load"] = (ckpt_path, device)
        return "model", {"dataset": "cifar10"}

    def generate_images(model, num_samples, batch_size=256, device="cpu", seed=0, cfg=1.0, classes=None):
        calls["generate"] = (model, num_samples, device)
        return images[:num_samples]

    monkeypatch.setattr(fid.drift, "load_generator", load_generator)
    monkeypatch.setattr(fid.drift, "generate_images", generate_images)

    for source in [str(folder), str(tmp_path / "samples.npz"), "cifar10", str(tmp_path / "run.pt")]:
        loaded = fid.load_images(source, num_samples=7, data_dir=str(tmp_path))
        got = fid.get_activations(loaded, model, batch_size=3)
        np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=source)
    assert calls == {"load": (str(tmp_path / "run.pt"), "cpu"), "generate": ("model", 7, "cpu")}
    np.testing.assert_allclose(fid.get_activations(torch.from_numpy(images), model, 4), expected, atol=1e-6)
    test_split = fid.get_activations(fid.load_images("cifar10:test", data_dir=str(tmp_path)), model)
    np.testing.assert_allclose(test_split, expected[::-1], atol=1e-6)
    first3 = fid.load_images(str(tmp_path / "samples.npz"), num_samples=3)
    assert np.array_equal(first3, images[:3])


def test_grey_images_are_repeated_to_three_channels(tmp_path, images, monkeypatch):
    grey = images[..., :1]  # (N, H, W, 1)
    model = tiny_network()
    expected = fid.get_activations(np.repeat(grey, 3, axis=-1), model)
    np.testing.assert_allclose(fid.get_activations(grey, model), expected, atol=1e-6)

    class FakeMNIST:  # torchvision's layout: .data uint8 tensor (N, H, W)
        def __init__(self, root, train=True, download=False):
            self.data = torch.from_numpy(grey[..., 0].copy())

    monkeypatch.setattr("torchvision.datasets.MNIST", FakeMNIST)
    np.testing.assert_allclose(fid.get_activations(fid.load_images("mnist"), model), expected, atol=1e-6)
    for i, im in enumerate(grey[..., 0]):  # mode "L" PNGs, read as pytorch-fid reads them (RGB)
        Image.fromarray(im).save(tmp_path / f"{i}.png")
    np.testing.assert_allclose(fid.get_activations(fid.load_images(str(tmp_path)), model), expected, atol=1e-6)


def test_preprocess_matches_pytorch_fid_scaling_and_refuses_floats():
    u = torch.randint(0, 256, (2, 299, 299, 3), dtype=torch.uint8)
    x = fid.preprocess(u)  # at 299 no resize: exactly 2 u / 255 - 1
    assert torch.allclose(x.double(), 2 * u.permute(0, 3, 1, 2).double() / 255 - 1, atol=1e-6)
    with pytest.raises(ValueError, match="uint8"):
        fid.preprocess(u.float())


def test_fid_from_images_and_the_command_line(tmp_path, images, monkeypatch, capsys):
    model = tiny_network()
    rng = np.random.default_rng(6)
    reference = rng.integers(0, 256, size=(40, 16, 16, 3), dtype=np.uint8)
    mu, sigma = fid.calculate_activation_statistics(reference, model)
    fid.save_statistics(tmp_path / "ref.npz", mu, sigma)
    generated = rng.integers(0, 128, size=(30, 16, 16, 3), dtype=np.uint8)
    mu_g, sigma_g = fid.calculate_activation_statistics(generated, model)
    value = fid.fid_from_images(generated, tmp_path / "ref.npz", model, batch_size=7)
    assert value == pytest.approx(fid.calculate_frechet_distance(mu_g, sigma_g, mu, sigma), rel=1e-10) and value > 1

    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": model)
    np.savez(tmp_path / "gen.npz", arr_0=generated)
    fid.main(["--save-stats", str(tmp_path / "gen.npz"), str(tmp_path / "gen_stats.npz"), "--device", "cpu"])
    fid.main([str(tmp_path / "gen_stats.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    assert f"FID: {value:.4f}" in capsys.readouterr().out
    (tmp_path / "bad.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match="error: .*bad.npz"):
        fid.main([str(tmp_path / "bad.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="error: .*not a folder, .npz, .pt checkpoint or dataset name"):
        fid.main(["no-such-source", str(tmp_path / "ref.npz"), "--device", "cpu"])


# ---- the Inception network: pytorch-fid state dict vs TorchScript ----------------------------------------

# StyleGAN/clean-fid TorchScript layer names, written out per block in the file's order -> FIDInception names
STEM = [("conv", "Conv2d_1a_3x3"), ("conv_1", "Conv2d_2a_3x3"), ("conv_2", "Conv2d_2b_3x3"),
        ("conv_3", "Conv2d_3b_1x1"), ("conv_4", "Conv2d_4a_3x3")]
BLOCKS = {
    "A": [("conv", "branch1x1"), ("tower.conv", "branch5x5_1"), ("tower.conv_1", "branch5x5_2"),
          ("tower_1.conv", "branch3x3dbl_1"), ("tower_1.conv_1", "branch3x3dbl_2"),
          ("tower_1.conv_2", "branch3x3dbl_3"), ("tower_2.conv", "branch_pool")],
    "B": [("conv", "branch3x3"), ("tower.conv", "branch3x3dbl_1"), ("tower.conv_1", "branch3x3dbl_2"),
          ("tower.conv_2", "branch3x3dbl_3")],
    "C": [("conv", "branch1x1"), ("tower.conv", "branch7x7_1"), ("tower.conv_1", "branch7x7_2"),
          ("tower.conv_2", "branch7x7_3")] + [(f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7dbl_{i + 1}")
                                              for i in range(5)] + [("tower_2.conv", "branch_pool")],
    "D": [("tower.conv", "branch3x3_1"), ("tower.conv_1", "branch3x3_2")] +
         [(f"tower_1.conv{'_' + str(i) if i else ''}", f"branch7x7x3_{i + 1}") for i in range(4)],
    "E": [("conv", "branch1x1"), ("tower_conv", "branch3x3_1"), ("tower_mixed_conv", "branch3x3_2a"),
          ("tower_mixed_conv_1", "branch3x3_2b"), ("tower_1_conv", "branch3x3dbl_1"),
          ("tower_1_conv_1", "branch3x3dbl_2"), ("tower_1_mixed_conv", "branch3x3dbl_3a"),
          ("tower_1_mixed_conv_1", "branch3x3dbl_3b"), ("tower_2_conv", "branch_pool")],
}
MIXED = list(zip(["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"], "AAABCCCCDEE"))


class Node(nn.Module):
    def forward(self, x):
        return x


def stylegan_layout_torchscript(model, path):
    """Save `model`'s weights as a TorchScript module laid out like inception-2015-12-05.pt."""
    pairs = STEM + [(f"mixed{'_' + str(i) if i else ''}.{ts}", f"Mixed_{name}.{ours}")
                    for i, (name, kind) in enumerate(MIXED) for ts, ours in BLOCKS[kind]]
    root, state = Node(), model.state_dict()
    for ts, ours in pairs:
        node = root
        for part in ("layers." + ts).split("."):
            if not hasattr(node, part):
                node.add_module(part, Node())
            node = getattr(node, part)
        # TF batch norm has no scale: fold ours (random here) into the weight's output channels
        scale = state[f"{ours}.bn.weight"] / torch.sqrt(state[f"{ours}.bn.running_var"] + 1e-3)
        var = torch.full_like(scale, 1 - 1e-3)  # then (x - mean) / sqrt(var + eps) * scale == x * scale - ...
        node.register_buffer("weight", state[f"{ours}.conv.weight"] * scale[:, None, None, None])
        node.register_buffer("beta", state[f"{ours}.bn.bias"])
        node.register_buffer("mean", state[f"{ours}.bn.running_mean"] * scale)
        node.register_buffer("var", var)
    torch.jit.save(torch.jit.script(root), str(path))


def random_inception(seed=0):
    torch.manual_seed(seed)
    model = fid.FIDInception()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):  # non-trivial statistics, so a misplaced tensor shows
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
    return model.eval()


def test_state_dict_and_torchscript_weights_give_the_same_features(tmp_path):
    model = random_inception()
    x = torch.rand(2, 3, 75, 75) * 2 - 1  # the smallest input Inception-v3 takes keeps the test fast
    with torch.no_grad():
        expected = model(x)

    state = dict(model.state_dict())  # as pytorch-fid ships it: with the 1008-way logits head
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    torch.save(state, tmp_path / "pt_inception.pth")
    stylegan_layout_torchscript(model, tmp_path / "inception-2015-12-05.pt")  # TF layout, scale-free batch norm
    torch.jit.save(torch.jit.trace(model, x, check_trace=False), str(tmp_path / "traced.pt"))  # ours, scripted

    with torch.no_grad():
        from_pth = fid.load_inception(tmp_path / "pt_inception.pth")(x)
        from_traced = fid.load_inception(tmp_path / "traced.pt")(x)
        from_stylegan = fid.load_inception(tmp_path / "inception-2015-12-05.pt")(x)
    torch.testing.assert_close(from_pth, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_traced, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(from_stylegan, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.skipif(not os.environ.get("FID_INCEPTION_TORCHSCRIPT"),
                    reason="set FID_INCEPTION_TORCHSCRIPT to an inception-2015-12-05 TorchScript file to check it")
def test_a_real_torchscript_network_matches_its_conversion():
    path = os.environ["FID_INCEPTION_TORCHSCRIPT"]
    native = torch.jit.load(path).eval()
    layers = native.layers if hasattr(native, "layers") else native.net.layers  # StyleGAN's file, or a wrapped one
    x = fid.preprocess(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    with torch.no_grad():
        torch.testing.assert_close(fid.load_inception(path)(x), layers(x).flatten(1), atol=1e-4, rtol=1e-4)


def test_wrong_networks_and_offline_without_weights_are_refused(tmp_path, monkeypatch):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception network"):
        fid.load_inception(tmp_path / "other.pth")

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(FileNotFoundError, match=r"put pt_inception-2015-12-05-6726825d.pth .* in .*hub.checkpoints"):
        fid.load_inception()
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(random_inception().state_dict(), cached)
    assert isinstance(fid.load_inception(), fid.FIDInception)  # found in the cache, no download


# ---- FID against training time ---------------------------------------------------------------------------


def write_log(path, args, fids, partial_last_line=False):
    lines = [{"event": "config", "args": args}]
    for step, (seconds, value) in enumerate(fids):
        lines.append({"step": step * 100, "loss": 1.0, "drift_norm": 0.5, "train_seconds": seconds})
        lines.append({"event": "fid", "step": step * 100, "fid": value, "train_seconds": seconds, "eval_seconds": 3.0})
    text = "\n".join(json.dumps(x) for x in lines) + "\n"
    path.write_text(text + ('{"step": 9' if partial_last_line else ""))


def test_plot_fid_vs_time_writes_a_png_with_one_line_per_run(tmp_path):
    write_log(tmp_path / "a.jsonl", {"field": "exact", "dataset": "mnist"}, [(0, 300), (60, 80), (120, 30), (300, 12)])
    write_log(tmp_path / "b.jsonl", {"field": "nystrom", "dataset": "mnist"}, [(0, 310), (50, 120), (200, 25)],
              partial_last_line=True)
    write_log(tmp_path / "c.jsonl", {}, [(10, 200), (250, 40)])
    assert fid.read_fid_log(tmp_path / "a.jsonl")[0] == "exact / mnist"
    assert fid.read_fid_log(tmp_path / "b.jsonl")[1] == [(0.0, 310.0), (50.0, 120.0), (200.0, 25.0)]
    assert fid.read_fid_log(tmp_path / "c.jsonl")[0] == "c"  # no field/dataset: the file stem

    out = tmp_path / "fid_vs_time.png"
    fid.plot_fid_vs_time([tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl")], out)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape == (600, 960, 3)
    for colour in fid.PALETTE[:3]:  # each run's colour is drawn
        rgb = np.array([int(colour[i: i + 2], 16) for i in (1, 3, 5)])
        assert (np.abs(img - rgb).sum(-1) < 30).sum() > 100, colour

    write_log(tmp_path / "nofid.jsonl", {"field": "exact"}, [])
    with pytest.raises(ValueError, match="no .*fid.* lines"):
        fid.plot_fid_vs_time([tmp_path / "nofid.jsonl"], out)
