"""train.py as a user meets it off the README's path: repeated and resumed runs, caches, bad settings, non-finite
steps, dataset defaults and data paths. Tiny runs on the CPU; each case here once failed silently or late."""

import hashlib
import json
import os
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
TINY = ["--fake-size", "128", "--classes-per-step", "4", "--gen-per-class", "8", "--pos-per-class", "8",
        "--unc-per-class", "4", "--landmarks", "8", "--log-every", "1", "--sample-every", "0", "--model", "tiny",
        "--lr", "3e-3", "--warmup", "1", "--temperatures", "0.05", "0.2", "--encoder", "pixel", "--patch-size", "0", "--fid-every", "0"]


def fake(tmp_path, name, *extra):
    out = tmp_path / name
    return train.main(["--dataset", "fake", *TINY, "--data-dir", str(tmp_path / "data"), "--out-dir", str(out), *extra]), out


def read_log(out):
    return [json.loads(line) for line in open(out / "log.jsonl")]


def blobs(n=64, size=16, seed=0):
    """n uint8 images [n, size, size, 3] of 4 classes (a bright square in a class-dependent corner) and labels."""
    g = np.random.default_rng(seed)
    x = g.integers(0, 60, (n, size, size, 3), dtype=np.uint8)
    y = np.arange(n) % 4
    for i, k in enumerate(y):
        r, c = divmod(int(k), 2)
        x[i, r * 8:r * 8 + 8, c * 8:c * 8 + 8] = 200
    return x, y


def stop_at(monkeypatch, calls):
    """Make the `calls`-th EMA update raise, as a kill would: after some checkpoint, before the next."""
    real, count = train.update_ema, [0]

    def update(*a):
        count[0] += 1
        if count[0] == calls:
            raise KeyboardInterrupt
        real(*a)
    monkeypatch.setattr(train, "update_ema", update)


def test_resume_continues_exactly(tmp_path, monkeypatch):
    whole, out_whole = fake(tmp_path, "whole", "--max-steps", "8", "--ckpt-every", "3")
    with monkeypatch.context() as m:
        stop_at(m, 5)  # killed in step 5: its checkpoint is step 3, its log already has step 4
        with pytest.raises(KeyboardInterrupt):
            fake(tmp_path, "killed", "--max-steps", "8", "--ckpt-every", "3", "--log-every", "1")
    assert sample.load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["step"] == 3
    # the README's command: only --resume and --out-dir; --log-every 4 is a run-control flag given explicitly
    resumed = train.main(["--resume", "--out-dir", str(tmp_path / "killed"), "--log-every", "4"])
    for key in ("model", "ema"):
        for a, b in zip(whole[key].state_dict().values(), resumed[key].state_dict().values()):
            assert torch.equal(a, b)
    opt_whole = sample.load_checkpoint(str(out_whole / "ckpt.pt"))["optimizer"]["state"]
    opt_resumed = sample.load_checkpoint(str(tmp_path / "killed" / "ckpt.pt"))["optimizer"]["state"]
    for i in opt_whole:
        for k in opt_whole[i]:
            assert torch.equal(opt_whole[i][k], opt_resumed[i][k])
    log = read_log(tmp_path / "killed")
    records = [r for r in log if "drift_norm" in r]
    # the killed run's step-4 line (written after its checkpoint) is gone; the resumed run's first line, at step 4,
    # covers one step since the checkpoint and says so
    assert [(r["step"], r["steps_averaged"]) for r in records] == [(1, 1), (2, 1), (3, 1), (4, 1), (8, 4)]
    assert [r["event"] for r in log if "event" in r] == ["config", "resume"]
    whole_log = {r["step"]: r for r in read_log(out_whole) if "drift_norm" in r}
    assert [r["loss"] for r in records[:4]] == [whole_log[s]["loss"] for s in (1, 2, 3, 4)]
    assert records[4]["loss"] == pytest.approx(np.mean([whole_log[s]["loss"] for s in range(5, 9)]), rel=1e-6)


def test_lr_warms_up_holds_then_falls_to_zero_over_the_decay_fraction_by_steps_or_by_time(tmp_path):
    _, out = fake(tmp_path, "decay", "--max-steps", "10", "--warmup", "2", "--lr-decay", "0.5", "--lr", "1e-2")
    lrs = [r["lr"] for r in read_log(out) if "drift_norm" in r]  # the lr each step ran with
    assert lrs[0] == pytest.approx(0.5e-2) and lrs[1:6] == pytest.approx([1e-2] * 5)  # warm-up, then constant
    assert lrs[5:] == pytest.approx([1e-2, 0.8e-2, 0.6e-2, 0.4e-2, 0.2e-2])  # linear towards 0 at step 10
    args = train.parse_args(["--max-steps", "1000", "--warmup", "1", "--lr", "1e-2", "--lr-decay", "0.5",
                             "--time-limit", "1"])
    assert train.learning_rate(args, 100, 15.0) == pytest.approx(1e-2)  # 10 % of the steps, 25 % of the time
    assert train.learning_rate(args, 100, 45.0) == pytest.approx(0.5e-2)  # the clock is further along: 75 %
    assert train.learning_rate(args, 900, 15.0) == pytest.approx(0.2e-2)  # the steps are: 90 %
    assert train.learning_rate(args, 100, 70.0) == 0  # past the time limit
    args.lr_decay = 0.0
    assert train.learning_rate(args, 999, 59.0) == pytest.approx(1e-2)  # no decay: constant to the end
    with pytest.raises(SystemExit, match="--lr-decay must lie in"):
        fake(tmp_path, "bad", "--lr-decay", "1.5")


def test_resume_keeps_the_run_settings_and_refuses_other_data(tmp_path, monkeypatch):
    with monkeypatch.context() as m:
        stop_at(m, 3)
        with pytest.raises(KeyboardInterrupt):
            fake(tmp_path, "run", "--max-steps", "6", "--ckpt-every", "2")
    with pytest.raises(SystemExit, match="--dataset mnist differs from the checkpoint's fake"):
        train.main(["--resume", "--out-dir", str(tmp_path / "run"), "--dataset", "mnist"])
    with pytest.raises(SystemExit, match="--lr 0.1 differs"):
        train.main(["--resume", "--out-dir", str(tmp_path / "run"), "--lr", "0.1"])
    result = train.main(["--resume", "--out-dir", str(tmp_path / "run")])
    assert result["step"] == 6  # the run's own --max-steps, not the default 2,000
    steps = [r["step"] for r in read_log(tmp_path / "run") if "drift_norm" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    result = train.main(["--resume", "--out-dir", str(tmp_path / "run"), "--max-steps", "7"])  # run control may change
    assert result["step"] == 7
    # a checkpoint from before a setting existed resumes with that setting's default (the behaviour it was
    # trained with), not with today's preset of a dataset (a resume parses as --dataset mnist: black floor on)
    ckpt = sample.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    del ckpt["args"]["black_floor"], ckpt["sha256"]
    sample.save_checkpoint(str(tmp_path / "run" / "ckpt.pt"), ckpt)
    with pytest.raises(SystemExit, match="--black-floor True differs from the checkpoint's False"):
        train.main(["--resume", "--out-dir", str(tmp_path / "run"), "--black-floor"])
    assert train.main(["--resume", "--out-dir", str(tmp_path / "run"), "--max-steps", "8"])["step"] == 8
    assert [r["args"]["black_floor"] for r in read_log(tmp_path / "run") if r.get("event") == "resume"][-1] is False


def test_imagefolder_runs_twice_and_resumes_without_writing_into_the_data(tmp_path):
    x, y = blobs(32)
    for i, (img, k) in enumerate(zip(x, y)):
        os.makedirs(tmp_path / "folder" / f"class{k}", exist_ok=True)
        Image.fromarray(img).save(tmp_path / "folder" / f"class{k}" / f"{i}.png")
    before = sorted(os.listdir(tmp_path / "folder"))
    args = ["--dataset", "imagefolder", "--image-size", "16", *TINY, "--data-dir", str(tmp_path / "folder"),
            "--max-steps", "2", "--landmarks", "4"]
    train.main(args + ["--out-dir", str(tmp_path / "a")])
    train.main(args + ["--out-dir", str(tmp_path / "b")])
    assert train.main(["--resume", "--out-dir", str(tmp_path / "b"), "--max-steps", "3"])["step"] == 3
    assert sorted(os.listdir(tmp_path / "folder")) == before


@pytest.mark.parametrize("where", ["loss", "generator"])
def test_a_run_that_goes_non_finite_stops_and_keeps_its_last_good_checkpoint(tmp_path, monkeypatch, where):
    if where == "loss":  # a NaN loss (and gradient)
        real, count = train.drift_step, [0]

        def poisoned(*a):
            loss, norm = real(*a)
            count[0] += 1
            return (loss * float("nan"), norm) if count[0] == 3 else (loss, norm)
        monkeypatch.setattr(train, "drift_step", poisoned)
        message = r"not finite at step 3.*last good checkpoint \(step 2\)"
    else:  # NaN generated images: drift.py refuses the features, naming them
        real_forward, count = drift.Generator.forward, [0]

        def nan_forward(self, *a):
            out = real_forward(self, *a)
            count[0] += self.training
            return out * float("nan") if self.training and count[0] == 3 else out
        monkeypatch.setattr(drift.Generator, "forward", nan_forward)
        message = r"step 3: x has .* non-finite .*last good checkpoint \(step 2\)"
    with pytest.raises(SystemExit, match=message):
        fake(tmp_path, "run", "--max-steps", "6", "--ckpt-every", "2")
    ckpt = sample.load_checkpoint(str(tmp_path / "run" / "ckpt.pt"))
    assert ckpt["step"] == 2 and all(torch.isfinite(v).all() for v in ckpt["model"].values())


@pytest.mark.parametrize("flags, message", [
    (["--gen-per-class", "1"], "gen-per-class must be at least 2"),
    (["--classes-per-step", "0"], "classes-per-step must be at least 1"),
    (["--log-every", "0"], "log-every must be at least 1"),
    (["--lr", "-1"], "lr must be"),
    (["--temperatures", "0"], "temperatures must be positive"),
    (["--temperatures", "nan"], "temperatures must be positive"),
    (["--patch-size", "5"], "patch size 5 does not divide the image size 16"),
    (["--field", "nystrum"], "unknown field"),
    (["--loc-landmarks", "-1"], "loc-landmarks must be >= 0"),
    (["--extra-negatives", "-1"], "extra-negatives must be >= 0"),
    (["--loc-field", "projected"], "unknown --loc-field"),
    (["--field", "nystrom", "--loc-field", "exact", "--pos-per-class", "0"], "pos-per-class must be at least 1"),
    (["--fid-every", "2", "--fid-ref", "missing.npz"], "missing.npz does not exist"),
    (["--fid-every", "2", "--inception", "missing.pt"], "needs the Inception network"),
])
def test_settings_that_cannot_define_a_run_are_refused_before_any_work(tmp_path, flags, message):
    with pytest.raises(SystemExit, match=message):
        fake(tmp_path, "run", "--max-steps", "2", *flags)
    assert not os.path.exists(tmp_path / "run" / "ckpt.pt") and not os.path.exists(tmp_path / "run" / "log.jsonl")


def test_cuda_without_a_gpu_is_one_message(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit, match="no CUDA GPU"):
        fake(tmp_path, "run", "--device", "cuda")


def test_cfg_power_one_is_the_log_uniform_limit():
    args = train.parse_args(["--cfg-power", "1", "--cfg-max", "4"])
    alpha = train.sample_alpha(20000, args, torch.Generator().manual_seed(0))
    assert alpha.min() >= 1 and alpha.max() <= 4
    assert abs(alpha.log().mean().item() - np.log(2.0)) < 0.02  # log alpha uniform on [0, log 4]
    near = train.sample_alpha(20000, train.parse_args(["--cfg-power", "1.0001", "--cfg-max", "4"]),
                              torch.Generator().manual_seed(0))
    assert torch.allclose(alpha, near, atol=2e-3)  # continuous in k


def test_sample_py_refuses_a_non_finite_cfg(tmp_path):
    _, out = fake(tmp_path, "run", "--max-steps", "1")
    for cfg in ("nan", "inf"):
        done = subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"), "--ckpt", str(out / "ckpt.pt"), "--cfg",
                               cfg, "--grid", str(tmp_path / "g.png")], cwd=ROOT, capture_output=True, text=True)
        assert done.returncode != 0 and "finite" in done.stderr and not os.path.exists(tmp_path / "g.png")


def test_npz_data_path_and_caches_keyed_by_content(tmp_path, private_cache):
    """--dataset cifar10 reads DATA/cifar10_train.npz (x uint8 NHWC, y), the layout get_cifar10.sh writes; new images
    of the same count and size give new features and summaries, not the stale ones."""
    x, y = blobs(64)
    np.savez(tmp_path / "cifar10_train.npz", x=x, y=y)
    args = ["--dataset", "cifar10", *TINY, "--data-dir", str(tmp_path), "--max-steps", "1", "--save-fields"]
    train.main(args + ["--out-dir", str(tmp_path / "a")])
    np.savez(tmp_path / "cifar10_train.npz", x=255 - x, y=y)
    train.main(args + ["--out-dir", str(tmp_path / "b")])
    assert len([f for f in os.listdir(private_cache) if f.startswith("features-")]) == 2
    a, b = (torch.load(tmp_path / d / "fields.pt", weights_only=True)["pixel"]["S"][0] for d in "ab")
    assert not torch.allclose(a, b)
    np.savez(tmp_path / "cifar10_train.npz", images=x)
    with pytest.raises(SystemExit, match="expected x"):
        train.main(args + ["--out-dir", str(tmp_path / "c")])


def test_a_corrupt_feature_cache_is_named_and_rebuilt(tmp_path, private_cache, capsys):
    fake(tmp_path, "a", "--max-steps", "1")
    (path,) = [private_cache / f for f in os.listdir(private_cache) if f.startswith("features-")]
    path.write_bytes(path.read_bytes()[:100])
    fake(tmp_path, "b", "--max-steps", "1")
    assert f"{path} cannot be read" in capsys.readouterr().out
    torch.load(path, weights_only=True)  # rebuilt whole


def test_a_feature_cache_with_other_groups_is_named_and_rebuilt(tmp_path, private_cache, capsys):
    """A cache written when the encoder gave other groups (as the pixel encoder did before its 7x7 blocks) would
    leave the training step without some group's real features: it is named and rebuilt, not used."""
    fake(tmp_path, "a", "--max-steps", "1", "--groups", "pixel,x4.loc")
    (path,) = [private_cache / f for f in os.listdir(private_cache) if f.startswith("features-")]
    feats = torch.load(path, weights_only=True)
    torch.save({"pixel": feats["pixel"]}, path)
    fake(tmp_path, "b", "--max-steps", "1", "--groups", "pixel,x4.loc")
    assert f"{path} holds other groups" in capsys.readouterr().out
    assert set(torch.load(path, weights_only=True)) == {"pixel", "x4.loc"}


def test_loc_landmarks_thin_only_the_per_location_fields(tmp_path):
    """--loc-landmarks M': the per-location groups are fitted on the first M' of each class's landmarks, the whole-image
    group on all of them as before; 0 (the default) and M' = --landmarks both mean all."""
    def fields(name, *flags):
        fake(tmp_path, name, "--field", "nystrom", "--groups", "pixel,x4.loc", "--max-steps", "1", "--save-fields", *flags)
        return torch.load(tmp_path / name / "fields.pt", weights_only=True)
    every, same, thin = fields("a"), fields("b", "--loc-landmarks", "8"), fields("c", "--loc-landmarks", "3")
    for g in ("pixel", "x4.loc"):
        for a, b in zip(every[g]["S"] + every[g]["s"], same[g]["S"] + same[g]["s"]):
            assert torch.equal(a, b)
    for a, b in zip(every["pixel"]["S"], thin["pixel"]["S"]):
        assert torch.equal(a, b)  # (K, 8, 768): the whole image keeps its 8 landmarks a class
    assert every["x4.loc"]["S"][0].shape[-2] == 8 and thin["x4.loc"]["S"][0].shape[-2] == 3  # (16, K, M, 48)
    assert every["x4.loc"]["S"][0].shape[:2] == thin["x4.loc"]["S"][0].shape[:2]


def test_exact_field_takes_its_positives_from_the_feature_cache(tmp_path, monkeypatch):
    fake(tmp_path, "a", "--field", "exact", "--max-steps", "1")  # builds the cache

    def no_real_images(images):
        raise AssertionError("a real image went through the encoder during training")
    monkeypatch.setattr(train, "to_float", no_real_images)
    _, out = fake(tmp_path, "b", "--field", "exact", "--max-steps", "3")
    assert read_log(out)[-1]["step"] == 3


def test_mae_encoder_is_trained_once_cached_and_used(tmp_path, private_cache, capsys):
    extra = ["--encoder", "mae", "--encoder-steps", "2", "--encoder-batch", "8", "--max-steps", "1"]
    fake(tmp_path, "a", *extra)
    assert "training one" in capsys.readouterr().out
    (mae,) = [private_cache / f for f in os.listdir(private_cache) if f.startswith("mae-")]
    stamp = mae.stat().st_mtime_ns
    fake(tmp_path, "b", *extra, "--field", "exact")
    assert "training one" not in capsys.readouterr().out and mae.stat().st_mtime_ns == stamp  # reused
    ckpt = sample.load_checkpoint(str(tmp_path / "b" / "ckpt.pt"))
    assert ckpt["encoder"]["name"] == "mae" and ckpt["encoder"]["sha256"] == hashlib.sha256(mae.read_bytes()).hexdigest()
    assert "stage4.loc" in read_log(tmp_path / "b")[0]["args"]["groups"] or ckpt["args"]["groups"] == ""  # all groups


def test_dataset_defaults_are_what_help_says():
    help_text = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--help"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout
    for name, preset in train.PRESETS.items():
        args = train.parse_args(["--dataset", name])
        line = next(l for l in help_text.splitlines() if l.strip().startswith(f"{name}:"))
        for k, v in preset.items():
            assert getattr(args, k) == v and f"--{k.replace('_', '-')} {v}" in line
    assert train.parse_args(["--dataset", "cifar10", "--landmarks", "7"]).landmarks == 7  # the command line wins
    assert train.parse_args(["--dataset", "cifar10", "--encoder", "auto"]).encoder == "mae"
    # the pixel encoder's groups are no default for a network: MNIST with another encoder uses all its groups
    assert train.parse_args(["--dataset", "mnist", "--encoder", "mae"]).groups == "auto"
    assert train.parse_args(["--dataset", "mnist", "--encoder", "pixel"]).groups == "pixel,e4.loc"
    assert train.parse_args(["--dataset", "mnist", "--encoder", "mae", "--groups", "stage4.mean"]).groups == "stage4.mean"


def test_fid_reference_defaults_to_the_training_images_cached_once(tmp_path, monkeypatch, private_cache):
    import fid
    from test_fid import tiny_network
    monkeypatch.setattr(fid, "load_inception", lambda path=None, device="cpu": tiny_network())
    extra = ["--max-steps", "2", "--fid-every", "2", "--fid-samples", "16"]
    fake(tmp_path, "a", *extra)
    (ref,) = [private_cache / f for f in os.listdir(private_cache) if f.startswith("fid-")]
    with np.load(ref) as f:
        assert f["features"].shape[0] == 128 and np.allclose(f["mu"], f["features"].mean(0))  # all 128 fake images
    stamp = ref.stat().st_mtime_ns
    _, out = fake(tmp_path, "b", *extra)
    assert ref.stat().st_mtime_ns == stamp  # computed once
    (event,) = [r for r in read_log(out) if r.get("event") == "fid"]
    assert event["fid"] > 0 and 0 <= event["precision"] <= 1 and 0 <= event["recall"] <= 1


def test_write_failures_name_the_path_and_leave_nothing_behind(tmp_path):
    with pytest.raises(OSError, match="could not write the checkpoint .*previous one is intact"):
        sample.save_checkpoint(str(tmp_path / "missing" / "ckpt.pt"), {"step": 1})
    assert not os.path.exists(tmp_path / "missing")
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="cannot write to --out-dir"):
        fake(tmp_path, "file/run", "--max-steps", "1")


def test_loc_field_exact_drifts_the_per_location_groups_as_the_exact_field(tmp_path, monkeypatch):
    """--field nystrom --loc-field exact: no Nystrom fields for the per-location groups; they get the exact field against
    the very positives an exact run draws at the same seed, while the whole image keeps its projected field."""
    calls, real = {}, drift.drift_loss

    def record(name):
        def drift_loss(x, y_pos, y_neg, temperatures, field, fields, *a):
            calls.setdefault(name, []).append((x.shape[0], field, y_pos, fields))
            return real(x, y_pos, y_neg, temperatures, field, fields, *a)
        return drift_loss
    flags = ["--groups", "pixel,x4.loc", "--max-steps", "1"]
    monkeypatch.setattr(drift, "drift_loss", record("exact"))
    fake(tmp_path, "a", "--field", "exact", *flags)
    monkeypatch.setattr(drift, "drift_loss", record("mixed"))
    fake(tmp_path, "b", "--field", "nystrom", "--loc-field", "exact", "--save-fields", *flags)
    assert set(torch.load(tmp_path / "b" / "fields.pt", weights_only=True)) == {"pixel"}
    (loc, whole), (loc_exact, _) = calls["mixed"], calls["exact"]  # groups in the encoder's order: x4.loc, pixel
    assert whole[0] == 1 and whole[1] == "nystrom" and whole[2] is None and whole[3] is not None
    assert loc[0] == 16 and loc[1] == "exact" and loc[3] is None
    assert loc_exact[1] == "exact" and torch.equal(loc[2], loc_exact[2])  # the same real positives


def test_a_generator_stuck_below_the_black_floor_is_stopped_with_the_reason(tmp_path, monkeypatch):
    real_forward = drift.Generator.forward

    def all_black(self, *a):  # every pixel pushed below black: max(x, -1) passes no gradient back
        out = real_forward(self, *a)
        return (out - 100).clamp_min(-1) if self.training else out
    monkeypatch.setattr(drift.Generator, "forward", all_black)
    with pytest.raises(SystemExit, match=rf"no gradient for {train.STILL_STEPS} steps \(to step {train.STILL_STEPS}\)"
                                         r": every generated pixel is below black.*last checkpoint \(step 40\)"):
        fake(tmp_path, "run", "--max-steps", "200", "--ckpt-every", "10", "--black-floor")
    monkeypatch.setattr(drift.Generator, "forward", real_forward)  # the same run with gradients goes on to the end
    assert fake(tmp_path, "ok", "--max-steps", str(train.STILL_STEPS + 5), "--ckpt-every", "0", "--black-floor") is not None
