"""Contact sheets of the multi-domain datasets, and their build time and cache size.

For each dataset of ``problems.data`` this builds it into a fresh temporary cache (timing the build,
then a second call that reads the cache, and measuring the cache entry on disk), and writes a PNG with one
row per domain and one image per class, the same class in each column, so the domain shift is visible:

    docs/images/rotated_mnist.png    docs/images/colored_mnist.png (red = colour 0, green = colour 1)
    docs/images/rotated_digits.png   docs/images/rotated_animals.png
    docs/images/data_domains.png     (all of them stacked, for the README)

A DomainBed-layout folder (``root/<domain>/<class>/<image>``, e.g. PACS) can be added with ``--folder``.

    python examples/data_contact_sheets.py [--out docs/images] [--folder ROOT [--classes a,b,c]]
"""
import argparse
import os
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import bilevel.problems.data as data
from bilevel.problems.data.cache import cache_size

torch.set_num_threads(1)
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--out", default="docs/images", help="folder for the PNG files")
parser.add_argument("--folder", default=None, help="optional DomainBed-layout image folder to add")
parser.add_argument("--classes", default=None, help="comma-separated class list for --folder (PACS-mini)")
args = parser.parse_args()
out = Path(args.out)
out.mkdir(parents=True, exist_ok=True)

BUILDERS = {
    "rotated_mnist": lambda cache: data.rotated_mnist(cache_dir=cache),
    "colored_mnist": lambda cache: data.colored_mnist(cache_dir=cache),
    "rotated_digits": lambda cache: data.rotated_digits(cache_dir=cache),
    "rotated_animals": lambda cache: data.rotated_animals(cache_dir=cache),
}
if args.folder:
    classes = args.classes.split(",") if args.classes else None
    name = Path(args.folder).name
    BUILDERS[name] = lambda cache: data.image_folder_domains(args.folder, size=64, classes=classes, cache_dir=cache)


def to_rgb(image: torch.Tensor) -> torch.Tensor:
    """C x H x W in [0, 1] to 3 x H x W: grey stays grey, Colored MNIST's two channels become red/green."""
    if image.shape[0] == 1:
        return image.expand(3, -1, -1)
    if image.shape[0] == 2:
        return torch.cat([image, torch.zeros_like(image[:1])])
    return image


def contact_sheet(ds, title: str, columns: int = 10, cell: int = 56) -> Image.Image:
    """One row per domain; column k shows the first image of class k in that domain (blank if absent)."""
    domains = data.domains_of(ds)
    label_w, title_h = 110, 22
    sheet = Image.new("RGB", (label_w + columns * cell, title_h + len(domains) * cell), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((4, 4), title, fill="black")
    for r, dom in enumerate(domains):
        X, y = data.to_tensors(ds, dom)
        draw.text((4, title_h + r * cell + cell // 2 - 6), dom, fill="black")
        picks = [int(torch.nonzero(y == k)[0]) if bool((y == k).any()) else None for k in range(columns)]
        if max(y) < 2:  # binary labels: show the first images instead of one per class
            picks = list(range(min(columns, len(y))))
        for c, i in enumerate(picks):
            if i is None:
                continue
            pixels = (to_rgb(X[i]).clamp(0, 1) * 255).round().byte().permute(1, 2, 0).numpy()
            tile = Image.fromarray(pixels).resize((cell - 4, cell - 4), Image.NEAREST)
            sheet.paste(tile, (label_w + c * cell + 2, title_h + r * cell + 2))
    return sheet


sheets = []
print(f"{'dataset':<16} {'rows':>6} {'domains':>7} {'image':>10} {'build s':>8} {'cached s':>9} {'cache MB':>9}")
with tempfile.TemporaryDirectory() as tmp:
    for name, build in BUILDERS.items():
        cache = Path(tmp) / name
        t0 = time.perf_counter()
        ds = build(cache)
        t1 = time.perf_counter()
        ds = build(cache)  # read back from the cache
        t2 = time.perf_counter()
        entries = [p for p in cache.iterdir() if not p.name.startswith("imagefolder")]
        size_mb = sum(cache_size(p) for p in entries) / 2**20
        shape = "x".join(str(s) for s in ds[0]["image"].shape)
        print(f"{name:<16} {len(ds):>6} {len(data.domains_of(ds)):>7} {shape:>10} {t1 - t0:>8.2f} {t2 - t1:>9.3f} {size_mb:>9.1f}")
        title = f"{name}: {len(ds)} images, {shape}; rows = domains, columns = classes"
        if name == "colored_mnist":
            title = f"{name}: rows = environments (colour/label agreement); red = colour 0, green = colour 1"
        names = getattr(ds.features["label"], "names", None)  # folder datasets carry their class names
        sheet = contact_sheet(ds, title, columns=12 if name == "colored_mnist" else len(names or range(10)))
        sheet.save(out / f"{name}.png")
        sheets.append(sheet)

width = max(s.width for s in sheets)
overview = Image.new("RGB", (width, sum(s.height for s in sheets) + 8 * len(sheets)), "white")
y = 0
for s in sheets:
    overview.paste(s, (0, y))
    y += s.height + 8
overview.save(out / "data_domains.png")
print(f"wrote {len(sheets)} contact sheets and data_domains.png to {out}/")
