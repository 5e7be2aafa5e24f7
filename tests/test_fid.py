"""fid.py: the Frechet distance (pytorch-fid's) against closed forms, precision and recall against hand-checked
and extreme cases, statistics files, every image source, the reference cache, the two Inception weight formats,
parity with the features of fid.py's own Inception copy before it moved to pytorch-fid, and the FID-vs-time plot.
CPU, offline; the Inception network is replaced by a tiny one where the maths is what is tested, and randomly
initialised where the loaders are."""

import json
import os
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import pytorch_fid.fid_score
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import fid  # noqa: E402


def random_covariance(d, rng, rank=None):
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


class TinyInception(nn.Module):
    """Stand-in for pytorch-fid's InceptionV3: (N, 3, H, W) -> [(N, 3, 2, 2)], the mean colour of each 2x2 cell."""

    def __init__(self, scale=1.0):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(scale))  # a weight, so that two of them have two fingerprints

    def forward(self, x):
        return [F.adaptive_avg_pool2d(x, 2) * self.scale]


def tiny_network(scale=1.0):
    return TinyInception(scale).eval()


# ---- the Frechet distance (pytorch-fid's) ----------------------------------------------------------------


def test_the_distance_is_pytorch_fids():
    assert fid.calculate_frechet_distance is pytorch_fid.fid_score.calculate_frechet_distance


def test_identical_statistics_give_zero():
    rng = np.random.default_rng(0)
    mu, sigma = rng.standard_normal(16), random_covariance(16, rng)
    assert abs(fid.calculate_frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_equal_covariances_give_squared_mean_distance():
    rng = np.random.default_rng(1)
    mu1, mu2, sigma = rng.standard_normal(16), rng.standard_normal(16), random_covariance(16, rng)
    assert fid.calculate_frechet_distance(mu1, sigma, mu2, sigma) == pytest.approx(np.sum((mu1 - mu2) ** 2), rel=1e-8)


def test_independent_gaussians():
    # N(m1, diag(s1^2)) vs N(m2, diag(s2^2)): d^2 = sum (m1 - m2)^2 + (s1 - s2)^2. Two dimensions, not one:
    # pytorch-fid 0.3.0 unpacks sqrtm(..., disp=False), which SciPy 1.17 returns unpacked for a 1 x 1 matrix.
    m1, s1, m2, s2 = np.array([0.0, 1.5]), np.array([1.0, 0.5]), np.array([10.0, -2.0]), np.array([0.1, 3.0])
    d2 = fid.calculate_frechet_distance(m1, np.diag(s1**2), m2, np.diag(s2**2))
    assert d2 == pytest.approx(np.sum((m1 - m2) ** 2 + (s1 - s2) ** 2), rel=1e-10)


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
    # the usual case of a quick FID (2,000 images, 2048 features)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((30, 64)), rng.standard_normal((31, 64)) + 1
    args = a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
    assert fid.calculate_frechet_distance(*args) == pytest.approx(eigen_frechet_distance(*args), rel=1e-6)


def test_a_zero_product_of_covariances():
    # S1 = diag(1, 0), S2 = diag(0, 1): S1 S2 = 0, its root is 0, so d^2 = Tr S1 + Tr S2 = 2
    s1, s2, mu = np.diag([1.0, 0.0]), np.diag([0.0, 1.0]), np.zeros(2)
    assert fid.calculate_frechet_distance(mu, s1, mu, s2) == pytest.approx(2.0, abs=1e-12)


def test_not_positive_semidefinite_and_mismatched_statistics_are_refused():
    with pytest.raises(ValueError, match="Imaginary component"):
        fid.calculate_frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
    with pytest.raises(ValueError, match="same feature network"):
        fid.fid_precision_recall((np.zeros(4), np.eye(4), None), (np.zeros(8), np.eye(8), None))


# ---- improved precision and recall ----------------------------------------------------------------------


def test_precision_recall_by_hand():
    real = torch.tensor([0.0, 1.0, 2.0, 3.0, 10.0])[:, None]  # (5, 1)
    # k = 1: real radii (1, 1, 1, 1, 7): 0.5 is inside 0's ball, 5 and 17 (on the boundary) inside 10's, 18 outside.
    # fake radii (4.5, 4.5, 1, 1): the reals 0-3 lie within 4.5 of 0.5 or 5; 10 is 5 from 5 and 7 from 17.
    fake = torch.tensor([0.5, 5.0, 17.0, 18.0])[:, None]
    assert fid.precision_recall(real, fake, k=1) == {"precision": 0.75, "recall": 0.8}
    # k = 3: real radii (3, 2, 2, 3, 9), so 10's ball reaches 19 but not 19.5; fake radii (19, 14.5, 18.5, 19)
    fake = torch.tensor([0.5, 5.0, 19.0, 19.5])[:, None]
    assert fid.precision_recall(real, fake, k=3) == {"precision": 0.75, "recall": 1.0}


def test_identical_sets_have_precision_and_recall_one():
    real = np.random.default_rng(7).standard_normal((300, 16))
    assert fid.precision_recall(real, real.copy()) == {"precision": 1.0, "recall": 1.0}


def test_far_apart_sets_have_precision_and_recall_zero():
    real = np.random.default_rng(8).standard_normal((300, 16))
    assert fid.precision_recall(real, real[:200] + 100) == {"precision": 0.0, "recall": 0.0}


def test_a_collapsed_generator_is_precise_but_recalls_nothing():
    rng = np.random.default_rng(9)
    real = rng.standard_normal((300, 16))
    fake = real[0] + 0.01 * rng.standard_normal((100, 16))  # every sample next to one real point
    scores = fid.precision_recall(real, fake)
    assert scores["precision"] == 1.0 and scores["recall"] <= 2 / 300


def brute_force_precision_recall(real, fake, k):
    """float64 transcription of Eq. 1-2 of Kynkaanniemi et al., every distance at once."""
    def inside(x, manifold):
        radii = np.sort(np.linalg.norm(manifold[:, None] - manifold[None], axis=-1), axis=1)[:, k]
        return (np.linalg.norm(x[:, None] - manifold[None], axis=-1) <= radii).any(1).mean()
    return inside(fake, real), inside(real, fake)


def test_blocked_distances_match_a_float64_transcription(monkeypatch):
    rng = np.random.default_rng(10)
    real = rng.standard_normal((120, 8))
    fake = np.concatenate([rng.standard_normal((40, 8)) * 0.5, rng.standard_normal((50, 8)) * 2 + 1])
    monkeypatch.setattr(fid, "DISTANCE_BLOCK", 1000)  # blocks of 8 to 11 rows
    for k in (1, 3, 5):
        scores = fid.precision_recall(real, fake, k=k)
        precision, recall = brute_force_precision_recall(real, fake, k)
        assert 0 < precision < 1 and 0 < recall < 1
        assert scores == {"precision": pytest.approx(precision, abs=1e-12), "recall": pytest.approx(recall, abs=1e-12)}


def test_precision_recall_refuses_too_few_samples_or_mismatched_features():
    with pytest.raises(ValueError, match="more than 3 samples"):
        fid.precision_recall(np.zeros((10, 4)), np.zeros((3, 4)))
    with pytest.raises(ValueError, match="one D"):
        fid.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))


# ---- statistics files -----------------------------------------------------------------------------------


def test_statistics_round_trip_and_pytorch_fid_files(tmp_path):
    rng = np.random.default_rng(4)
    mu, sigma, features = rng.standard_normal(32), random_covariance(32, rng), rng.standard_normal((5, 32))
    fid.save_statistics(tmp_path / "ours.npz", mu, sigma, features)
    mu2, sigma2 = fid.load_statistics(tmp_path / "ours.npz")
    assert np.array_equal(mu, mu2) and np.array_equal(sigma, sigma2) and mu2.dtype == np.float64
    stored = fid.load_features(tmp_path / "ours.npz")
    assert stored.dtype == np.float32 and np.array_equal(stored, features.astype(np.float32))
    with np.load(tmp_path / "ours.npz") as f:  # what pytorch-fid does with our file
        assert np.array_equal(f["mu"][:], mu) and np.array_equal(f["sigma"][:], sigma)
    # a file as pytorch-fid's --save-stats writes it: no features (float32 here, as some tools store them)
    np.savez_compressed(tmp_path / "theirs.npz", mu=mu.astype(np.float32), sigma=sigma.astype(np.float32))
    mu3, sigma3 = fid.load_statistics(tmp_path / "theirs.npz")
    assert mu3.dtype == np.float64 and np.allclose(sigma3, sigma, atol=1e-6)
    assert fid.load_features(tmp_path / "theirs.npz") is None
    assert sorted(os.listdir(tmp_path)) == ["ours.npz", "theirs.npz"]  # no temporary file left behind


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


# ---- image sources and the reference cache ----------------------------------------------------------------


@pytest.fixture
def images():
    return np.random.default_rng(5).integers(0, 256, size=(7, 16, 16, 3), dtype=np.uint8)


class FakeCIFAR10:  # torchvision's layout: .data uint8 (N, H, W, 3); the test split is the training one reversed
    data = None

    def __init__(self, root, train=True, download=False):
        self.data = FakeCIFAR10.data if train else FakeCIFAR10.data[::-1]


def test_every_source_gives_the_same_features(tmp_path, images, monkeypatch):
    model = tiny_network()
    expected = fid.get_activations(images, model, batch_size=3)
    assert expected.dtype == np.float64 and expected.shape == (7, 12)

    folder = tmp_path / "folder"
    folder.mkdir()
    for i, im in enumerate(images):  # lossless PNGs, sorted names in the image order
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    np.savez(tmp_path / "samples.npz", arr_0=images)
    monkeypatch.setattr(FakeCIFAR10, "data", images)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)

    calls = {}

    def load_generator(ckpt_path, device="cpu", ema=True):
        calls["load"] = (ckpt_path, device)
        return "model", {"dataset": "cifar10"}

    def generate_images(model, num_samples, batch_size=256, device="cpu", seed=0, cfg=1.0, classes=None):
        calls["generate"] = (model, num_samples, device)
        return images[:num_samples]

    monkeypatch.setattr(fid.sample, "load_generator", load_generator)
    monkeypatch.setattr(fid.sample, "generate_images", generate_images)

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


def test_preprocess_gives_what_pytorch_fids_network_takes_and_refuses_floats():
    u = torch.randint(0, 256, (2, 5, 7, 3), dtype=torch.uint8)
    x = fid.preprocess(u)  # [0, 1]: InceptionV3 itself resizes to 299 and scales to [-1, 1]
    assert torch.equal(x, u.permute(0, 3, 1, 2).float() / 255)
    with pytest.raises(ValueError, match="uint8"):
        fid.preprocess(u.float())


def test_reference_statistics_are_computed_once_per_source_count_and_network(tmp_path, images, monkeypatch):
    monkeypatch.setattr(FakeCIFAR10, "data", images)
    monkeypatch.setattr("torchvision.datasets.CIFAR10", FakeCIFAR10)
    computed = []
    get_activations = fid.get_activations
    monkeypatch.setattr(fid, "get_activations", lambda x, *args: computed.append(len(x)) or get_activations(x, *args))
    model, cache = tiny_network(), tmp_path / "cache"

    path = fid.reference_statistics("cifar10", model, 6, cache, str(tmp_path))
    assert computed == [6]
    features = get_activations(images[:6], model)
    with np.load(path) as f:
        assert sorted(f.files) == ["features", "mu", "sigma"] and f["features"].dtype == np.float32
        np.testing.assert_allclose(f["features"], features, atol=1e-6)
        np.testing.assert_allclose(f["mu"], features.mean(0), atol=1e-6)
    assert fid.reference_statistics("cifar10:train", model, 6, cache, str(tmp_path)) == path  # cached: no work
    assert computed == [6]
    others = [fid.reference_statistics("cifar10:test", model, 6, cache, str(tmp_path)),
              fid.reference_statistics("cifar10", model, 5, cache, str(tmp_path)),
              fid.reference_statistics("cifar10", tiny_network(2.0), 6, cache, str(tmp_path))]
    assert len({path, *others}) == 4 and computed == [6, 6, 5, 6]
    assert sorted(os.listdir(cache)) == sorted(Path(p).name for p in [path, *others])  # no temporary files
    assert fid.reference_statistics(path, model, 6, cache) == path  # statistics are used as they are


def test_fid_from_images_and_the_command_line(tmp_path, images, monkeypatch, capsys):
    model = tiny_network()
    rng = np.random.default_rng(6)
    flat = lambda colours: np.broadcast_to(colours[:, None, None], (len(colours), 16, 16, 3)).copy()  # noqa: E731
    reference = flat(rng.integers(0, 256, size=(40, 3), dtype=np.uint8))  # one random colour an image
    ref_features = fid.get_activations(reference, model)
    fid.save_statistics(tmp_path / "ref.npz", *fid.statistics(ref_features), ref_features)
    generated = flat(rng.integers(0, 128, size=(30, 3), dtype=np.uint8))  # the darker eighth of the colour cube
    gen_features = fid.get_activations(generated, model)
    mu_g, sigma_g = fid.statistics(gen_features)
    scores = fid.fid_from_images(generated, tmp_path / "ref.npz", model, batch_size=7)
    assert set(scores) == {"fid", "precision", "recall"}
    assert scores["fid"] == pytest.approx(fid.calculate_frechet_distance(mu_g, sigma_g, *fid.statistics(ref_features)),
                                          rel=1e-6) and scores["fid"] > 0.5
    expected = fid.precision_recall(ref_features, gen_features)
    assert scores["precision"] == expected["precision"] and scores["recall"] == expected["recall"]
    assert scores["precision"] > 0.5 and 0 < scores["recall"] < 0.5  # mostly inside the reference, covering little

    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": model)
    np.savez(tmp_path / "gen.npz", arr_0=generated)
    fid.main(["--save-stats", str(tmp_path / "gen.npz"), str(tmp_path / "gen_stats.npz"), "--device", "cpu"])
    fid.main([str(tmp_path / "gen_stats.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    line = f"FID: {scores['fid']:.4f}  precision: {scores['precision']:.4f}  recall: {scores['recall']:.4f}"
    assert line in capsys.readouterr().out

    np.savez(tmp_path / "pytorch_fid.npz", mu=mu_g, sigma=sigma_g)  # statistics without features
    fid.main([str(tmp_path / "pytorch_fid.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    assert f"FID: {scores['fid']:.4f}  precision: n/a  recall: n/a" in capsys.readouterr().out
    assert fid.fid_from_images(generated, tmp_path / "pytorch_fid.npz", model)["precision"] is None

    (tmp_path / "bad.npz").write_bytes(b"\x00" * 100)
    with pytest.raises(SystemExit, match="error: .*bad.npz"):
        fid.main([str(tmp_path / "bad.npz"), str(tmp_path / "ref.npz"), "--device", "cpu"])
    with pytest.raises(SystemExit, match="error: .*not a folder, .npz, .pt checkpoint or dataset name"):
        fid.main(["no-such-source", str(tmp_path / "ref.npz"), "--device", "cpu"])


# ---- the Inception network: pytorch-fid's, from its state dict or the TorchScript file --------------------


def seeded_state_dict(seed=0):
    """Random weights for every conv and batch norm, drawn in name order, with the fc head and counters added."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, p in sorted(fid.inception_skeleton().state_dict().items()):
        if name.endswith("conv.weight"):  # He scale, so the features neither vanish nor explode
            state[name] = torch.randn(p.shape, generator=g) * (2 / p[0].numel()) ** 0.5
        elif name.endswith(("bn.weight", "running_var")):
            state[name] = 0.5 + torch.rand(p.shape, generator=g)
        elif name.endswith(("bn.bias", "running_mean")):
            state[name] = 0.1 * torch.randn(p.shape, generator=g)
        else:  # fc (1008-way logits) and num_batches_tracked: not used by pool3 features
            state[name] = torch.zeros(p.shape, dtype=p.dtype)
    return state


# Features of the seeded network on two seeded 16 x 16 images, computed by fid.py's own FIDInception before
# fid.py moved to pytorch-fid's network (the same seeded weights, drawn in the same name order).
OLD_FEATURES = {"sum": [2947.1332197284864, 3078.834976892169], "sumsq": [12683.895031684586, 13815.114748131573],
                "every512": [[1.2044410705566406, 1.0768299102783203, 2.5850770473480225, 2.5931529998779297],
                             [1.2414143085479736, 1.1607365608215332, 2.559826612472534, 2.7059993743896484]]}


def test_pytorch_fids_network_gives_the_features_of_our_former_copy(tmp_path):
    state = seeded_state_dict()
    torch.save({k: v for k, v in state.items() if not k.startswith("fc.")}, tmp_path / "seeded.pth")
    images = np.random.default_rng(0).integers(0, 256, size=(2, 16, 16, 3), dtype=np.uint8)
    features = fid.get_activations(images, fid.load_inception(tmp_path / "seeded.pth"))  # resized to 299 inside
    np.testing.assert_allclose(features.sum(1), OLD_FEATURES["sum"], rtol=1e-5)
    np.testing.assert_allclose((features ** 2).sum(1), OLD_FEATURES["sumsq"], rtol=1e-5)
    np.testing.assert_allclose(features[:, ::512], OLD_FEATURES["every512"], rtol=1e-5, atol=1e-6)


# StyleGAN/clean-fid TorchScript layer names, written out per block in the file's order -> pytorch-fid names
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


def stylegan_layout_torchscript(state, path):
    """Save a pytorch-fid state dict as a TorchScript module laid out like inception-2015-12-05.pt."""
    pairs = STEM + [(f"mixed{'_' + str(i) if i else ''}.{ts}", f"Mixed_{name}.{ours}")
                    for i, (name, kind) in enumerate(MIXED) for ts, ours in BLOCKS[kind]]
    root = Node()
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


def test_state_dict_and_torchscript_weights_give_the_same_features(tmp_path):
    state = seeded_state_dict(1)
    x = torch.rand(2, 3, 75, 75)  # the smallest input Inception-v3 takes keeps the test fast (no resize below)
    torch.save(state, tmp_path / "pt_inception.pth")  # as pytorch-fid ships it: with the 1008-way logits head
    stylegan_layout_torchscript(state, tmp_path / "inception-2015-12-05.pt")  # TF layout, scale-free batch norm
    features = []
    for model in [fid.fid_inception(state), fid.load_inception(tmp_path / "pt_inception.pth"),
                  fid.load_inception(tmp_path / "inception-2015-12-05.pt")]:
        model.resize_input = False
        with torch.no_grad():
            features.append(model(x)[0].flatten(1))  # (2, 2048)
    torch.testing.assert_close(features[1], features[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(features[2], features[0], atol=1e-4, rtol=1e-4)


TORCHSCRIPT = os.environ.get("FID_INCEPTION_TORCHSCRIPT")
# fid.py before pytorch-fid, with that file on 8 seeded 32 x 32 images: the float64 sums of their 2048 features,
# and the FID between the first and last four. That FID took the former eps retry (it added 1e-6 to both
# diagonals whenever SciPy warned that the product was singular; pytorch-fid does so only when the root is not
# finite), which moves it by 0.004 on 4 samples. On 100 real images a side neither retries and the FIDs are equal.
OLD_REAL_FEATURE_SUMS = [516.454069404248, 538.2071577436691, 561.3958531699664, 493.6641426636197,
                         522.9131981961336, 571.3420258025817, 453.58941924611054, 543.1739716867396]
OLD_REAL_FID = 67.08556648841007


@pytest.mark.skipif(not TORCHSCRIPT, reason="set FID_INCEPTION_TORCHSCRIPT to an inception-2015-12-05 "
                    "TorchScript file to check it (about 20 s)")
def test_a_real_torchscript_network_matches_its_conversion_and_our_former_fid():
    native = torch.jit.load(TORCHSCRIPT).eval()
    layers = native.layers if hasattr(native, "layers") else native.net.layers  # StyleGAN's file, or a wrapped one
    model = fid.load_inception(TORCHSCRIPT)
    x = fid.preprocess(torch.randint(0, 256, (2, 32, 32, 3), dtype=torch.uint8))
    with torch.no_grad():
        resized = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2 - 1
        torch.testing.assert_close(model(x)[0].flatten(1), layers(resized).flatten(1), atol=1e-4, rtol=1e-4)
    images = np.random.default_rng(0).integers(0, 256, size=(8, 32, 32, 3), dtype=np.uint8)
    features = fid.get_activations(images, model)
    np.testing.assert_allclose(features.sum(1), OLD_REAL_FEATURE_SUMS, rtol=1e-7)
    value = fid.calculate_frechet_distance(*fid.statistics(features[:4]), *fid.statistics(features[4:]))
    assert value == pytest.approx(OLD_REAL_FID, abs=0.005)


def test_wrong_networks_and_offline_without_weights_are_refused(tmp_path, monkeypatch):
    torch.save({"conv.weight": torch.zeros(3, 3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not the FID Inception network"):
        fid.load_inception(tmp_path / "other.pth")

    def offline(url, dst, hash_prefix=None, progress=True):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)  # also what pytorch-fid's own loader calls
    with pytest.raises(FileNotFoundError, match=r"put pt_inception-2015-12-05-6726825d.pth .* in .*hub.checkpoints"):
        fid.load_inception()
    cached = tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(seeded_state_dict(), cached)
    assert isinstance(fid.load_inception(), fid.InceptionV3)  # found in the cache, no download


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
