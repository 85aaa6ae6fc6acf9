"""Face data for the training kit: a synthetic identity dataset (no download) and a folder loader.

``SyntheticFaces``: every identity is a smooth random colour pattern (a low-resolution random
field, upsampled), drawn deterministically from (seed, identity); identities come in families
that share part of their pattern, which makes hard negatives.  Every image of an identity adds
nuisance variation: its own random pattern ("expression"), a shift, contrast and brightness
changes, and pixel noise.  Images depend only on (seed, identity, image index), so disjoint
identity ranges (``first_identity``) give a training set and an open-set test set from the same
distribution.

``FaceFolder``: a folder per identity of aligned crops (``root/<identity>/<image>``): .jpg,
.jpeg, .png, .bmp (read with Pillow, which is then required) or .npy (H x W x 3 uint8 arrays,
no extra dependency).  ``read_pairs`` reads a verification pairs list.

Both return (image, label) with the image a 3 x H x W float tensor in [-1, 1] (the usual
(x - 127.5) / 127.5 of face recognition).
"""

from __future__ import annotations

import math
import numbers
import pathlib
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")
ARRAY_SUFFIXES = (".npy",)


def _generator(*key: int) -> torch.Generator:
    """A torch.Generator seeded from integers: numpy's SeedSequence hashes the key, each entry
    as a fixed 64-bit word (stable across numpy versions, independent of Python's hash).

    Why a real hash: the additive mix used before, seed ^ (k + C + (seed << 6) + (seed >> 2)) per
    entry, spread a change of the middle entry (1: a family's pattern, 2: an identity's own, 3:
    its images) over a few low bits only, so that (seed, 2, identity) fell on (seed, 1, family)
    for other pairs: 40 of the quick preset's 160 identities drew another family's pattern as
    their own, 11 across the train/test split, and with other seeds the first expression of most
    identities was another identity's pattern (test_synthetic_faces_draw_independent_streams)."""
    words = np.array([int(k) % (1 << 64) for k in key], dtype=np.uint64)
    state = np.random.SeedSequence(words).generate_state(1, dtype=np.uint64)
    return torch.Generator().manual_seed(int(state[0]) >> 1)


class SyntheticFaces(Dataset):
    """``num_identities`` x ``images_per_identity`` deterministic synthetic "faces".

    Args:
        num_identities, images_per_identity: size of the set.
        image_size: side of the square RGB images (112 like aligned face crops).
        seed: the whole set is a function of the seed, the identity and image indices and
            ``images_per_identity`` (an identity's images are drawn together: the same identity
            with another image count has other images; its pattern stays the same).
        first_identity: global index of the first identity (disjoint ranges = disjoint identities).
        family_size: identities per family; they share ``family_weight`` of their pattern's variance.
        expression: weight of each image's own random pattern (the within-identity variation).
        noise: standard deviation of the pixel noise.
        grid: resolution of the random fields before upsampling (coarser = smoother patterns).
    """

    def __init__(self, num_identities: int, images_per_identity: int, image_size: int = 112, seed: int = 0,
                 first_identity: int = 0, family_size: int = 4, family_weight: float = 0.5,
                 expression: float = 0.4, noise: float = 0.1, grid: int = 6):
        for name, value in (("num_identities", num_identities), ("images_per_identity", images_per_identity),
                            ("image_size", image_size), ("grid", grid), ("seed", seed),
                            ("first_identity", first_identity)):
            # (2.5 identities raised a TypeError from deep inside, grid 0 a RuntimeError)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__})")
        if num_identities < 1 or images_per_identity < 1 or image_size < 8 or grid < 1 or first_identity < 0:
            raise ValueError(f"need num_identities >= 1, images_per_identity >= 1, image_size >= 8, grid >= 1 and "
                             f"first_identity >= 0, got {num_identities}, {images_per_identity}, {image_size}, "
                             f"{grid} and {first_identity}")
        for name, value in (("expression", expression), ("noise", noise)):
            # (a NaN noise gave all-zero images, silently)
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
        if isinstance(family_size, bool) or not isinstance(family_size, (int, np.integer)) or family_size < 1:
            raise ValueError(f"family_size must be a positive integer, got {family_size!r}")
        if not (0.0 <= family_weight < 1.0):
            raise ValueError(f"family_weight must lie in [0, 1), got {family_weight!r}")
        self.num_identities = num_identities
        self.images_per_identity = images_per_identity
        self.image_size = image_size
        self.first_identity = first_identity
        images = [self._identity_images(seed, first_identity + i, images_per_identity, image_size, family_size,
                                        family_weight, expression, noise, grid)
                  for i in range(num_identities)]
        # uint8, like decoded image files: 3 * 112 * 112 bytes per image.
        self.images = torch.cat(images)
        self.labels = torch.arange(num_identities).repeat_interleave(images_per_identity)

    @staticmethod
    def _identity_images(seed, identity, count, size, family_size, family_weight, expression, noise, grid):
        family = identity // family_size
        base = torch.randn(3, grid, grid, generator=_generator(seed, 1, family))
        own = torch.randn(3, grid, grid, generator=_generator(seed, 2, identity))
        pattern = math.sqrt(family_weight) * base + math.sqrt(1.0 - family_weight) * own
        g = _generator(seed, 3, identity)
        codes = pattern + expression * torch.randn(count, 3, grid, grid, generator=g)
        # Upsample with a margin, then crop at a random offset: a shift of up to 1/8 of the side.
        margin = size // 8
        big = F.interpolate(codes, size=(size + 2 * margin,) * 2, mode="bicubic", align_corners=False)
        offsets = torch.randint(0, 2 * margin + 1, (count, 2), generator=g)
        crops = torch.stack([big[k, :, int(y):int(y) + size, int(x):int(x) + size]
                             for k, (y, x) in enumerate(offsets)])
        contrast = torch.empty(count, 1, 1, 1).uniform_(0.7, 1.3, generator=g)
        brightness = 0.3 * torch.randn(count, 1, 1, 1, generator=g)
        crops = contrast * crops + brightness + noise * torch.randn(crops.shape, generator=g)
        return ((torch.tanh(crops / 2) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return to_float_image(self.images[index]), int(self.labels[index])

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Images and labels of many indices at once (faster than a DataLoader for in-memory data)."""
        index = torch.as_tensor(indices, dtype=torch.int64)
        return to_float_image(self.images[index]), self.labels[index]


def to_float_image(image: torch.Tensor) -> torch.Tensor:
    """uint8 (..., 3, H, W) -> float in [-1, 1]."""
    return (image.float() - 127.5) / 127.5


def _read_image(path: pathlib.Path) -> torch.Tensor:
    """3 x H x W uint8 tensor from an image file or an .npy array (H x W x 3 uint8)."""
    if path.suffix.lower() in ARRAY_SUFFIXES:
        array = np.load(path)
    else:
        try:
            from PIL import Image
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(f"reading {path.suffix} images needs Pillow (pip install pillow); "
                              f".npy arrays need nothing") from exc
        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
    if array.ndim != 3 or array.shape[2] != 3 or array.dtype != np.uint8:
        raise ValueError(f"{path}: expected an H x W x 3 uint8 image, got shape {array.shape} {array.dtype}")
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


class FaceFolder(Dataset):
    """``root/<identity>/<image>``: one folder per identity (sorted names -> labels 0, 1, ...).

    Images are read on access; ``image_size`` resizes them (bilinear) when given, otherwise they
    must already be the size the model expects (112 x 112 aligned crops).
    """

    def __init__(self, root, image_size: Optional[int] = None):
        if image_size is not None and (isinstance(image_size, bool) or not isinstance(image_size, int)
                                       or image_size < 1):
            raise ValueError(f"image_size must be a positive integer or None (keep the files' size), got {image_size!r}")
        self.root = pathlib.Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"dataset folder {self.root} does not exist")
        suffixes = IMAGE_SUFFIXES + ARRAY_SUFFIXES
        # Identities are the folders that hold images: an empty folder takes no label (labels
        # stay 0 ... C - 1, as a classifier head expects).
        self.classes: List[str] = []
        self.samples: List[Tuple[pathlib.Path, int]] = []
        for name in sorted(p.name for p in self.root.iterdir() if p.is_dir()):
            files = [f for f in sorted((self.root / name).iterdir()) if f.suffix.lower() in suffixes]
            if files:
                self.samples.extend((f, len(self.classes)) for f in files)
                self.classes.append(name)
        if not self.samples:
            raise ValueError(f"no images ({', '.join(suffixes)}) under {self.root}/<identity>/")
        self.labels = torch.tensor([label for _, label in self.samples])
        self.image_size = image_size
        self.index = {str(path.relative_to(self.root)): i for i, (path, _) in enumerate(self.samples)}

    def __len__(self) -> int:
        return len(self.samples)

    def load_uint8(self, index: int) -> torch.Tensor:
        image = _read_image(self.samples[index][0])
        if self.image_size is not None and tuple(image.shape[1:]) != (self.image_size, self.image_size):
            image = F.interpolate(image[None].float(), size=(self.image_size,) * 2, mode="bilinear",
                                  align_corners=False)[0].round().clamp(0, 255).to(torch.uint8)
        return image

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, int]:
        return to_float_image(self.load_uint8(index)), self.samples[index][1]

    def batch(self, indices: Sequence[int]) -> Tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([self.load_uint8(int(i)) for i in indices])
        return to_float_image(images), self.labels[torch.as_tensor(indices, dtype=torch.int64)]


def read_pairs(path, dataset: FaceFolder) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A verification pairs list: one pair per line, ``<image a> <image b> <1 same | 0 different>``,
    image paths relative to the dataset root (``identity/file``); blank lines and lines starting
    with '#' are skipped.  Returns (index_a, index_b, is_same) into ``dataset``.  A pair whose flag
    contradicts the folders (1 for two identities, 0 for one) is refused: the list and the
    dataset disagree on who is who, and the TPR would count it on the wrong side.  So is a list
    without a same or without a different pair (no TPR at an FPR to compute).
    """
    index_a, index_b, same = [], [], []
    for number, line in enumerate(pathlib.Path(path).read_text().splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 3 or parts[2] not in ("0", "1"):
            raise ValueError(f"{path}:{number}: expected '<image a> <image b> <0|1>', got {line!r}")
        for name in parts[:2]:
            if name not in dataset.index:
                raise ValueError(f"{path}:{number}: {name} is not an image under {dataset.root}")
        a, b, is_same = dataset.index[parts[0]], dataset.index[parts[1]], parts[2] == "1"
        if (int(dataset.labels[a]) == int(dataset.labels[b])) != is_same:
            raise ValueError(f"{path}:{number}: the pair is marked {parts[2]} ({'same' if is_same else 'different'}) "
                             f"but its images are of {'two identities' if is_same else 'one identity'} "
                             f"({dataset.classes[int(dataset.labels[a])]!r}, {dataset.classes[int(dataset.labels[b])]!r})")
        index_a.append(a)
        index_b.append(b)
        same.append(is_same)
    if not same:
        raise ValueError(f"{path}: no pairs")
    # (TPR at an FPR needs both kinds: found here, before a training run, not at its evaluation)
    if all(same) or not any(same):
        kind, missing = ("same (1)", "different (0)") if all(same) else ("different (0)", "same (1)")
        raise ValueError(f"{path}: every pair is marked {kind}: TPR at an FPR needs {missing} pairs too")
    return torch.tensor(index_a), torch.tensor(index_b), torch.tensor(same)
