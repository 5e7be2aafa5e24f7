"""The encoder wrapper and the generator: feature groups as documented, frozen weights, gradient flow."""

import copy
import os

import pytest
import torch

import drift
import sample


def test_pixel_groups_are_the_documented_statistics():
    torch.manual_seed(0)
    image = torch.rand(3, 2, 16, 16) * 2 - 1  # (N, C, H, W)
    groups = drift.Encoder("pixel", in_channels=2)(image)
    fmap = torch.nn.functional.pixel_unshuffle(image, 4)  # (3, 32, 4, 4): 4x4 pixel blocks
    assert torch.equal(groups["pixel"], image.flatten(1)[None])  # the raw input, one location
    assert torch.allclose(groups["x4.loc"], fmap.flatten(2).permute(2, 0, 1))  # (16 locations, N, 32)
    assert torch.allclose(groups["x4.mean"][0], fmap.mean((2, 3)), atol=1e-6)
    std = (fmap.var((2, 3), unbiased=False) + 1e-6).sqrt()  # eps inside the sqrt
    assert torch.allclose(groups["x4.std"][0], std, atol=1e-5)
    # 2x2 patches of the 4x4 map: 4 locations, location 1 = rows 0-1, columns 2-3
    assert groups["x4.mean2"].shape == (4, 3, 32)
    assert torch.allclose(groups["x4.mean2"][1], fmap[:, :, 0:2, 2:4].mean((2, 3)), atol=1e-6)
    assert torch.allclose(groups["x4.std2"][1], (fmap[:, :, 0:2, 2:4].var((2, 3), unbiased=False) + 1e-6).sqrt(), atol=1e-5)
    assert groups["x4.mean4"].shape == (1, 3, 32)
    assert torch.allclose(groups["x4.mean4"][0], groups["x4.mean"][0], atol=1e-6)  # one 4x4 patch = the whole map
    assert not any(g.startswith("x7.") for g in groups)  # 16 is no multiple of 7


def test_pixel_encoder_7x7_blocks_are_the_image_tiles():
    """On 28x28 images (MNIST's) the pixel encoder also cuts 7x7 blocks: location 4 r + c of x7.loc is the tile at
    rows 7r..7r+6, columns 7c..7c+6, channel by channel, row by row."""
    image = torch.rand(2, 2, 28, 28) * 2 - 1
    groups = drift.Encoder("pixel", in_channels=2)(image)
    assert groups["x7.loc"].shape == (16, 2, 98)
    for r, c in [(0, 0), (1, 3), (3, 2)]:
        assert torch.equal(groups["x7.loc"][4 * r + c], image[:, :, 7 * r:7 * r + 7, 7 * c:7 * c + 7].flatten(1))
    assert groups["x4.loc"].shape == (49, 2, 32)  # the 4x4 blocks as before


def test_edge_energy_is_the_absolute_central_differences_at_two_scales():
    """Against a float64 transcription by slicing (zero padding): across columns, rows and both diagonals, at full
    size and on 2x2 means held 2x2; e4.loc is their mean over each 4x4 block."""
    torch.manual_seed(0)
    x = torch.rand(2, 2, 12, 16, dtype=torch.float64) * 2 - 1

    def reference(t):
        p, (h, w) = torch.nn.functional.pad(t, (1, 1, 1, 1)), t.shape[-2:]
        at = lambda di, dj: p[..., 1 + di:1 + di + h, 1 + dj:1 + dj + w]  # t[i + di, j + dj], 0 outside
        d = [at(0, 1) - at(0, -1), at(1, 0) - at(-1, 0), at(1, 1) - at(-1, -1), at(1, -1) - at(-1, 1)]
        return torch.stack(d, 2).flatten(1, 2).abs() / 2  # (N, 4 C, H, W), colour by colour

    full, half = drift.edge_energy(x)
    assert torch.allclose(full, reference(x))
    coarse = reference(torch.nn.functional.avg_pool2d(x, 2))
    assert torch.allclose(half, coarse.repeat_interleave(2, -2).repeat_interleave(2, -1))
    groups = drift.Encoder("pixel", in_channels=2)(x.float())
    energy = torch.cat([full, half], 1).float()
    assert groups["e4.loc"].shape == (12, 2, 16)  # 3 x 4 blocks, 8 channels a colour
    for r, c in [(0, 0), (1, 2), (2, 3)]:
        assert torch.allclose(groups["e4.loc"][4 * r + c], energy[:, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4].mean((2, 3)), atol=1e-6)


def test_edge_energy_does_not_see_where_stripes_sit():
    """Stripes 2 pixels wide and their copy shifted by a pixel differ in half their pixels, but have the same energy away
    from the border; a flat image has none there."""
    stripes = torch.tensor([1.0, 1.0, -1.0, -1.0]).repeat(4).expand(1, 1, 8, 16)
    shifted = stripes.roll(1, -1)
    assert (stripes != shifted).float().mean() == 0.5
    for a, b in zip(drift.edge_energy(stripes), drift.edge_energy(shifted)):
        assert torch.equal(a[..., 2:-2, 2:-2], b[..., 2:-2, 2:-2])
    assert drift.edge_energy(stripes)[0][0, 0, 2:-2, 2:-2].eq(1).all()  # |1 - (-1)| / 2 across the stripes
    assert drift.edge_energy(torch.full((1, 1, 8, 8), 0.3))[0][..., 1:-1, 1:-1].abs().max() < 1e-7


def test_std_of_constant_features_has_finite_gradient():
    x = torch.zeros(2, 3, 8, 8, requires_grad=True)
    mean, std = drift.patch_statistics(x, 2)
    (mean.sum() + std.sum()).backward()
    assert torch.isfinite(x.grad).all()


def _mae_weights(path, channels=3):
    net = drift.SmallResNet(channels)
    torch.save({"encoder": net.state_dict(), "config": net.config}, path)
    return str(path)


def test_gradients_reach_the_generator_not_the_frozen_encoder(tmp_path):
    torch.manual_seed(0)
    encoder = drift.Encoder("mae", _mae_weights(tmp_path / "enc.pt"), in_channels=3)
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    encoder.train()  # frozen: stays in eval mode
    assert not encoder.training and not any(p.requires_grad for p in encoder.parameters())
    model = drift.Generator(16, 3, 4, patch_size=4, dim=32, depth=1, heads=2, style_tokens=4)
    torch.nn.init.normal_(model.out.weight, std=0.02)  # past the zero init, so the backbone gets gradient too
    noise, style = model.make_noise(8, torch.Generator().manual_seed(0))
    x = model(noise, torch.arange(8) % 4, torch.ones(8), style)
    groups = encoder(x)
    assert set(groups) >= {"stage2.loc", "stage3.std2", "stage4.mean", "pixel"}
    assert groups["stage3.loc"].shape == (16, 8, 128)  # stage3: stride 4 -> 4x4 locations, 128 channels
    real = encoder(torch.rand(8, 3, 16, 16) * 2 - 1)
    loss = sum(drift.drift_loss(g.view(g.shape[0], 2, 4, -1), real[k].view(g.shape[0], 2, 4, -1))[0] for k, g in groups.items())
    loss.backward()
    assert all(p.grad is None for p in encoder.parameters())
    assert model.patch_embed.weight.grad.abs().sum() > 0 and model.blocks[0].modulation.weight.grad.abs().sum() > 0
    torch.optim.SGD(model.parameters(), lr=0.1).step()
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())


def test_generator_starts_at_zero_and_unpatchifies_in_place():
    model = drift.Generator(16, 3, 4, patch_size=4, dim=32, depth=2, heads=2, out_init=0.0)
    noise, style = model.make_noise(5, torch.Generator().manual_seed(1))
    assert torch.equal(model(noise, torch.arange(5) % 4, torch.ones(5), style), torch.zeros(5, 3, 16, 16))  # adaLN-zero
    # an output layer that copies token features to pixels: patch (row 1, col 2), channel 1, pixel (3, 0)
    with torch.no_grad():
        model.out.weight.zero_()
        model.out.bias.zero_()
        model.out.bias[(3 * 4 + 0) * 3 + 1] = 1.0  # output vector ordered (p, p, C)
    x = model(noise, torch.arange(5) % 4, torch.ones(5), style)
    hot = (x[0] != 0).nonzero().tolist()
    assert len(hot) == 16 and [1, 4 * 1 + 3, 4 * 2 + 0] in hot  # one pixel per patch, at the right place


def test_output_init_gives_each_sample_its_own_start_of_the_requested_spread():
    """out_init > 0: the blocks still start as the identity (adaLN-zero), so the output is a per-patch function
    of the noise alone, the same for any class, style or CFG scale, with pixel RMS out_init; 0 is DiT's x = 0."""
    torch.manual_seed(0)
    model = drift.Generator(16, 3, 4, patch_size=4, dim=256, depth=2, heads=2, out_init=0.5)
    noise, style = model.make_noise(256, torch.Generator().manual_seed(1))
    x = model(noise, torch.arange(256) % 4, torch.ones(256), style)
    other_style = model.make_noise(256, torch.Generator().manual_seed(2))[1]
    assert torch.allclose(x, model(noise, (torch.arange(256) + 1) % 4, torch.full((256,), 3.0), other_style), atol=1e-6)
    assert abs(x.pow(2).mean().sqrt().item() - 0.5) < 0.05  # pixel RMS
    assert x.std(0).mean() > 0.25  # most of it varies with the noise (the rest is the position embedding's)
    assert torch.cdist(x.flatten(1), x.flatten(1)).topk(2, largest=False).values[:, 1].min() > 1.0  # no two alike
    # a noise that differs in one patch changes that patch only
    bumped = noise.clone()
    bumped[:, :, 4:8, 8:12] += 1.0
    changed = (model(bumped, torch.arange(256) % 4, torch.ones(256), style) - x).abs().amax((0, 1)) > 1e-6
    assert changed[4:8, 8:12].all() and changed.sum() == 16
    # a checkpoint from before this option (no out_init in its args) rebuilds DiT's zero start
    old = sample.generator_from_args(dict(image_size=16, channels=3, num_classes=4, patch_size=4, style_tokens=4, model="tiny"))
    n, s = old.make_noise(3, torch.Generator().manual_seed(3))
    assert torch.equal(old(n, torch.arange(3), torch.ones(3), s), torch.zeros(3, 3, 16, 16))


def test_black_floor_makes_every_value_below_black_black_and_stops_the_gradient_only_there():
    args = dict(image_size=16, channels=3, num_classes=4, patch_size=4, style_tokens=4, model="tiny", out_init=2.0)
    free, floored = sample.generator_from_args(args), sample.generator_from_args(dict(args, black_floor=True))
    floored.load_state_dict(free.state_dict())
    noise, style = free.make_noise(8, torch.Generator().manual_seed(1))
    labels, alpha = torch.arange(8) % 4, torch.ones(8)
    x, y = free(noise, labels, alpha, style), floored(noise, labels, alpha, style)
    below = x < -1
    assert 0.1 < below.float().mean() < 0.5 and (x > 1).any()  # at RMS 2 many pixels leave [-1, 1] on both sides
    assert torch.equal(y[below], torch.full_like(y[below], -1.0)) and torch.equal(y[~below], x[~below])  # above: as is
    # a loss on the floored image: the gradient of the pixels below black is 0, the others' as without the floor
    target = torch.randn_like(x)
    (gx,) = torch.autograd.grad((x * target * ~below).sum(), free.out.weight)
    (gy,) = torch.autograd.grad((y * target).sum(), floored.out.weight)
    assert torch.allclose(gx, gy, rtol=1e-5, atol=1e-6) and gy.abs().sum() > 0
    # checkpoints from before this option have no black_floor in their args: no floor
    assert sample.generator_from_args(args).black_floor is False


def test_black_floor_passes_a_lifting_gradient_only_to_a_sample_wholly_below_black():
    x = torch.randn(4, 2, 5, 5, dtype=torch.float64) * 2
    x[2] = -1.5 - torch.rand(2, 5, 5)  # every pixel of sample 2 below black
    x[3] = -1.5 - torch.rand(2, 5, 5)
    x[3, 1, 2, 2] = -0.5  # sample 3: one pixel above, so it is alive
    x.requires_grad_()
    g = torch.randn_like(x)
    y = drift.BlackFloor.apply(x)
    assert torch.equal(y, x.clamp_min(-1))
    (grad,) = torch.autograd.grad(y, x, g)
    expect = g * (x > -1)  # max's own gradient...
    expect[2] = g[2] * (g[2] < 0)  # ...but the dead sample hears every gradient that would lift a pixel
    assert torch.equal(grad, expect) and (grad[2] != 0).any() and (grad[2] <= 0).all()
    assert torch.count_nonzero(grad[3]) == 1  # the live sample with one pixel above black: only that one


def test_a_generator_whose_every_pixel_fell_below_black_comes_back_when_the_drift_lifts_it():
    """With max(x, -1)'s own gradient (0 below -1) such a generator could never move again (train.py stopped those
    runs); the floor's backward lets a drift that lifts a pixel reach a sample wholly below black, none that
    pushes it down, and from the moment a sample has a pixel above black it is max's gradient again."""
    torch.manual_seed(0)
    gen = sample.generator_from_args(dict(image_size=16, channels=1, num_classes=2, patch_size=4, style_tokens=0,
                                          model="tiny", black_floor=True))
    with torch.no_grad():
        gen.out.bias.fill_(-3.0)  # every pixel below black
    noise, _ = gen.make_noise(4, torch.Generator().manual_seed(0))
    labels, alpha = torch.tensor([0, 1, 0, 1]), torch.ones(4)
    # where the drift asks for ink: the middle 2x2 pixels of every 4x4 patch, which the output layer alone can draw
    middle = torch.tensor([False, True, True, False])
    in_patch = middle[:, None] & middle[None, :]  # (4, 4)
    ink = in_patch.repeat(4, 4).view(1, 1, 16, 16)
    target = torch.where(ink, 0.5, -1.5)  # the drift points to grey ink there, further below black elsewhere
    y = gen(noise, labels, alpha)
    assert torch.equal(y, torch.full_like(y, -1.0))
    (g_down,) = torch.autograd.grad((y * ~ink).sum(), gen.out.bias)  # pushing down only (g > 0): nothing passes
    assert torch.equal(g_down, torch.zeros_like(g_down))
    gen.black_floor = False  # max's own gradient: the lift cannot reach a pixel below black
    (g_max,) = torch.autograd.grad(-(gen(noise, labels, alpha).clamp_min(-1) * ink).sum(), gen.out.bias)
    gen.black_floor = True
    (g_lift,) = torch.autograd.grad(-(gen(noise, labels, alpha) * ink).sum(), gen.out.bias)
    lifted = in_patch.flatten()  # the bias is ordered (row, column, channel) in a patch
    assert torch.equal(g_max, torch.zeros_like(g_max)) and (g_lift[lifted] < 0).all() and (g_lift[~lifted] == 0).all()
    # only the output layer learns: with every layer at this lr, whole samples came back and fell again, and the 60th
    # step caught them up on one CPU and down on another (the floor's part is the same either way)
    opt = torch.optim.Adam(gen.out.parameters(), lr=0.05)
    for _ in range(60):
        y = gen(noise, labels, alpha)
        loss = (y - target).square().sum()  # the drift loss |y - stopgrad(y + V)|^2 with V = target - y
        opt.zero_grad()
        loss.backward()
        opt.step()
    y = gen(noise, labels, alpha).detach()
    assert torch.equal(y > -1, ink.expand_as(y))  # all the ink came back, and only where it was asked for


def test_dit_attention_under_cpu_bf16_autocast_matches_float64_without_torchs_cpu_flash_kernel(monkeypatch):
    """Under CPU bf16 autocast the block computes softmax(q k^T / sqrt(d)) v itself: torch's CPU flash kernel's
    backward is several times slower in bf16 (BENCHMARKS.md §5s). Forward and backward against float64 SDPA."""
    torch.manual_seed(0)
    block = drift.Block(64, 4)
    x, c = torch.randn(6, 16, 64), torch.randn(6, 64)
    seen = {}
    block.proj.register_forward_hook(lambda m, inp, out: seen.__setitem__(inp[0].dtype, inp[0]))  # the attention
    ref = copy.deepcopy(block).double()
    x64 = x.double().requires_grad_()
    (ref(x64, c.double()) * torch.linspace(-1, 1, 64, dtype=torch.float64)).sum().backward()
    real_sdpa = torch.nn.functional.scaled_dot_product_attention

    def refuse(*a, **k):
        raise AssertionError("the CPU bf16 path must not call scaled_dot_product_attention")
    monkeypatch.setattr(drift.F, "scaled_dot_product_attention", refuse)
    xb = x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = block(xb, c)
    (out.float() * torch.linspace(-1, 1, 64)).sum().backward()
    monkeypatch.setattr(drift.F, "scaled_dot_product_attention", real_sdpa)
    h, h64 = seen[torch.bfloat16].double(), seen[torch.float64]
    assert (h - h64).norm() / h64.norm() < 1e-2
    assert (xb.grad.double() - x64.grad).norm() / x64.grad.norm() < 2e-2
    # the scale matters: without 1/sqrt(d) the attention would be off by far more than bf16's rounding
    q, k, v = ref.qkv(drift.modulate(ref.norm1(x64.detach()), *ref.modulation(torch.nn.functional.silu(
        c.double())).chunk(6, -1)[:2])).view(6, 16, 3, 4, 16).permute(2, 0, 3, 1, 4)
    unscaled = (q @ k.transpose(-2, -1)).softmax(-1) @ v
    assert (unscaled.transpose(1, 2).reshape(6, 16, 64) - h64).norm() / h64.norm() > 0.1


def test_bad_encoder_names_and_weights_fail_clearly(tmp_path):
    with pytest.raises(ValueError, match="unknown encoder 'vgg'.*pixel"):
        drift.Encoder("vgg")
    with pytest.raises(ValueError, match="--stage encoder"):
        drift.Encoder("mae")
    with pytest.raises(ValueError, match="does not exist"):
        drift.Encoder("resnet18", str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="takes 3 channels"):
        drift.Encoder("mae", _mae_weights(tmp_path / "enc.pt", 3), in_channels=1)


def test_scripts_import_drift_and_never_each_other_in_a_circle():
    """The arrows run from the scripts to drift.py: walk every script's top-level and lazy imports of the
    project's own modules and require that no module reaches itself again."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    modules = [f[:-3] for f in os.listdir(root) if f.endswith(".py")]
    edges = {}
    for m in modules:
        tree = ast.parse(open(os.path.join(root, m + ".py")).read())
        names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        edges[m] = names & set(modules)
    assert edges["drift"] == set(), edges["drift"]
    for start in modules:
        seen, todo = set(), list(edges[start])
        while todo:
            m = todo.pop()
            assert m != start, f"{start}.py reaches itself through its imports: {edges}"
            if m not in seen:
                seen.add(m)
                todo += edges[m]


def test_conv_generator_starts_as_a_function_of_its_noise_with_the_requested_spread():
    torch.manual_seed(0)
    model = drift.ConvGenerator(16, 3, 4, dim=32, widths=(32, 16), blocks=(1, 1), style_tokens=4, out_init=0.5)
    noise, style = model.make_noise(256, torch.Generator().manual_seed(1))
    h, c = torch.randn(4, 16, 8, 8), torch.randn(4, 32)
    assert torch.equal(model.stages[1][0](h, c), h)  # every block starts as the identity
    labels = torch.arange(256) % 4
    with torch.no_grad():
        x = model(noise, labels, torch.ones(256), style)
        rms = x.pow(2).mean().sqrt().item()
        other = model(model.make_noise(256, torch.Generator().manual_seed(2))[0], labels, torch.ones(256), style)
    assert x.shape == noise.shape and 0.35 < rms < 0.65, rms
    assert (x - other).pow(2).mean().sqrt() > 0.5 * rms  # another noise, another image
    flat = drift.ConvGenerator(16, 3, 4, dim=32, widths=(32, 16), blocks=(1, 1), out_init=0.0)
    assert torch.equal(flat(noise, labels, torch.ones(256)), torch.zeros_like(noise))  # DiT's zero start
    with pytest.raises(ValueError, match="must be a multiple of 4"):
        drift.ConvGenerator(18, 1, 10)
