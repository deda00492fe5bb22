"""How a sample of each task head is read: one reader class per head, registered under the head's name.

A reader turns a split's :class:`~gfm_core.data.tasks.index.SampleRef` into raw arrays (cacheable: [0, 1] images
and labels before resize/normalise/flip), knows the head's number of outputs, and turns the raw label into the
sample's tensors. :class:`~gfm_core.data.tasks.dataset.TaskDataset` does the rest (resize, normalise, flip).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from gfm_core.data.tasks.arrays import array_shape, crop, file_name, read_array, read_raw, resize
from gfm_core.data.tasks.bigearthnet import BEN43, BEN43_TO_19
from gfm_core.data.tasks.index import DatasetNotFoundError, SampleRef
from gfm_core.errors import DataValidationError
from gfm_core.task_heads import HeadRegistry

if TYPE_CHECKING:
    from gfm_core.data.tasks.dataset import TaskDataset


class SampleReader:
    """Reads the samples of one head for a dataset (its ``cfg``, ``classes``, ``meta``, ``channels``)."""

    head = ""
    resize_mode = "bilinear"

    def __init__(self, ds: TaskDataset) -> None:
        self.ds, self.cfg = ds, ds.cfg

    def num_outputs(self) -> int:
        """The head's outputs: classes, or output bands."""
        return len(self.ds.classes)

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """The sample's arrays: ``image`` ``[C, H, W]`` in [0, 1] and its label, cropped to the ref's window."""
        raise NotImplementedError

    def image(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """The model input: resized to ``size`` and normalised for the backbone."""
        return self.ds.normalise(resize(image, size, self.resize_mode))

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """The sample's label tensors (keyed as the head's target)."""
        raise NotImplementedError


#: Head name -> its sample reader (``@SAMPLE_READERS.register``; the names are the rows of ``HEADS``).
SAMPLE_READERS: HeadRegistry[type[SampleReader]] = HeadRegistry("sample reader")


@SAMPLE_READERS.register
class ClassificationSamples(SampleReader):
    """An image and its class id."""

    head = "classification"

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """The image and the ref's label."""
        return {"image": crop(read_array(ref.files["image"], self.cfg), ref.window), "label": ref.label}

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``label``: int64 class id."""
        return {"label": torch.tensor(int(raw["label"]), dtype=torch.long)}


@SAMPLE_READERS.register
class MultilabelSamples(SampleReader):
    """An image and its multi-hot labels: the layout's label indexes, or a label json (43 -> 19 classes for BEN v1)."""

    head = "multilabel"

    def __init__(self, ds: TaskDataset) -> None:
        super().__init__(ds)
        self.class_index = {c: i for i, c in enumerate(ds.classes)}
        self.ben43 = {c: i for i, c in enumerate(BEN43)}

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """The image and the multi-hot vector of its label file."""
        return {"image": crop(read_array(ref.files["image"], self.cfg), ref.window), "label": self._multi_hot(ref)}

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``label``: float32 multi-hot ``[L]``."""
        return {"label": torch.from_numpy(raw["label"])}

    def _multi_hot(self, ref: SampleRef) -> np.ndarray:
        target = np.zeros(len(self.ds.classes), np.float32)
        if ref.labels is not None:  # listed by the layout (geobench's labels.csv)
            target[list(ref.labels)] = 1
            return target
        path = ref.files["labels"]
        assert isinstance(path, Path)
        if not path.is_file():
            raise DatasetNotFoundError(path, "label metadata json", self.cfg)
        try:
            names = json.loads(path.read_text())["labels"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise DataValidationError(f"{path}: no 'labels' list ({e})") from e
        for name in names:
            if self.ds.meta.get("ben19"):
                if name not in self.ben43:
                    raise DataValidationError(f"{path}: label {name!r} is not one of BigEarthNet's 43 classes")
                j = BEN43_TO_19.get(self.ben43[name])
                if j is not None:
                    target[j] = 1
            elif name in self.class_index:
                target[self.class_index[name]] = 1
            else:
                raise DataValidationError(
                    f"{path}: label {name!r} is not in the task's classes {list(self.ds.classes)} "
                    f"(set finetune.tasks[{self.cfg.name}].classes)"
                )
        return target


@SAMPLE_READERS.register
class SegmentationSamples(SampleReader):
    """An image and its class map (``mask_values`` mapped to 0..K-1, anything else ``ignore_index``)."""

    head = "segmentation"

    def num_outputs(self) -> int:
        """``len(mask_values)`` or ``num_classes``."""
        cfg = self.cfg
        return len(cfg.mask_values) if cfg.mask_values is not None else int(cfg.num_classes or 0)

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """The image and its mask (same size).

        Raises:
            DataValidationError: they differ in size, or a mask value is no class.
        """
        image = crop(read_array(ref.files["image"], self.cfg), ref.window)
        mask = crop(self._mask(ref.files["mask"]), ref.window)
        if image.shape[-2:] != mask.shape:
            raise DataValidationError(
                f"{ref.files['image']} is {image.shape[-1]}x{image.shape[-2]} px but its mask "
                f"{ref.files['mask']} is {mask.shape[1]}x{mask.shape[0]} px"
            )
        return {"image": image, "mask": mask}

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``mask``: int64 ``[H, W]`` at the label's native size."""
        return {"mask": torch.from_numpy(np.ascontiguousarray(raw["mask"])).long()}

    def _mask(self, path: Any) -> np.ndarray:
        cfg = self.cfg
        raw = read_raw(path, cfg)
        if cfg.mask_values is not None:
            mask = np.full(raw.shape, cfg.ignore_index, np.int64)
            for k, v in enumerate(cfg.mask_values):
                mask[raw == v] = k
            return mask
        k = int(cfg.num_classes or 0)
        bad = (raw >= k) & (raw != cfg.ignore_index) | (raw < 0)
        if bad.any():
            raise DataValidationError(
                f"{path}: mask values {sorted(np.unique(raw[bad]).tolist())[:8]} are outside 0..{k - 1} "
                f"and not "
                f"ignore_index {cfg.ignore_index} (set finetune.tasks[{cfg.name}].mask_values)"
            )
        return raw


@SAMPLE_READERS.register
class ChangeSamples(SampleReader):
    """Two dates stacked ``[2, C, H, W]`` (torchgeo's layout) and their change map (label > 0)."""

    head = "change"

    def num_outputs(self) -> int:
        """2: no change, change."""
        return 2

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """Both dates and the change map.

        Raises:
            DataValidationError: the dates or the label differ in bands or size.
        """
        a_path, b_path = ref.files["A"], ref.files["B"]
        a = read_array(a_path, self.cfg)
        b = read_array(b_path, self.cfg)
        if a.shape != b.shape:
            raise DataValidationError(
                f"change pair {ref.id!r} does not match: {file_name(a_path)} is {array_shape(a)} "
                f"but {file_name(b_path)} is "
                f"{array_shape(b)}; both dates need the same bands and size"
            )
        label_path = ref.files["label"]
        assert isinstance(label_path, Path)
        label = (read_raw(label_path, self.cfg) > 0).astype(np.int64)
        if label.shape != a.shape[-2:]:
            raise DataValidationError(
                f"change pair {ref.id!r}: label {label_path} is {label.shape[1]}x{label.shape[0]} px "
                f"but the images "
                f"are {a.shape[-1]}x{a.shape[-2]} px"
            )
        w = ref.window
        return {"image": np.stack([crop(a, w), crop(b, w)]), "mask": crop(label, w)}

    def image(self, image: Tensor, size: tuple[int, int]) -> Tensor:
        """Each date resized and normalised: ``[2, C, S, S]``."""
        return torch.stack([self.ds.normalise(resize(t, size, self.resize_mode)) for t in image])

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``mask``: int64 ``[H, W]``, 1 = change."""
        return {"mask": torch.from_numpy(np.ascontiguousarray(raw["mask"])).long()}


@SAMPLE_READERS.register
class SuperResSamples(SampleReader):
    """The low-resolution image as input (bicubic to the model's size) and the HR image as target."""

    head = "superres"
    resize_mode = "bicubic"

    def num_outputs(self) -> int:
        """The bands of the image (the head predicts every band)."""
        return self.ds.channels

    def raw(self, ref: SampleRef) -> dict[str, Any]:
        """The LR and HR images.

        Raises:
            DataValidationError: HR is not ``scale`` x LR with the same bands.
        """
        lr = read_array(ref.files["lr"], self.cfg)
        hr = read_array(ref.files["hr"], self.cfg)
        s = self.cfg.scale
        if hr.shape[0] != lr.shape[0] or hr.shape[1] != lr.shape[1] * s or hr.shape[2] != lr.shape[2] * s:
            raise DataValidationError(
                f"superres pair {ref.id!r}: HR {file_name(ref.files['hr'])} is {array_shape(hr)} but LR "
                f"{file_name(ref.files['lr'])} is {array_shape(lr)}; expected the same bands and HR = {s} x LR "
                f"(finetune.tasks[{self.cfg.name}].scale)"
            )
        w = ref.window
        return {"image": crop(lr, w, s), "target": crop(hr, w)}

    def label(self, raw: dict[str, Any]) -> dict[str, Tensor]:
        """``target``: float32 ``[C, H, W]`` HR image in [0, 1]."""
        return {"target": torch.from_numpy(np.ascontiguousarray(raw["target"])).float()}
