"""
Generate images from a drifting-model checkpoint: one network evaluation per image.

    python sample.py --ckpt out/ckpt.pt --num-samples 80 --grid samples.png          # a PNG grid
    python sample.py --ckpt out/ckpt.pt --num-samples 50000 --npz samples.npz       # arr_0, uint8 NHWC (ADM/DiT)
    python sample.py --ckpt out/ckpt.pt --classes 3 7 --cfg 1.5 --png-dir samples/   # one PNG per image

Sample i uses noise seeded by (--seed, i), so the images do not depend on the batch size or the device count.
This file also holds the checkpoint format the scripts share: atomic writes, a SHA-256 digest, weights_only reads.
"""

import argparse
import hashlib
import math
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import drift


# ----------------------------------------------------------------------------------------------------------
# checkpoints: the one home the scripts share (train.py writes them, sample.py and fid.py read them)

def state_digest(obj):
    """SHA-256 over every tensor's bytes and every value of a nested checkpoint dict."""
    h = hashlib.sha256()

    def walk(o):
        if torch.is_tensor(o):
            h.update(f"{o.dtype}{tuple(o.shape)}".encode())
            h.update(o.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        elif isinstance(o, dict):
            for k in sorted(o, key=str):
                h.update(repr(k).encode())
                walk(o[k])
        elif isinstance(o, (list, tuple)):
            for v in o:
                walk(v)
        else:
            h.update(repr(o).encode())
    walk(obj)
    return h.hexdigest()


def save_checkpoint(path, ckpt):
    """Atomic: a reader sees the old checkpoint or the new one, never half of one, and no .tmp is left behind."""
    ckpt = dict(ckpt, sha256=state_digest(ckpt))
    try:
        torch.save(ckpt, path + ".tmp")
        os.replace(path + ".tmp", path)
    except (OSError, RuntimeError) as e:  # torch.save reports a missing folder as a RuntimeError
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
        raise OSError(f"could not write the checkpoint {path} ({getattr(e, 'strerror', None) or e}); "
                      f"the previous one is intact") from e


def load_checkpoint(path):
    """A train.py checkpoint dict, read with weights_only=True and checked against its digest; ValueError if not."""
    if not os.path.isfile(path):
        raise ValueError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"checkpoint {path} is truncated or corrupt and cannot be read ({type(e).__name__}); "
                         f"use an intact copy or start a new run") from None
    if not isinstance(ckpt, dict) or ckpt.get("sha256") != state_digest({k: v for k, v in ckpt.items() if k != "sha256"}):
        raise ValueError(f"checkpoint {path} fails its integrity check (tampered or damaged); refusing to load it")
    return ckpt


def generator_from_args(a):
    """The generator a run's arguments (a plain dict, as stored in a checkpoint) describe."""
    size = drift.GENERATORS[a["model"]]
    common = dict(style_tokens=a["style_tokens"], out_init=a.get("out_init", 0.0), black_floor=a.get("black_floor", False),
                  **size)
    if "widths" in size:
        return drift.ConvGenerator(a["image_size"], a["channels"], a["num_classes"], **common)
    return drift.Generator(a["image_size"], a["channels"], a["num_classes"], a["patch_size"] or a["image_size"] // 4, **common)


def load_weights(model, state, path, name):
    """model.load_state_dict(state), with one clear message where the weights no longer fit the architecture that
    drift.GENERATORS[name] describes (a registry entry changed since the checkpoint was written)."""
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise ValueError(f"checkpoint {path}: its weights do not fit --model {name} as drift.GENERATORS describes it "
                         f"now ({drift.GENERATORS[name]}); it was written by an older version of that entry") from e


def load_generator(path, device="cpu", ema=True):
    """The generator of a train.py checkpoint (its EMA weights by default), in eval mode, and the run's args."""
    ckpt = load_checkpoint(path)
    model = generator_from_args(ckpt["args"])
    load_weights(model, ckpt["ema" if ema else "model"], path, ckpt["args"]["model"])
    return model.to(device).eval(), ckpt["args"]


@torch.no_grad()
def generate_images(model, num_samples, batch_size=256, device="cpu", seed=0, cfg=1.0, classes=None):
    """num_samples images as uint8 numpy [N, H, W, C], one network evaluation each. Sample i has class
    classes[i % len(classes)] (default: all classes in turn), CFG scale cfg ([1] §3.5; 1 = none) and noise
    seeded by (seed, i), so images do not depend on the batch size or the device."""
    model = model.to(device).eval()
    classes = list(range(model.num_classes)) if classes is None else [int(k) for k in classes]
    if not classes or min(classes) < 0 or max(classes) >= model.num_classes:
        raise ValueError(f"classes must lie in [0, {model.num_classes - 1}], got {classes}")
    if not math.isfinite(cfg):
        raise ValueError(f"the CFG scale must be a finite number (1 = no guidance), got {cfg}")
    out = []
    for start in tqdm(range(0, num_samples, batch_size), desc="sampling", disable=num_samples <= batch_size):
        index = range(start, min(start + batch_size, num_samples))
        noise, style = zip(*(model.make_noise(1, torch.Generator().manual_seed(seed * 1_000_003 + i)) for i in index))
        noise = torch.cat(noise).to(device)  # (B, C, H, W)
        style = None if style[0] is None else torch.cat(style).to(device)  # (B, tokens)
        labels = torch.tensor([classes[i % len(classes)] for i in index], device=device)
        alpha = torch.full((len(index),), float(cfg), device=device)
        x = model(noise, labels, alpha, style).float()  # (B, C, H, W) in about [-1, 1]
        out.append(((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.image_size, model.image_size, model.channels), np.uint8)


def save_grid(images, path, nrow=10, pad=2):
    """Tile uint8 images [N, H, W, C] into one PNG, nrow images a row, on a white background."""
    n, h, w, c = images.shape
    rows = -(-n // nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, k = divmod(i, nrow)
        grid[pad + r * (h + pad):pad + r * (h + pad) + h, pad + k * (w + pad):pad + k * (w + pad) + w] = img
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    Image.fromarray(grid[..., 0] if c == 1 else grid).save(path)


def main():
    parser = argparse.ArgumentParser(description="Generate images from a drifting-model checkpoint.")
    parser.add_argument("--ckpt", required=True, help="checkpoint written by train.py")
    parser.add_argument("--num-samples", type=int, default=80)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--classes", type=int, nargs="+", default=None, help="class ids, used in turn (default: all)")
    parser.add_argument("--cfg", type=float, default=1.0, help="CFG scale alpha (1: none)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grid", default="", help="write a PNG grid here")
    parser.add_argument("--nrow", type=int, default=0, help="images per grid row (default: number of classes, max 10)")
    parser.add_argument("--npz", default="", help="write uint8 NHWC images as arr_0 here")
    parser.add_argument("--png-dir", default="", help="write one PNG per image into this folder")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" else args.device
    if not (args.grid or args.npz or args.png_dir):
        args.grid = os.path.join(os.path.dirname(os.path.abspath(args.ckpt)), "samples.png")
    try:
        model, _ = load_generator(args.ckpt, device, ema=not args.no_ema)
        images = generate_images(model, args.num_samples, args.batch_size, device, args.seed, args.cfg, args.classes)
    except ValueError as e:
        raise SystemExit(f"error: {e}")
    if args.grid:
        save_grid(images, args.grid, args.nrow or min(len(args.classes or range(model.num_classes)), 10))
        print(f"wrote {args.grid}")
    if args.npz:
        os.makedirs(os.path.dirname(os.path.abspath(args.npz)), exist_ok=True)
        np.savez(args.npz, arr_0=images)
        print(f"wrote {args.npz} ({images.shape}, uint8 NHWC)")
    if args.png_dir:
        os.makedirs(args.png_dir, exist_ok=True)
        for i, img in enumerate(tqdm(images, desc="png")):
            Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(os.path.join(args.png_dir, f"{i:06d}.png"))
        print(f"wrote {len(images)} PNGs to {args.png_dir}")


if __name__ == "__main__":
    main()
