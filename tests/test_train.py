"""train.py and sample.py end to end on tiny fake data (torchvision FakeData, 3x16x16, 4 classes), on the CPU."""

import copy
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import drift
import sample
import train

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--dataset", "fake", "--fake-size", "128", "--classes-per-step", "4", "--gen-per-class", "8",
        "--pos-per-class", "8", "--unc-per-class", "4", "--landmarks", "8", "--log-every", "1", "--sample-every", "0",
        "--model", "tiny", "--lr", "3e-3", "--warmup", "1", "--temperatures", "0.05", "0.2"]


def run(tmp_path, name, *extra):
    out = tmp_path / name
    result = train.main(TINY + ["--data-dir", str(tmp_path / "data"), "--out-dir", str(out), *extra])
    return result, out


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


@pytest.mark.parametrize("field", ["nystrom", "exact"])
def test_training_moves_off_the_zero_start_towards_the_data(tmp_path, field):
    # DiT's zero output layer: every sample starts identical (the default --out-init 1 starts them apart)
    result, out = run(tmp_path, field, "--field", field, "--max-steps", "40", "--ckpt-every", "0", "--ema", "0.8",
                      "--out-init", "0")
    log = read_log(out)
    assert log[0]["event"] == "config" and log[0]["args"]["field"] == field and log[0]["args"]["dataset"] == "fake"
    norms = [r["drift_norm"] for r in log if "drift_norm" in r]
    assert len(norms) == 40 and all(np.isfinite(norms))
    assert {"loss", "train_seconds", "steps_per_sec", "images_per_sec", "peak_mem_gb"} <= set(log[-1])
    if field == "nystrom":  # one-sided attraction to all the data: the raw norm falls as samples reach it
        assert np.mean(norms[-5:]) < 0.5 * np.mean(norms[:3]), norms
    else:  # Algorithm 2 at the identical start: A_pos ~ 0 next to the zero-distance negatives, so the raw norm
        assert np.mean(norms[:3]) < np.mean(norms[-5:]), norms  # starts tiny and grows as the samples spread
    images = sample.generate_images(result["ema"], 40, device="cpu").astype(float)  # class i % 4
    assert images.reshape(40, -1).std(0).mean() > 1  # no longer identical
    colour = images.mean((1, 2))  # (40, 3); fake class k: a red, green, blue or white blob
    for k in range(3):
        assert colour[k::4, k].mean() > 1.3 * np.delete(colour[k::4], k, axis=1).mean(), colour[k::4].mean(0)
    assert os.path.exists(out / "samples" / "step000040.png") and os.path.exists(out / "ckpt.pt")


def test_tampered_or_truncated_checkpoints_are_refused(tmp_path):
    _, out = run(tmp_path, "run", "--max-steps", "2", "--ckpt-every", "2")
    path = str(out / "ckpt.pt")
    ckpt = torch.load(path, weights_only=True)
    ckpt["ema"]["out.bias"] = ckpt["ema"]["out.bias"] + 1e-3  # a changed weight, digest left as it was
    torch.save(ckpt, str(tmp_path / "tampered.pt"))
    with pytest.raises(ValueError, match="integrity check"):
        sample.load_checkpoint(str(tmp_path / "tampered.pt"))
    data = open(path, "rb").read()
    open(tmp_path / "truncated.pt", "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="truncated or corrupt"):
        sample.load_generator(str(tmp_path / "truncated.pt"))


def test_sample_py_writes_what_it_promises_and_reproduces_the_training_grid(tmp_path):
    _, out = run(tmp_path, "run", "--max-steps", "3", "--ckpt-every", "3")
    grid, npz, pngs = tmp_path / "grid.png", tmp_path / "s.npz", tmp_path / "pngs"
    cmd = [sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(out / "ckpt.pt"), "--num-samples", "32",
           "--batch-size", "7", "--classes", "0", "1", "2", "3", "--grid", str(grid), "--npz", str(npz),
           "--png-dir", str(pngs)]
    subprocess.run(cmd, check=True, cwd=ROOT, capture_output=True)
    arr = np.load(npz)["arr_0"]
    assert arr.shape == (32, 16, 16, 3) and arr.dtype == np.uint8
    assert len(os.listdir(pngs)) == 32 and np.array_equal(np.asarray(Image.open(pngs / "000005.png")), arr[5])
    # batch size 7 here, 256 in training: the same images, because sample i's noise is seeded by i
    assert np.array_equal(np.asarray(Image.open(grid)), np.asarray(Image.open(out / "samples" / "step000003.png")))


def test_missing_dataset_is_one_clear_message(tmp_path):
    with pytest.raises(SystemExit, match=r"error: could not load mnist .*--download"):
        train.main(["--dataset", "mnist", "--data-dir", str(tmp_path)])
    with pytest.raises(SystemExit, match="unknown dataset"):
        train.main(["--dataset", "imagenet", "--data-dir", str(tmp_path)])


def test_mae_encoder_stage_then_drifting_with_it(tmp_path):
    path = train.main(TINY + ["--stage", "encoder", "--encoder-steps", "3", "--encoder-batch", "8",
                              "--data-dir", str(tmp_path / "data"), "--out-dir", str(tmp_path / "mae")])
    _, out = run(tmp_path, "run", "--encoder", "mae", "--encoder-weights", path, "--max-steps", "2", "--field", "exact")
    assert read_log(out)[-1]["step"] == 2
    used = sample.load_checkpoint(str(out / "ckpt.pt"))["encoder"]
    assert used["name"] == "mae" and used["sha256"] == drift._sha256(path)  # the stage's encoder, not the pixels


def test_two_gloo_processes_give_the_single_process_summaries(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = TINY + ["--max-steps", "2", "--save-fields", "--data-dir", str(tmp_path / "data"), "--device", "cpu"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={port}", os.path.join(ROOT, "train.py"), *args, "--out-dir", str(tmp_path / "ddp")]
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    train.main(args + ["--out-dir", str(tmp_path / "single")])
    two, one = (torch.load(tmp_path / d / "fields.pt", weights_only=True) for d in ("ddp", "single"))
    assert two.keys() == one.keys()
    for g in one:
        for a, b in zip(two[g]["S"] + two[g]["s"], one[g]["S"] + one[g]["s"]):
            assert torch.allclose(a, b, rtol=1e-9, atol=1e-12)
    assert read_log(tmp_path / "ddp")[-1]["step"] == 2


def test_fid_events_exclude_evaluation_time(tmp_path, monkeypatch):
    import time
    import types

    def slow_fid(images, ref, model, batch_size, device):  # stands in for fid.py: 2 s of "evaluation"
        time.sleep(2.0)
        return {"fid": float(images.mean()), "precision": 1.0, "recall": 0.5}
    fake_fid = types.SimpleNamespace(load_inception=lambda path=None, device="cpu": None, fid_from_images=slow_fid)
    monkeypatch.setitem(sys.modules, "fid", fake_fid)
    (tmp_path / "ref.npz").write_bytes(b"")
    _, out = run(tmp_path, "fid", "--max-steps", "4", "--fid-every", "2", "--fid-samples", "8",
                 "--fid-ref", str(tmp_path / "ref.npz"))
    log = read_log(out)
    fids = [r for r in log if r.get("event") == "fid"]
    assert [r["step"] for r in fids] == [2, 4] and all(r["eval_seconds"] >= 2.0 for r in fids)
    assert all(r["precision"] == 1.0 and r["recall"] == 0.5 for r in fids)
    seconds = {r["step"]: r["train_seconds"] for r in log if "drift_norm" in r}
    assert fids[0]["train_seconds"] == pytest.approx(seconds[2], abs=1e-3)
    assert seconds[3] - seconds[2] < 1.5  # the 2 s of evaluation are not on the training clock


def test_conv_generator_trains_and_comes_back_from_its_checkpoint(tmp_path, monkeypatch):
    result, out = run(tmp_path, "conv", "--model", "conv", "--max-steps", "3", "--ckpt-every", "0")
    model, args = sample.load_generator(str(out / "ckpt.pt"))
    assert isinstance(model, drift.ConvGenerator) and args["model"] == "conv"
    np.testing.assert_array_equal(sample.generate_images(model, 8), sample.generate_images(result["ema"], 8))
    # a registry entry that changed after the checkpoint was written: one clear message, from both readers
    monkeypatch.setitem(drift.GENERATORS, "conv", dict(drift.GENERATORS["conv"], blocks=(3, 3, 3)))
    with pytest.raises(ValueError, match="do not fit --model conv"):
        sample.load_generator(str(out / "ckpt.pt"))
    with pytest.raises(SystemExit, match="do not fit --model conv"):
        run(tmp_path, "conv", "--model", "conv", "--max-steps", "4", "--resume")


def test_bf16_autocast_on_a_cpu_only_where_the_cpu_has_bf16(tmp_path, monkeypatch):
    def weights(name, *extra, steps=3):
        result, _ = run(tmp_path, name, "--model", "conv", "--max-steps", str(steps), "--ckpt-every", "0", *extra)
        return torch.cat([p.detach().flatten() for p in result["model"].parameters()])
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: False)
    fp32 = weights("fp32", "--dtype", "fp32")
    assert torch.equal(weights("no_bf16"), fp32)  # --dtype bf16 (the default) on a CPU without it: fp32, bit for bit
    step = (fp32 - weights("fp32_2", "--dtype", "fp32", steps=2)).norm()  # what the third step moved
    monkeypatch.setattr(train, "cpu_has_bf16", lambda: True)
    bf16 = weights("bf16")
    assert not torch.equal(bf16, fp32)  # the generator ran under autocast...
    assert (bf16 - fp32).norm() < 0.5 * step  # ...and three steps went where fp32's went, to bf16's rounding


def test_extra_negatives_are_the_generators_own_samples_and_count_in_the_cfg_weight(tmp_path, monkeypatch):
    seen, draws = {}, []
    make_noise, drift_loss, sample_alpha = drift.Generator.make_noise, drift.drift_loss, train.sample_alpha

    def noise(self, n, generator=None, device="cpu"):  # a step's second draw is the extra negatives'
        draws.append((copy.deepcopy(self), make_noise(self, n, generator, device)))
        return draws[-1][1]
    monkeypatch.setattr(drift.Generator, "make_noise", noise)
    monkeypatch.setattr(train, "sample_alpha", lambda *a: seen.setdefault("alpha", sample_alpha(*a)))
    monkeypatch.setattr(drift, "drift_loss", lambda x, y_pos, y_neg, *a: seen.update(x=x, y_neg=y_neg, a=a)
                        or drift_loss(x, y_pos, y_neg, *a))
    run(tmp_path, "extra", "--max-steps", "1", "--ckpt-every", "0", "--dtype", "fp32", "--extra-negatives", "5")
    (_, (first, _)), (model, (extra, style)) = draws[:2]  # 4 classes x 8 with gradient, then 4 x 5 without
    x, y_neg, alpha = seen["x"], seen["y_neg"], seen["alpha"]
    weights, classes = seen["a"][3], seen["a"][6]
    assert first.shape[0] == 32 and extra.shape[0] == 20 and y_neg.shape[-2] == 8 + 5 + 4  # + 4 unconditional
    torch.testing.assert_close(y_neg[..., :8, :], x.detach())  # the samples themselves first (self-masked)
    with torch.no_grad():  # then the generator's samples (its weights before the update) of each class, at its CFG scale
        images = model(extra, classes.repeat_interleave(5), alpha.repeat_interleave(5), style)
    torch.testing.assert_close(y_neg[..., 8:13, :], images.flatten(1).view(1, 4, 5, -1))
    torch.testing.assert_close(weights[:, :13], torch.ones(4, 13))  # and the CFG weight counts them ([1] §3.5)
    torch.testing.assert_close(weights[:, 13:], ((alpha - 1) * (8 + 5 - 1) / 4)[:, None].expand(4, 4))
