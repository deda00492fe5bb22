"""Shard loader vs torchvision ImageFolder + PIL: images/s per core for the same images and transforms.

Both paths apply GFM's pretraining view, RandomResizedCrop(192, scale=(0.67, 1), ratio=(3/4, 4/3)) ->
horizontal flip -> float in [0, 1] -> ImageNet normalisation (torchvision.transforms.v2), to the same images,
in the same process, batched by a DataLoader, in alternating repeated runs:

- ``shards``: uint8 pixels read from the memory-mapped Arrow shards (:class:`gfm_core.data.pretrain.shard_dataset.
  ShardDataset`): v2 RandomResizedCrop and flip on the uint8 tensor, then the training code's
  ``NormaliseToFloat``, which equals v2 ToDtype + Normalize to 1e-6 in one pass; no decoding.
- ``imagefolder``: ``torchvision.datasets.ImageFolder`` with its PIL loader (open, decode the JPEG, RGB) and
  the standard v2 recipe: RandomResizedCrop and flip on the PIL image (PIL resize), ToImage, ToDtype,
  Normalize.
- ``shards+mask`` (information): the full pretraining sample, :class:`~gfm_core.data.pretrain.stream.
  PretrainStream`, which adds the per-sample seeded crop draw and the SimMIM mask.

Usage (from the repository root)::

    .venv/bin/python benchmarks/loader.py --images 2000 --workers 0

``--workers 0`` measures one core (torch threads default to 1); with ``--workers W`` the throughput is
divided by W. Without ``--data`` it writes N synthetic 256 x 256 aerial-like JPEGs (RESISC45's size and
layout) to a temporary folder; ``--data`` takes an ImageFolder-layout folder (``<root>/<class>/<image>``) of
real images instead. Data and shards sit in the page cache for both paths (a warm-cache comparison: the cost
measured is decoding and augmentation, not disk IO).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def cpu_model() -> str:
    """The CPU model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def synth_image(rng: np.random.Generator, size: int = 256) -> np.ndarray:
    """An aerial-like uint8 RGB image: multi-octave terrain, field/roof rectangles, roads, sensor noise."""
    from PIL import Image

    img = np.zeros((size, size, 3), np.float32)
    for cells, amp in ((4, 0.45), (16, 0.25), (48, 0.15), (128, 0.10)):
        small = (rng.random((cells, cells, 3)) * 255).astype(np.uint8)
        img += amp * np.asarray(Image.fromarray(small).resize((size, size), Image.Resampling.BICUBIC), np.float32)
    tint = rng.uniform(0.6, 1.2, 3).astype(np.float32)
    img *= tint
    for _ in range(int(rng.integers(5, 40))):  # fields, roofs, parking lots
        y, x = rng.integers(0, size, 2)
        h, w = rng.integers(4, 48, 2)
        img[y : y + h, x : x + w] = img[y : y + h, x : x + w] * 0.3 + rng.uniform(20, 235, 3) * 0.7
    for _ in range(int(rng.integers(0, 4))):  # roads
        if rng.random() < 0.5:
            y = int(rng.integers(0, size - 6))
            img[y : y + int(rng.integers(2, 6))] = rng.uniform(90, 160)
        else:
            x = int(rng.integers(0, size - 6))
            img[:, x : x + int(rng.integers(2, 6))] = rng.uniform(90, 160)
    img += rng.normal(0.0, 6.0, img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def make_images(root: Path, n: int, size: int, quality: int, seed: int = 0) -> Path:
    """``n`` JPEGs in RESISC45's layout (``NWPU-RESISC45/<class>/<class>_NNN.jpg``, 15 classes)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = root / "NWPU-RESISC45"
    for i in range(n):
        cls = f"class{i % 15:02d}"
        path = base / cls / f"{cls}_{i // 15:05d}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(synth_image(rng, size)).save(path, quality=quality)
    return base


class ShardCrops:
    """Shard pixels through the pretraining transform (no per-sample seed or mask, as ImageFolder)."""

    def __init__(self, data, transform) -> None:
        self.data, self.transform = data, transform

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return self.transform(self.data.view(i))


def throughput(loader, n_images: int) -> float:
    """Images per second of one full pass over ``loader``."""
    t0 = time.perf_counter()
    seen = 0
    for batch in loader:
        x = batch[0] if isinstance(batch, list | tuple) else batch["image"] if isinstance(batch, dict) else batch
        seen += x.shape[0]
    dt = time.perf_counter() - t0
    assert seen == n_images, (seen, n_images)
    return seen / dt


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--images", type=int, default=2000, help="synthetic JPEGs to generate (default 2000)")
    p.add_argument("--data", type=Path, help="an ImageFolder-layout folder of real images instead")
    p.add_argument("--workers", type=int, default=0, help="DataLoader workers (0 = in this process)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1: per core)")
    p.add_argument("--repeats", type=int, default=3, help="alternating timed passes per loader")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=256, help="synthetic image edge (RESISC45: 256)")
    p.add_argument("--quality", type=int, default=90, help="synthetic JPEG quality")
    p.add_argument("--shard-size", type=int, default=256, help="short side stored in the shards")
    p.add_argument("--work-dir", type=Path, help="keep generated data, manifest and shards here")
    p.add_argument("--json", type=Path, help="also write the results (machine, versions, settings, runs) here")
    args = p.parse_args(argv)

    import PIL
    import torch
    import torchvision
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    from gfm_core.data.ingest.manifest import build_manifest
    from gfm_core.data.ingest.shards import write_shards
    from gfm_core.data.ingest.sources import IngestSettings, folder_source
    from gfm_core.data.pretrain.masking import MaskGenerator
    from gfm_core.data.pretrain.shard_dataset import ShardDataset
    from gfm_core.data.pretrain.stream import IMAGENET_MEAN, IMAGENET_STD, NormaliseToFloat, PretrainStream

    torch.set_num_threads(args.threads)
    img_size, scale, ratio = 192, (0.67, 1.0), (3 / 4, 4 / 3)
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="gfm-loader-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    if args.data is None:
        t0 = time.perf_counter()
        folder = make_images(work / "data", args.images, args.size, args.quality)
        print(
            f"generated {args.images} synthetic {args.size}x{args.size} JPEGs (q{args.quality}) in "
            f"{time.perf_counter() - t0:.1f} s"
        )
    else:
        folder = args.data.resolve()
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    mean_kb = np.mean([f.stat().st_size for f in files]) / 1024

    # ingestion + shards: all cores, progress bars (this is the one-off cost the loader saves every epoch)
    t0 = time.perf_counter()
    report = build_manifest(
        folder.parent,
        [folder_source("bench", folder.name)],
        work / "geopile",
        settings=IngestSettings(min_size=16, near_dup_max_hamming=None),
    )
    t_manifest = time.perf_counter() - t0
    t0 = time.perf_counter()
    shards = write_shards(report.manifest_path, work / "shards", shard_size=args.shard_size)
    t_shards = time.perf_counter() - t0
    print(
        f"manifest: {report.accepted} images ({report.quarantined} quarantined) in {t_manifest:.1f} s; "
        f"shards: {shards.shards} file(s), {shards.bytes / 1e6:.1f} MB, in {t_shards:.1f} s "
        f"({os.cpu_count()} processes)"
    )

    # (a) shards through the training code's transform; (b) ImageFolder + PIL + the same v2 transforms
    mask = MaskGenerator(img_size, 32, 4, 0.6)
    shard_tf = v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, antialias=True),
            v2.RandomHorizontalFlip(),
            NormaliseToFloat(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )

    folder_tf = v2.Compose(
        [
            v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.ToImage(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(IMAGENET_MEAN), std=list(IMAGENET_STD)),
        ]
    )
    datasets = {
        "shards": ShardCrops(ShardDataset(work / "shards"), shard_tf),
        "imagefolder": ImageFolder(str(folder), transform=folder_tf),
        "shards+mask": PretrainStream(work / "shards", img_size, mask, crop_scale=scale, crop_ratio=ratio),
    }
    n = len(datasets["shards"])
    assert all(len(d) == n for d in datasets.values()), {k: len(d) for k, d in datasets.items()}
    a, b = datasets["shards"][0], datasets["imagefolder"][0][0]
    assert a.shape == b.shape == (3, img_size, img_size) and a.dtype == b.dtype == torch.float32

    def loader(ds):
        g = torch.Generator().manual_seed(0)
        return DataLoader(ds, batch_size=args.batch_size, shuffle=True, generator=g, num_workers=args.workers)

    cores = max(1, args.workers)
    runs: dict[str, list[float]] = {k: [] for k in datasets}
    for ds in datasets.values():  # warm-up: page cache, lazy mmaps, allocator
        sub = torch.utils.data.Subset(ds, range(min(n, 4 * args.batch_size)))
        throughput(loader(sub), len(sub))
    for r in range(args.repeats):
        for name, ds in datasets.items():
            runs[name].append(throughput(loader(ds), n) / cores)
        print(f"run {r + 1}/{args.repeats}: " + ", ".join(f"{k} {v[-1]:.0f}" for k, v in runs.items()) + " img/s/core")

    med = {k: statistics.median(v) for k, v in runs.items()}
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print()
    print(
        f"machine: {cpu_model()}, {os.cpu_count()} logical CPUs ({affinity} usable), {platform.system()} "
        f"{platform.release()}"
    )
    print(
        f"python {platform.python_version()}, torch {torch.__version__} "
        f"({torch.get_num_threads()} thread(s)), torchvision {torchvision.__version__}, "
        f"Pillow {PIL.__version__}"
    )
    print(
        f"data: {n} images, mean JPEG {mean_kb:.1f} KB; shards: uint8 HWC, short side <= {args.shard_size}; "
        f"batch {args.batch_size}, DataLoader workers {args.workers}, "
        f"{args.repeats} alternating runs (median)"
    )
    print(
        "transforms: v2.RandomResizedCrop(192, scale=(0.67, 1), ratio=(3/4, 4/3), antialias) + "
        "v2.RandomHorizontalFlip + float [0, 1] + ImageNet normalisation; shards: on the uint8 tensor, then "
        "the fused NormaliseToFloat; imagefolder: on the PIL image, then v2.ToImage + "
        "v2.ToDtype(float32, scale) + v2.Normalize"
    )
    print(f"  shards (ShardDataset + RRC, flip, NormaliseToFloat)  {med['shards']:8.1f} img/s per core")
    print(f"  imagefolder (torchvision ImageFolder + PIL)          {med['imagefolder']:8.1f} img/s per core")
    print(f"  shards+mask (PretrainStream, full sample)            {med['shards+mask']:8.1f} img/s per core")
    print(f"ratio shards / imagefolder:      {med['shards'] / med['imagefolder']:.2f}x  (target >= 3x)")
    print(f"ratio shards+mask / imagefolder: {med['shards+mask'] / med['imagefolder']:.2f}x")
    if args.json:
        from benchmarks import record

        settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "json"}
        result = {
            "machine": record.machine(torch.device("cpu")),
            "versions": record.versions() | {"torchvision": torchvision.__version__, "pillow": PIL.__version__},
            "settings": settings | {"images_found": n, "mean_jpeg_kb": float(mean_kb)},
            "images_per_s_per_core": runs,
            "median_images_per_s_per_core": med,
            "ratio_shards_over_imagefolder": med["shards"] / med["imagefolder"],
        }
        print(f"results: {record.write(result, args.json)}")
    if args.work_dir is None:
        import shutil

        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
