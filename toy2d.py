"""
Drifting in 2D: watch a one-step generator find every part of a toy distribution, on a laptop CPU.

An MLP maps noise to points in the plane. It starts collapsed (its last layer is tiny, so the samples sit
within ~0.05 of the origin, in a target ~6 wide) and is trained by drifting [1]: each step moves the generated
batch x along a field V that attracts it to the target and repels it from itself, through the loss
MSE(x, stopgrad(x + V)).
Two fields, side by side:
  exact    Algorithm 2 of [1] against a fresh minibatch of target samples (the positives) and the batch itself
           (the negatives, each sample's own column masked).
  nystrom  the projected field of DriftXpress [2]: attraction to ALL of a large fixed draw of the target through
           Nystrom summaries on a few hundred landmarks (O(landmarks) per query, fitted once), exact repulsion.
Both go through drift.drift_loss: one fixed feature scale, the paper's temperatures in normalised units, each
temperature's drift divided by its batch RMS. Quality: the energy distance [3] to a fresh target draw, printed
beside the energy distance between two fresh target draws (what a perfect sampler gets), and for the Gaussian
mixture the modes covered. Writes OUT.png (snapshots and drift fields) and OUT.gif (the evolution).

    python toy2d.py                                   # checkerboard, both fields, 20-45 s on 2 CPU cores
    python toy2d.py --dataset 8gaussians --field nystrom --landmarks 512 --json

References:
1) Deng, Li, Li, Du, He, "Generative Modeling via Drifting", arXiv 2602.04770: Algorithm 1 (the step),
   Algorithm 2 (the field), A.6 (feature and drift normalisation).
2) Falahati, Creager, Kamath, Mohapatra, "DriftXpress: Faster Drifting Models via Projected RKHS Fields",
   arXiv 2605.12183: landmarks, Nystrom features, cached summaries, exact repulsion.
3) Szekely, Rizzo, "Energy statistics: a class of statistics based on distances", J. Stat. Plan. Inf. 2013.
"""

import argparse
import json
import math
import os
import time

import numpy as np
import scipy.ndimage
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFont
from tqdm import tqdm

import drift

# ----------------------------------------------------------------------------------------------------------
# defaults (sized for a 2-core CPU: both fields, training and pictures, in under a minute)

DATASET = "checkerboard"  # checkerboard | 8gaussians | swissroll
FIELD = "both"  # exact | nystrom | both
STEPS = 1000  # optimiser steps per field
BATCH_SIZE = 256  # generated samples per step (the negatives); the exact field draws as many positives
FIT_SAMPLES = 32768  # fixed target draw the Nystrom summaries are fitted on: all of it attracts at every step
LANDMARKS = 256  # Nystrom landmarks: random target samples
TEMPERATURES = (0.02, 0.05, 0.2)  # normalised units as in [1]; in data units T * (mean target distance)
LR = 5e-3  # Adam, cosine decay to zero
INIT_SPREAD = 0.5  # last-layer init std x sqrt(width): samples start with std ~0.015 around the origin
NOISE_DIM = 8  # generator input
WIDTH = 128  # generator hidden width, 3 hidden layers
EVAL_SAMPLES = 4000  # generated and target points for the energy distance, the pictures and --save-samples
SNAPSHOTS = 5  # picture columns per field, step 0 and the last step included
FRAMES = 40  # GIF frames
THREADS = 1  # torch CPU threads: the ops are small, and on a busy machine a second thread costs more than it saves
SEED = 0
OUT = "out/toy2d"  # writes OUT.png and OUT.gif

DATASETS = ("checkerboard", "8gaussians", "swissroll")
FIELDS = ("exact", "nystrom")
VIEW = 3.5  # pictures show [-VIEW, VIEW]^2

# ----------------------------------------------------------------------------------------------------------
# targets

MODE_RADIUS, MODE_STD = 2.5, 0.1  # 8 Gaussians on a circle


def mode_centres():
    angle = torch.arange(8) * (2 * math.pi / 8)
    return MODE_RADIUS * torch.stack([angle.cos(), angle.sin()], -1)  # (8, 2)


def sample_target(name, n, generator=None):
    """n samples [n, 2] of a 2D target, all within about [-3, 3]^2. generator: a CPU torch.Generator."""
    g = generator
    if name == "checkerboard":  # 4 x 4 board of 1.5-wide squares; the 8 with row + col even are filled
        cell = torch.randint(0, 8, (n,), generator=g)
        row = cell // 2
        col = 2 * (cell % 2) + row % 2
        return torch.rand(n, 2, generator=g) * 1.5 + torch.stack([col, row], -1) * 1.5 - 3.0
    if name == "8gaussians":
        mode = torch.randint(0, 8, (n,), generator=g)
        return mode_centres()[mode] + MODE_STD * torch.randn(n, 2, generator=g)
    if name == "swissroll":
        t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))  # angle from 1.5 pi to 4.5 pi
        roll = torch.stack([t * t.cos(), t * t.sin()], -1) / 5.0
        return roll + 0.05 * torch.randn(n, 2, generator=g)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


# ----------------------------------------------------------------------------------------------------------
# sample quality

def energy_distance(a, b):
    """Energy distance 2 E|a - b| - E|a - a'| - E|b - b'| between two point sets [n, D] and [m, D]
    (V-statistic: >= 0, and of order 1/n for two draws of the same distribution)."""
    a, b = torch.as_tensor(a, dtype=torch.float32), torch.as_tensor(b, dtype=torch.float32)  # ~1e-6 accurate
    return (2 * torch.cdist(a, b).mean() - torch.cdist(a, a).mean() - torch.cdist(b, b).mean()).item()


def mode_coverage(x, min_share=0.02):
    """8 Gaussians: the fraction of the 8 modes holding at least min_share of the samples within 3 std, and
    the fraction of samples within 3 std of some mode (the target itself: 1.0 and 1 - exp(-4.5) = 0.989)."""
    near = torch.cdist(torch.as_tensor(x, dtype=torch.float32), mode_centres()) < 3 * MODE_STD  # (n, 8)
    share = near.float().mean(0)  # (8,)
    return {"modes": (share >= min_share).float().mean().item(), "near_mode": near.any(-1).float().mean().item()}


def quality(x, reference, dataset):
    """The numbers printed for a point set x against a fresh target draw `reference`."""
    out = {"energy_distance": energy_distance(x, reference)}
    if dataset == "8gaussians":
        out.update(mode_coverage(x))
    return out


# ----------------------------------------------------------------------------------------------------------
# generator and fields

class MLP(nn.Module):
    """noise (B, noise_dim) -> points (B, 2), starting collapsed: the last layer is tiny, so all samples begin
    near the origin. (With a last layer of exactly zero, or 1e-3 of this, Adam's first steps move both output
    coordinates alike, and on the checkerboard the samples then spend hundreds of steps on a line.)"""

    def __init__(self, noise_dim=NOISE_DIM, width=WIDTH, init_spread=INIT_SPREAD):
        super().__init__()
        self.noise_dim = noise_dim
        self.net = nn.Sequential(nn.Linear(noise_dim, width), nn.SiLU(), nn.Linear(width, width), nn.SiLU(),
                                 nn.Linear(width, width), nn.SiLU(), nn.Linear(width, 2))
        nn.init.normal_(self.net[-1].weight, std=init_spread / width**0.5)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, noise):
        return self.net(noise)


class Field:
    """One drifting field and what it needs, in the normalised units of drift.drift_loss (points / scale)."""

    def __init__(self, kind, dataset, scale, temperatures=TEMPERATURES, positives=BATCH_SIZE,
                 fit_samples=FIT_SAMPLES, landmarks=LANDMARKS, generator=None):
        if kind not in FIELDS:
            raise ValueError(f"unknown field {kind!r}; choose one of {', '.join(FIELDS)}")
        self.kind, self.dataset, self.scale, self.temperatures = kind, dataset, scale, temperatures
        self.positives, self.generator = positives, generator
        self.landmarks = self.nystrom = None
        if kind == "nystrom":  # landmarks among a large fixed target draw, summaries over all of it, once
            y = sample_target(dataset, fit_samples, generator)  # (n, 2)
            self.landmarks = drift.select_landmarks(y, landmarks, "random", generator=generator)  # (M, 2)
            self.nystrom = drift.build_nystrom_fields(y, self.landmarks, temperatures, scale)

    def loss(self, x):
        """drift_loss of the generated batch x [N, 2] (with grad). Returns (loss, stats)."""
        if self.kind == "exact":
            y_pos = sample_target(self.dataset, self.positives, self.generator)  # (Np, 2) fresh positives
            return drift.drift_loss(x, y_pos, temperatures=self.temperatures, scale=self.scale)
        return drift.drift_loss(x, temperatures=self.temperatures, field="nystrom", nystrom=self.nystrom,
                                scale=self.scale)

    def vectors(self, queries, y_neg, y_pos):
        """The drift at arbitrary points queries [Q, 2] given negatives y_neg (generated) and, for the exact
        field, positives y_pos: drift.normalised_drift, summed over temperatures as in training. Data units;
        only directions and relative lengths are meaningful."""
        q, y_neg = queries / self.scale, y_neg / self.scale
        if self.kind == "exact":  # Algorithm 2 normalises over the queries too: let the grid join the batch
            batch = torch.cat([y_neg, q])  # (N + Q, 2), queries and negatives, self masked
            v = drift.normalised_drift(batch, y_pos / self.scale, None, self.temperatures)[0][len(y_neg):]
        else:
            v = drift.normalised_drift(q, None, y_neg, self.temperatures, "nystrom", self.nystrom, mask_self=False)[0]
        return v * self.scale


def train(kind, dataset=DATASET, steps=STEPS, seed=SEED, landmarks=LANDMARKS, batch_size=BATCH_SIZE, lr=LR,
          fit_samples=FIT_SAMPLES, eval_noise=None, record_steps=(), progress=True):
    """
    Train one generator by drifting with one field (Algorithm 1 of [1]). eval_noise [E, noise_dim]: fixed
    noise whose samples are recorded at each step in record_steps (step s: after s updates). Returns a dict:
    model, field, seconds (wall clock of the setup and the updates, recording excluded), steps, drift_norm,
    records {step: points [E, 2] numpy}.
    """
    warm_up = torch.zeros(1, requires_grad=True)  # the first optimiser step of a process imports torch._dynamo
    warm_up.sum().backward()  # (seconds): do it before the clock starts, so neither field pays for it
    torch.optim.Adam([warm_up]).step()
    torch.manual_seed(seed)  # the generator's init: the same for both fields
    g = torch.Generator().manual_seed(seed)  # target draws, landmarks and noise of this run
    start = time.perf_counter()
    scale = drift.feature_scale(sample_target(dataset, 4096, g))  # fixed: mean target distance / sqrt(2)
    field = Field(kind, dataset, scale, positives=batch_size, fit_samples=fit_samples, landmarks=landmarks,
                  generator=g)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    records, recording = {}, 0.0

    def record(step):
        if eval_noise is None or step not in record_steps:
            return 0.0
        tic = time.perf_counter()
        with torch.no_grad():
            records[step] = model(eval_noise).numpy()
        return time.perf_counter() - tic

    norm = float("nan")
    bar = tqdm(range(steps), desc=f"{kind:>7}", disable=not progress, leave=False, mininterval=0.5)
    for step in bar:
        recording += record(step)
        for group in opt.param_groups:
            group["lr"] = 0.5 * lr * (1 + math.cos(math.pi * step / steps))  # cosine decay
        x = model(torch.randn(batch_size, model.noise_dim, generator=g))  # (N, 2)
        loss, stats = field.loss(x)  # value mean(V^2), a near constant; its gradient moves x along V
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == steps - 1:
            norm = stats["drift_norm"].item()  # RMS of the raw (unnormalised) drift, mean over temperatures
            bar.set_postfix(drift_norm=f"{norm:.4f}")
    bar.close()
    recording += record(steps)
    seconds = time.perf_counter() - start - recording
    return {"model": model, "field": field, "seconds": seconds, "steps": steps, "drift_norm": norm,
            "positives": batch_size, "fit_samples": fit_samples, "records": records}


# ----------------------------------------------------------------------------------------------------------
# pictures, with PIL only

BACKGROUND = (255, 255, 255)
INK = (45, 45, 45)
FRAME = (215, 215, 215)
COLOURS = {"target": (60, 60, 60), "exact": (31, 110, 180), "nystrom": (220, 95, 20), "landmark": (200, 30, 60)}
GHOST = (175, 175, 175)  # the target behind the generated samples


def font(size):
    return ImageFont.load_default(size=size)


def to_pixels(points, size):
    """Data coordinates [n, 2] in [-VIEW, VIEW]^2 -> pixel coordinates (x right, y up) in a size x size panel."""
    p = (np.asarray(points, dtype=np.float64) + VIEW) / (2 * VIEW) * (size - 1)
    return np.stack([p[:, 0], size - 1 - p[:, 1]], -1)


def splat(canvas, points, colour, strength):
    """Soft dots: each point spreads a unit of ink bilinearly over its 4 nearest pixels, blurred by [1, 2, 1]/4
    in x and y; a pixel holding ink k gets opacity 1 - exp(-strength k), so dense regions saturate smoothly
    and a lone point is a faint 3-pixel dot. canvas: float array [H, W, 3], changed in place."""
    h, w, _ = canvas.shape
    p = to_pixels(points, w)
    base = np.floor(p).astype(np.int64)
    frac = p - base
    ink = np.zeros(h * w)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        col, row = base[:, 0] + dx, base[:, 1] + dy
        weight = (frac[:, 0] if dx else 1 - frac[:, 0]) * (frac[:, 1] if dy else 1 - frac[:, 1])
        inside = (col >= 0) & (col < w) & (row >= 0) & (row < h)
        ink += np.bincount(row[inside] * w + col[inside], weight[inside], minlength=h * w)
    ink = ink.reshape(h, w)
    for axis in (0, 1):
        ink = scipy.ndimage.correlate1d(ink, [0.25, 0.5, 0.25], axis=axis, mode="constant")
    opacity = 1 - np.exp(-strength * ink[..., None])
    canvas += opacity * (np.asarray(colour, dtype=np.float64) - canvas)
    return canvas


def draw_arrows(draw, starts, vectors, size, colour, head=6.0):
    """Arrows from `starts` (data units) along `vectors` (pixels, y up), as lines with filled heads."""
    for (x0, y0), (dx, dy) in zip(to_pixels(starts, size), np.asarray(vectors, dtype=np.float64)):
        length = math.hypot(dx, dy)
        if length < 1.0:
            continue
        x1, y1 = x0 + dx, y0 - dy
        ux, uy = dx / length, -dy / length  # unit direction in pixel space (y down)
        h = min(head, 0.5 * length)
        draw.line([(x0, y0), (x1 - 0.5 * h * ux, y1 - 0.5 * h * uy)], fill=colour, width=1)
        draw.polygon([(x1, y1), (x1 - h * ux + 0.55 * h * uy, y1 - h * uy - 0.55 * h * ux),
                      (x1 - h * ux - 0.55 * h * uy, y1 - h * uy + 0.55 * h * ux)], fill=colour)


def panel(size, layers, title=None, arrows=None, marks=None):
    """One square panel. layers: [(points [n, 2], colour, strength)] splatted in order; marks: (points, colour)
    drawn as small rings; arrows: (grid [G, 2], vectors [G, 2], colour), scaled so that the long arrows span
    about one grid cell."""
    canvas = np.full((size, size, 3), BACKGROUND, dtype=np.float64)
    for points, colour, strength in layers:
        splat(canvas, points, colour, strength)
    img = Image.fromarray(canvas.round().clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    if marks is not None:
        for x, y in to_pixels(marks[0], size):
            draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], outline=marks[1], width=1)
    if arrows is not None:
        grid, vectors, colour = arrows
        vectors = np.asarray(vectors, dtype=np.float64)
        cell = size / math.sqrt(len(grid))  # pixels between grid points
        longest = max(np.quantile(np.linalg.norm(vectors, axis=-1), 0.9), 1e-12)
        vectors = vectors / longest * 0.9 * cell  # the 90th-percentile arrow spans 0.9 cells
        length = np.linalg.norm(vectors, axis=-1, keepdims=True)
        vectors = vectors * np.minimum(1, 1.2 * cell / np.maximum(length, 1e-12))  # none longer than 1.2 cells
        draw_arrows(draw, grid, vectors, size, colour)
    draw.rectangle([0, 0, size - 1, size - 1], outline=FRAME)
    if title:  # on a white label, so that points and arrows never hide it
        box = draw.textbbox((7, 5), title, font=font(12))
        draw.rectangle([box[0] - 3, box[1] - 2, box[2] + 3, box[3] + 2], fill=BACKGROUND)
        draw.text((7, 5), title, fill=INK, font=font(12))
    return img


def generated_layers(target, points, kind):
    return [(target, GHOST, 0.6), (points, COLOURS[kind], 2.0)]


def drift_grid(n=17):
    """n x n query points over the picture, in data units."""
    ticks = torch.linspace(-VIEW, VIEW, n + 1)[:-1] + VIEW / n  # cell centres
    return torch.stack(torch.meshgrid(ticks, ticks, indexing="xy"), -1).reshape(-1, 2)  # (n*n, 2)


def describe(kind, run, baseline):
    """One line per field for the picture: what it is and how it did."""
    if kind == "exact":
        what = f"exact field: Algorithm 2 against {run['positives']} fresh target samples a step"
    else:
        what = (f"Nystrom field: {len(run['field'].landmarks)} landmarks, attraction to all {run['fit_samples']} "
                "fitted samples")
    q = run["quality"]
    line = (f"{what}   |   energy distance {q['energy_distance']:.4f} (target vs target "
            f"{baseline['energy_distance']:.4f})   |   {run['seconds']:.1f} s, {run['steps']} steps")
    if "modes" in q:
        line += f"   |   modes {round(8 * q['modes'])}/8, {100 * q['near_mode']:.0f}% near one"
    return line


def render_png(path, runs, target, dataset, snapshot_steps, baseline, field_column=2, size=200):
    """Rows: fields. Columns: the target (with the landmarks for nystrom), snapshots of the generated samples
    over training, and the drift field on a grid at snapshot `field_column` (queries: the grid; negatives: the
    generated samples then; positives: the target), arrows scaled per panel."""
    gap, left = 6, 10
    header, row_header = 56, 24
    width = left + (2 + len(snapshot_steps)) * (size + gap) - gap + left
    height = header + len(runs) * (row_header + size + gap) + 4
    img = Image.new("RGB", (width, height), BACKGROUND)
    draw = ImageDraw.Draw(img)
    draw.text((left, 8), f"Drifting on {dataset}: a collapsed MLP generator (all samples at the origin) "
              "learns the target", fill=INK, font=font(18))
    draw.text((left, 33), "blue: exact drifting field [Deng et al.], orange: projected Nystrom field "
              "[DriftXpress]; grey: target samples; last column: the drift field early in training (scaled per panel)",
              fill=(100, 100, 100), font=font(12))
    grid = drift_grid()
    y_pos = torch.as_tensor(target, dtype=torch.float32)
    for r, (kind, run) in enumerate(runs.items()):
        y = header + r * (row_header + size + gap)
        draw.text((left, y + 4), describe(kind, run, baseline), fill=COLOURS[kind], font=font(13))
        y += row_header
        if kind == "nystrom":
            landmarks = run["field"].landmarks.numpy()
            tiles = [panel(size, [(target, COLOURS["target"], 1.0)], f"target + {len(landmarks)} landmarks",
                           marks=(landmarks, COLOURS["landmark"]))]
        else:
            tiles = [panel(size, [(target, COLOURS["target"], 1.0)], f"target ({len(target)} samples)")]
        for step in snapshot_steps:
            tiles.append(panel(size, generated_layers(target, run["records"][step], kind), f"step {step}"))
        step = snapshot_steps[min(field_column, len(snapshot_steps) - 1)]
        samples = torch.as_tensor(run["records"][step])
        vectors = run["field"].vectors(grid, samples[:1000], y_pos[:1000]).numpy()  # 1000 of each is plenty
        tiles.append(panel(size, generated_layers(target, samples, kind), f"drift field at step {step}",
                           arrows=(grid.numpy(), vectors, INK)))
        for c, tile in enumerate(tiles):
            img.paste(tile, (left + c * (size + gap), y))
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    img.quantize(colors=192, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(path, optimize=True)


def blend_palette(colours, levels=12):
    """A GIF palette: the background blended towards each colour in `levels` steps (shared by all frames, so
    the colours do not flicker and the file stays small)."""
    background = np.asarray(BACKGROUND, dtype=np.float64)
    rows = [background * (1 - a) + np.asarray(c, dtype=np.float64) * a
            for c in colours for a in np.linspace(1 / levels, 1, levels)]
    rows = np.concatenate([background[None], np.round(rows)]).astype(np.uint8)  # (1 + colours x levels, 3)
    palette = Image.new("P", (1, 1))
    palette.putpalette(rows.reshape(-1).tolist())
    return palette


def render_gif(path, runs, target, frame_steps, size=200):
    """The evolution: the fields side by side, one frame per recorded step, the last frame held."""
    gap, top = 6, 26
    palette = blend_palette([GHOST, INK, FRAME] + [COLOURS[kind] for kind in runs])
    frames = []
    for step in frame_steps:
        img = Image.new("RGB", (len(runs) * (size + gap) - gap, top + size), BACKGROUND)
        draw = ImageDraw.Draw(img)
        for c, (kind, run) in enumerate(runs.items()):
            img.paste(panel(size, generated_layers(target, run["records"][step], kind), kind), (c * (size + gap), top))
        draw.text((4, 5), f"drifting, step {step}", fill=INK, font=font(14))
        frames.append(img.quantize(palette=palette, dither=Image.Dither.NONE))
    durations = [90] * (len(frames) - 1) + [2500]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=durations, loop=0, optimize=True)


# ----------------------------------------------------------------------------------------------------------
# main

def snapshot_schedule(steps, count):
    """Step 0, then geometrically spaced steps up to the last one (early steps change the most)."""
    later = np.geomspace(max(steps / 60, 1), steps, count - 1)
    return sorted({0, *(int(round(s)) for s in later), steps})


def main(argv=None):
    p = argparse.ArgumentParser(description="Drifting in 2D: a collapsed MLP generator learns a toy target with "
                                            "the exact field and the Nystrom (DriftXpress) field.")
    p.add_argument("--dataset", default=DATASET, help=f"target: {', '.join(DATASETS)} (default {DATASET})")
    p.add_argument("--field", default=FIELD, choices=(*FIELDS, "both"), help="field(s) to train with")
    p.add_argument("--steps", type=int, default=STEPS, help="optimiser steps per field")
    p.add_argument("--batch-size", type=int, default=BATCH_SIZE,
                   help="generated samples (and exact-field positives) per step")
    p.add_argument("--landmarks", type=int, default=LANDMARKS, help="Nystrom landmarks")
    p.add_argument("--fit-samples", type=int, default=FIT_SAMPLES,
                   help="target samples the Nystrom field is fitted on")
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, default=THREADS, help="torch CPU threads")
    p.add_argument("--out", default=OUT, help="writes OUT.png and OUT.gif; '' writes no pictures")
    p.add_argument("--json", action="store_true", help="print one final JSON line with the numbers")
    p.add_argument("--save-samples", default=None, metavar="PATH.npz",
                   help="write the final samples: 'generated' (first field), 'generated_<field>', and 'target', "
                        f"a fresh target draw of the same size ({EVAL_SAMPLES} points each)")
    args = p.parse_args(argv)
    if args.dataset not in DATASETS:
        raise SystemExit(f"error: unknown --dataset {args.dataset!r}; choose one of {', '.join(DATASETS)}")
    if min(args.steps, args.landmarks, args.threads) < 1 or args.batch_size < 2:
        raise SystemExit("error: --steps, --landmarks and --threads must be >= 1 and --batch-size >= 2")
    if args.landmarks > args.fit_samples:
        raise SystemExit(f"error: --landmarks {args.landmarks} is more than the {args.fit_samples} target samples "
                         "they are chosen from (--fit-samples)")
    fields = FIELDS if args.field == "both" else (args.field,)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return run(args, fields)
    finally:
        torch.set_num_threads(threads)


def run(args, fields):
    """Train each field, print its numbers, draw the pictures, save the samples; returns the JSON dict."""
    start = time.perf_counter()
    eval_noise = torch.randn(EVAL_SAMPLES, NOISE_DIM, generator=torch.Generator().manual_seed(args.seed + 1))
    g = torch.Generator().manual_seed(args.seed + 2)
    target = sample_target(args.dataset, EVAL_SAMPLES, g)  # the reference every number is measured against
    second = sample_target(args.dataset, EVAL_SAMPLES, g)  # a perfect sampler's draw: the baseline
    baseline = quality(second, target, args.dataset)
    snapshot_steps = snapshot_schedule(args.steps, SNAPSHOTS)
    frame_steps = sorted({int(round(args.steps * (k / (FRAMES - 1)) ** 2)) for k in range(FRAMES)})
    runs = {}
    for kind in fields:
        r = train(kind, args.dataset, args.steps, args.seed, args.landmarks, args.batch_size,
                  fit_samples=args.fit_samples, eval_noise=eval_noise, record_steps=set(snapshot_steps) | set(frame_steps))
        r["quality"] = quality(r["records"][args.steps], target, args.dataset)
        r["start_quality"] = quality(r["records"][0], target, args.dataset)
        runs[kind] = r
        q = r["quality"]
        line = (f"{kind:>7} | {r['seconds']:5.1f} s | {args.steps} steps | energy distance "
                f"{q['energy_distance']:.4f} (target vs target {baseline['energy_distance']:.4f}, "
                f"collapsed start {r['start_quality']['energy_distance']:.3f})")
        if "modes" in q:
            line += (f" | modes {round(8 * q['modes'])}/8 | near a mode {100 * q['near_mode']:.1f}% "
                     f"(target {100 * baseline['near_mode']:.1f}%)")
        print(line, flush=True)
    pictures = []
    if args.out:
        render_png(args.out + ".png", runs, target.numpy(), args.dataset, snapshot_steps, baseline)
        render_gif(args.out + ".gif", runs, target.numpy(), frame_steps)
        pictures = [args.out + ".png", args.out + ".gif"]
        print(f"wrote {' and '.join(pictures)}")
    if args.save_samples:
        arrays = {f"generated_{kind}": r["records"][args.steps] for kind, r in runs.items()}
        arrays["generated"] = arrays[f"generated_{fields[0]}"]
        arrays["target"] = target.numpy()
        os.makedirs(os.path.dirname(os.path.abspath(args.save_samples)), exist_ok=True)
        np.savez(args.save_samples, **arrays)
        print(f"wrote {args.save_samples} ({', '.join(sorted(arrays))})")
    total = time.perf_counter() - start
    print(f"total {total:.1f} s")
    result = {"dataset": args.dataset, "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size,
              "landmarks": args.landmarks, "baseline": baseline, "total_seconds": total, "pictures": pictures,
              "fields": {kind: {"seconds": r["seconds"], "steps": r["steps"], **r["quality"],
                                "start_energy_distance": r["start_quality"]["energy_distance"],
                                "drift_norm": r["drift_norm"]} for kind, r in runs.items()}}
    if args.json:
        print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
