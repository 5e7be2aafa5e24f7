"""
Generate images from a drifting-model checkpoint: one network evaluation per image.

    python sample.py --ckpt out/ckpt.pt --num-samples 80 --grid samples.png          # a PNG grid
    python sample.py --ckpt out/ckpt.pt --num-samples 50000 --npz samples.npz       # arr_0, uint8 NHWC (ADM/DiT)
    python sample.py --ckpt out/ckpt.pt --classes 3 7 --cfg 1.5 --png-dir samples/   # one PNG per image

Sample i uses noise seeded by (--seed, i), so the images do not depend on the batch size or the device count.
"""

import argparse
import os

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

import drift


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
        model, _ = drift.load_generator(args.ckpt, device, ema=not args.no_ema)
        images = drift.generate_images(model, args.num_samples, args.batch_size, device, args.seed, args.cfg, args.classes)
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
