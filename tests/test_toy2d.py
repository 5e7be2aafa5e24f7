"""toy2d.py: the targets, the quality numbers, and short runs of both fields (CPU, a few seconds)."""

import contextlib
import io
import json
import math
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import toy2d  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """toy2d runs on one thread (main() sets it); do the same for the direct calls, and restore it after."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- targets and quality numbers

def test_checkerboard_samples_lie_in_the_filled_squares():
    y = toy2d.sample_target("checkerboard", 5000, torch.Generator().manual_seed(0))
    cell = torch.floor((y + 3.0) / 1.5).long()  # (n, 2) column and row of each sample
    assert ((cell >= 0) & (cell < 4)).all()
    assert ((cell[:, 0] + cell[:, 1]) % 2 == 0).all()
    counts = torch.bincount(cell[:, 1] * 4 + cell[:, 0], minlength=16)
    assert (counts[counts > 0] > 5000 / 8 * 0.8).all() and (counts > 0).sum() == 8  # all 8 squares, evenly


def test_targets_are_reproducible_from_the_generator():
    for name in toy2d.DATASETS:
        a = toy2d.sample_target(name, 100, torch.Generator().manual_seed(3))
        b = toy2d.sample_target(name, 100, torch.Generator().manual_seed(3))
        assert torch.equal(a, b) and a.shape == (100, 2) and a.abs().max() < toy2d.VIEW


def test_energy_distance_analytic_values():
    # two point masses at distance d: 2d - 0 - 0; a set against itself: 0
    a, b = torch.zeros(3, 2), torch.tensor([[3.0, 4.0]]).repeat(5, 1)
    assert toy2d.energy_distance(a, b) == pytest.approx(10.0, abs=1e-5)
    y = toy2d.sample_target("swissroll", 500, torch.Generator().manual_seed(1))
    assert abs(toy2d.energy_distance(y, y)) < 1e-5
    # {0, 1} on a line against {0}: 2 * 1/2 - 1/2 - 0 = 1/2 (V-statistic, diagonal included)
    assert toy2d.energy_distance(torch.tensor([[0.0, 0.0], [1.0, 0.0]]), torch.zeros(1, 2)) == pytest.approx(0.5)


def test_mode_coverage_of_the_target_and_of_a_collapsed_sampler():
    y = toy2d.sample_target("8gaussians", 20000, torch.Generator().manual_seed(0))
    q = toy2d.mode_coverage(y)
    assert q["modes"] == 1.0
    assert q["near_mode"] == pytest.approx(1 - math.exp(-4.5), abs=0.005)  # P(|N(0, I)| < 3) in 2D
    one_mode = toy2d.mode_centres()[2] + 0.05 * torch.randn(1000, 2)
    assert toy2d.mode_coverage(one_mode)["modes"] == 1 / 8


# ---- training

def test_same_seed_same_result_for_both_fields():
    noise = torch.randn(64, toy2d.NOISE_DIM, generator=torch.Generator().manual_seed(5))
    for kind in toy2d.FIELDS:
        kwargs = dict(steps=10, seed=7, landmarks=32, batch_size=32, fit_samples=512, eval_noise=noise,
                      record_steps={10}, progress=False)
        a = toy2d.train(kind, "swissroll", **kwargs)["records"][10]
        b = toy2d.train(kind, "swissroll", **kwargs)["records"][10]
        c = toy2d.train(kind, "swissroll", **{**kwargs, "seed": 8})["records"][10]
        assert np.array_equal(a, b), kind
        assert not np.allclose(a, c), kind


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """One short run of both fields through main(), as a user would: JSON, samples, pictures."""
    out = tmp_path_factory.mktemp("toy2d")
    argv = ["--steps", "150", "--batch-size", "64", "--landmarks", "64", "--fit-samples", "4096", "--seed", "1",
            "--json", "--out", str(out / "pic"), "--save-samples", str(out / "samples.npz")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        result = toy2d.main(argv)
    return out, result, printed.getvalue()


def test_short_run_improves_on_the_collapsed_start(short_run):
    _, result, _ = short_run
    for kind in toy2d.FIELDS:
        r = result["fields"][kind]
        assert r["steps"] == 150 and r["seconds"] > 0
        # the collapsed start sits ~1.4 away in energy distance; a short run covers most of the way
        assert r["start_energy_distance"] > 1.0
        assert r["energy_distance"] < 0.05 * r["start_energy_distance"], (kind, r)
    assert result["baseline"]["energy_distance"] < 0.01


def test_saved_samples_and_pictures(short_run):
    out, result, _ = short_run
    data = np.load(out / "samples.npz")
    assert {"generated", "target", "generated_exact", "generated_nystrom"} <= set(data.files)
    assert data["generated"].shape == data["target"].shape == (toy2d.EVAL_SAMPLES, 2)
    assert toy2d.EVAL_SAMPLES >= 4000
    assert np.array_equal(data["generated"], data["generated_exact"])
    # the saved arrays are the ones the printed numbers were measured on
    assert toy2d.energy_distance(data["generated_nystrom"], data["target"]) == pytest.approx(
        result["fields"]["nystrom"]["energy_distance"], rel=1e-4)
    png, gif = Image.open(out / "pic.png"), Image.open(out / "pic.gif")
    assert png.format == "PNG" and gif.format == "GIF" and gif.n_frames > 10


def test_json_flag_prints_one_parseable_line(short_run):
    _, result, printed = short_run
    lines = printed.strip().splitlines()
    assert lines[0].lstrip().startswith("exact") and lines[1].lstrip().startswith("nystrom")  # one line per field
    parsed = json.loads(lines[-1])
    assert parsed == json.loads(json.dumps(result))
    for kind in toy2d.FIELDS:
        assert {"seconds", "steps", "energy_distance", "start_energy_distance"} <= set(parsed["fields"][kind])
    assert "energy_distance" in parsed["baseline"]


def test_bad_dataset_is_a_clear_error():
    with pytest.raises(SystemExit) as err:
        toy2d.main(["--dataset", "moons", "--out", ""])
    # SystemExit with a message: Python prints it to stderr and exits with status 1
    message = err.value.code
    assert isinstance(message, str) and message.startswith("error: unknown --dataset 'moons'")
    assert all(name in message for name in toy2d.DATASETS)
