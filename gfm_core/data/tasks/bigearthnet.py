"""BigEarthNet v1 (Sentinel-2 part, torchgeo's folder layout): its label names and the 43 -> 19 class mapping."""

from __future__ import annotations

import json

from gfm_core.config import TaskCfg
from gfm_core.data.tasks.index import SampleRef, TaskIndex, check_split, natural_key, need_dir, split_lines

#: BigEarthNet's 43 CLC level-3 names (label json) and their 19-class indices (torchgeo ``label_converter``).
BEN43: tuple[str, ...] = (
    "Continuous urban fabric",
    "Discontinuous urban fabric",
    "Industrial or commercial units",
    "Road and rail networks and associated land",
    "Port areas",
    "Airports",
    "Mineral extraction sites",
    "Dump sites",
    "Construction sites",
    "Green urban areas",
    "Sport and leisure facilities",
    "Non-irrigated arable land",
    "Permanently irrigated land",
    "Rice fields",
    "Vineyards",
    "Fruit trees and berry plantations",
    "Olive groves",
    "Pastures",
    "Annual crops associated with permanent crops",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland",
    "Moors and heathland",
    "Sclerophyllous vegetation",
    "Transitional woodland/shrub",
    "Beaches, dunes, sands",
    "Bare rock",
    "Sparsely vegetated areas",
    "Burnt areas",
    "Inland marshes",
    "Peatbogs",
    "Salt marshes",
    "Salines",
    "Intertidal flats",
    "Water courses",
    "Water bodies",
    "Coastal lagoons",
    "Estuaries",
    "Sea and ocean",
)
BEN19: tuple[str, ...] = (
    "Urban fabric",
    "Industrial or commercial units",
    "Arable land",
    "Permanent crops",
    "Pastures",
    "Complex cultivation patterns",
    "Land principally occupied by agriculture, with significant areas of natural vegetation",
    "Agro-forestry areas",
    "Broad-leaved forest",
    "Coniferous forest",
    "Mixed forest",
    "Natural grassland and sparsely vegetated areas",
    "Moors, heathland and sclerophyllous vegetation",
    "Transitional woodland, shrub",
    "Beaches, dunes, sands",
    "Inland wetlands",
    "Coastal wetlands",
    "Inland waters",
    "Marine waters",
)
BEN43_TO_19: dict[int, int] = {
    0: 0,
    1: 0,
    2: 1,
    11: 2,
    12: 2,
    13: 2,
    14: 3,
    15: 3,
    16: 3,
    18: 3,
    17: 4,
    19: 5,
    20: 6,
    21: 7,
    22: 8,
    23: 9,
    24: 10,
    25: 11,
    31: 11,
    26: 12,
    27: 12,
    28: 13,
    29: 14,
    33: 15,
    34: 15,
    35: 16,
    36: 16,
    38: 17,
    39: 17,
    40: 18,
    41: 18,
    42: 18,
}  # the 43-class labels missing here (roads, ports, airports, bare rock, burnt areas, ...) are dropped


def bigearthnet_classes(cfg: TaskCfg) -> tuple[tuple[str, ...], bool]:
    """Label names and whether BigEarthNet's 43 -> 19 mapping applies.

    ``cfg.classes`` when set; else the ``classes`` of ``root/info.json`` (the demo task); else the 19 classes.
    """
    if cfg.classes is not None:
        return tuple(cfg.classes), False
    info = cfg.root / "info.json"
    if info.is_file():
        classes = json.loads(info.read_text()).get("classes")
        if isinstance(classes, dict):
            return tuple(classes[k] for k in sorted(classes, key=natural_key)), False
        if isinstance(classes, list):
            return tuple(classes), False
    return BEN19, True


def list_bigearthnet(cfg: TaskCfg, split: str) -> TaskIndex:
    """torchgeo BigEarthNet v1 (Sentinel-2 part): split csv + per-patch band files and label json."""
    check_split(cfg, split)
    root = need_dir(cfg.root, "dataset root", cfg)
    patches = need_dir(root / "BigEarthNet-v1.0", "Sentinel-2 patch folder", cfg)
    classes, ben19 = bigearthnet_classes(cfg)
    refs = []
    for line in split_lines(root / f"bigearthnet-{split}.csv", cfg):
        patch = line.split(",")[0].strip()
        folder = patches / patch
        bands = tuple(folder / f"{patch}_{b}.tif" for b in cfg.band_files)
        refs.append(
            SampleRef(id=patch, files={"image": bands, "labels": folder / f"{patch}_labels_metadata.json"})
        )
    return TaskIndex(refs, classes, {"ben19": ben19})
