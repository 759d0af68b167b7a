"""Data sets with deterministic train / val / test splits.

Small data sets (digits, MNIST, CIFAR, SVHN) are held in memory as tensors and batched by
`iterate`, which augments on the tensor side: on 2 CPU cores that is far faster than a
DataLoader over PIL images, and on a GPU the whole set sits in device memory. Image folders
(ImageNet-style trees) are read lazily from disk through a DataLoader.

Validation is always carved out of the training images with a fixed seed (fitness uses val);
the official test split, where there is one, is kept for final reports.
"""
from __future__ import annotations

import gzip
import hashlib
import math
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch import Tensor

from evoprune.errors import DataNotFound, EvopruneError, UnknownName, one_line

SPLIT_SEED = 1234  # fixed: val (and test, where no official one exists) are carved the same way everywhere
VAL_FRACTION = 0.1  # of the training images, stratified by class
DEFAULT_DATA_ROOT = "./data"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class BadImage(DataNotFound):
    """An image folder's file that cannot be read as an image (found while reading it)."""


# --------------------------------------------------------------------------- splits
@dataclass(frozen=True)
class TensorSplit:
    """Images in memory: x is uint8 [N, C, H, W] (0..255) or float32 already in [0, 1]."""

    x: Tensor
    y: Tensor  # int64 [N]

    def __len__(self) -> int:
        return len(self.y)


@dataclass(frozen=True)
class FileSplit:
    """Images on disk (an image folder), decoded on the fly to `image_size` squares."""

    paths: tuple[str, ...]
    y: Tensor  # int64 [N]
    image_size: int = 224

    def __len__(self) -> int:
        return len(self.y)


Split = TensorSplit | FileSplit


@dataclass(frozen=True)
class DataSet:
    name: str
    num_classes: int
    input_shape: tuple[int, int, int]  # C, H, W of what the model sees
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train: Split
    val: Split
    test: Split
    source: str  # where the files were read from, for messages and reports
    augment: str = "none"  # default training augmentation: none | flip | crop-flip | imagenet
    classes: tuple[str, ...] = field(default=())
    skipped: tuple[tuple[str, int], ...] = ()  # image folders: files left out, by suffix (not images)

    def fingerprint(self) -> str:
        """A short hash of the split contents; part of every pretraining cache key."""
        h = hashlib.sha256(self.name.encode())
        for split in (self.train, self.val, self.test):
            h.update(split.y.numpy().tobytes())
            if isinstance(split, TensorSplit):
                flat = split.x.reshape(len(split.x), -1)
                # every 7th image, every 13th value: cheap, yet any other data gives another hash
                h.update(flat[::7, ::13].contiguous().numpy().tobytes())
            else:  # the crop size and the seeded augmentation (v2) decide what a model is trained on
                h.update(f"{split.image_size}:augment-v2\n".encode() + "\n".join(split.paths).encode())
        return h.hexdigest()[:16]


# --------------------------------------------------------------------------- helpers
def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (rest, held_out): `fraction` of each class held out, in a seeded order."""
    rng = np.random.default_rng(seed)
    held: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        held.append(idx[: max(1, int(round(fraction * len(idx))))])
    held_idx = np.sort(np.concatenate(held))
    rest = np.setdiff1d(np.arange(len(labels)), held_idx)
    return rest, held_idx


def _carve_val(x: np.ndarray, y: np.ndarray, fraction: float = VAL_FRACTION):
    rest, val = stratified_split(y, fraction, SPLIT_SEED)
    return _tensor_split(x[rest], y[rest]), _tensor_split(x[val], y[val])


def _tensor_split(x: np.ndarray, y: np.ndarray) -> TensorSplit:
    # np.array copies: arrays from np.frombuffer are read-only, torch wants writable memory
    return TensorSplit(torch.from_numpy(np.array(x, order="C")), torch.from_numpy(y.astype(np.int64)))


def _channel_stats(x: Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    xf = x.float() / (255.0 if x.dtype == torch.uint8 else 1.0)
    return tuple(xf.mean(dim=(0, 2, 3)).tolist()), tuple(xf.std(dim=(0, 2, 3)).clamp_min(1e-3).tolist())


def _in_memory(name, x_tr, y_tr, x_te, y_te, *, source, augment, classes=()) -> DataSet:
    train, val = _carve_val(x_tr, y_tr)
    mean, std = _channel_stats(train.x)
    return DataSet(
        name=name, num_classes=int(max(y_tr.max(), y_te.max()) + 1), input_shape=tuple(x_tr.shape[1:]),
        mean=mean, std=std, train=train, val=val, test=_tensor_split(x_te, y_te),
        source=source, augment=augment, classes=tuple(classes),
    )


# --------------------------------------------------------------------------- readers
def load_digits_dataset(root: Path, download: bool) -> DataSet:
    """scikit-learn's bundled 1797 real 8x8 digits; works offline. 20% test, then 10% val."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]  # [N, 1, 8, 8] in [0, 1]
    y = d.target.astype(np.int64)
    rest, test = stratified_split(y, 0.2, SPLIT_SEED + 1)
    return _in_memory("digits", x[rest], y[rest], x[test], y[test],
                      source="scikit-learn (bundled)", augment="none")


def read_cifar_batches(folder: Path, files: list[str], label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Read official CIFAR python batches (pickled dicts) -> uint8 [N, 3, 32, 32], int64 [N]."""
    xs, ys = [], []
    for name in files:
        path = folder / name
        if not path.is_file():
            raise DataNotFound(f"missing CIFAR batch file {path}")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="latin1")
            data = np.asarray(d["data"], dtype=np.uint8)
            labels = np.asarray(d[label_key], dtype=np.int64)
        except Exception as e:  # truncated / not a pickle / wrong keys
            raise DataNotFound(f"corrupt CIFAR batch file {path}: {type(e).__name__}: {e}") from None
        if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
            raise DataNotFound(f"corrupt CIFAR batch file {path}: data {data.shape}, {len(labels)} labels")
        xs.append(data.reshape(-1, 3, 32, 32))
        ys.append(labels)
    return np.concatenate(xs), np.concatenate(ys)


def _cifar(root: Path, download: bool, *, name: str, folder: str, files_train, files_test,
           label_key: str, tv_class: str) -> DataSet:
    base = root / folder
    if not base.is_dir():
        if not download:
            raise DataNotFound(
                f"{name}: no official python batches at {base.resolve()}. Download the "
                f"'python version' archive and extract it under {root.resolve()}, or rerun with "
                f"--download (needs a network)")
        import torchvision.datasets as tvd

        getattr(tvd, tv_class)(str(root), train=True, download=True)
    x_tr, y_tr = read_cifar_batches(base, files_train, label_key)
    x_te, y_te = read_cifar_batches(base, files_test, label_key)
    return _in_memory(name, x_tr, y_tr, x_te, y_te, source=str(base.resolve()), augment="crop-flip")


def load_cifar10(root: Path, download: bool) -> DataSet:
    return _cifar(root, download, name="cifar10", folder="cifar-10-batches-py",
                  files_train=[f"data_batch_{i}" for i in range(1, 6)], files_test=["test_batch"],
                  label_key="labels", tv_class="CIFAR10")


def load_cifar100(root: Path, download: bool) -> DataSet:
    return _cifar(root, download, name="cifar100", folder="cifar-100-python", files_train=["train"],
                  files_test=["test"], label_key="fine_labels", tv_class="CIFAR100")


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (MNIST's format), plain or gzipped; the header carries the shape."""
    opener: Callable = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        if raw[:2] != b"\x00\x00" or raw[2] != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        ndim = raw[3]
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        arr = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return arr.reshape(shape)  # raises if the file is truncated
    except Exception as e:
        raise DataNotFound(f"corrupt IDX file {path}: {e}") from None


def _find_idx(raw: Path, stem: str) -> Path | None:
    for cand in (raw / stem, raw / f"{stem}.gz"):
        if cand.is_file():
            return cand
    return None


def load_mnist(root: Path, download: bool) -> DataSet:
    raw = root / "MNIST" / "raw"
    stems = ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte"]
    if any(_find_idx(raw, s) is None for s in stems):
        if not download:
            raise DataNotFound(f"mnist: no IDX files at {raw.resolve()}. Put the four official "
                               f"files there, or rerun with --download (needs a network)")
        import torchvision.datasets as tvd

        tvd.MNIST(str(root), train=True, download=True)
    x_tr, y_tr, x_te, y_te = (read_idx(_find_idx(raw, s)) for s in stems)
    if len(x_tr) != len(y_tr) or len(x_te) != len(y_te):
        raise DataNotFound(f"mnist: image and label counts differ in {raw.resolve()}")
    return _in_memory("mnist", x_tr[:, None], y_tr.astype(np.int64), x_te[:, None], y_te.astype(np.int64),
                      source=str(raw.resolve()), augment="none")


def load_svhn(root: Path, download: bool) -> DataSet:
    import torchvision.datasets as tvd

    base = root / "svhn"
    try:
        tr = tvd.SVHN(str(base), split="train", download=download)
        te = tvd.SVHN(str(base), split="test", download=download)
    except RuntimeError:
        raise DataNotFound(f"svhn: no train_32x32.mat / test_32x32.mat at {base.resolve()}; rerun with "
                           f"--download (needs a network) or copy them there") from None
    return _in_memory("svhn", tr.data, tr.labels.astype(np.int64), te.data, te.labels.astype(np.int64),
                      source=str(base.resolve()), augment="crop")


def _list_images(folder: Path, class_to_idx: dict[str, int] | None = None):
    """(classes, samples, skipped): the class folders under `folder`, the (path, class) pairs of
    their images (torchvision's extensions, any case) in the order torchvision's `make_dataset`
    gives them, and a count, by suffix, of the other files (hidden ones, such as .DS_Store, aside),
    which are left out. One walk of the tree."""
    from torchvision.datasets.folder import IMG_EXTENSIONS

    classes, found = _find_classes(folder)
    mapping = class_to_idx or found
    samples: list[tuple[str, int]] = []
    skipped: Counter[str] = Counter()
    for c in sorted(mapping):
        target = os.path.join(os.path.expanduser(str(folder)), c)
        if not os.path.isdir(target):
            continue
        for root, _, files in sorted(os.walk(target, followlinks=True)):
            for f in sorted(files):
                if f.lower().endswith(IMG_EXTENSIONS):
                    samples.append((os.path.join(root, f), mapping[c]))
                elif not f.startswith("."):
                    skipped[os.path.splitext(f)[1].lower() or "(none)"] += 1
    return classes, samples, skipped


def suffix_counts(skipped) -> str:
    """Files left out, by suffix, in words: '.gif 48, .txt 1' (a Counter or (suffix, n) pairs)."""
    return ", ".join(f"{suffix} {n}" for suffix, n in sorted(dict(skipped).items()))


def _check_classes(where: Path, classes: list[str], y: np.ndarray, least: int) -> None:
    """Refuse class folders with fewer than `least` images: a class the model cannot learn
    (or, with one image, that val takes whole) would be an output that is never trained."""
    counts = np.bincount(y, minlength=len(classes))
    few = [f"{c} ({n})" for c, n in zip(classes, counts.tolist()) if n < least]
    if few:
        shown = ", ".join(few[:8]) + (f" and {len(few) - 8} more" if len(few) > 8 else "")
        raise DataNotFound(f"imagefolder: class folders under {where.resolve()} with fewer than {least} "
                           f"images: {shown}; add images or remove those folders")


def _find_classes(folder: Path):
    from torchvision.datasets.folder import find_classes

    return find_classes(str(folder))


def load_imagefolder(path: Path, image_size: int = 224) -> DataSet:
    """An ImageNet-style tree: PATH/train/CLASS/*.jpg (+ PATH/val or PATH/test), or PATH/CLASS/*.jpg.

    With a separate val/ (ImageNet's convention) that folder is our *test* split and val is
    carved from train; a single tree is split 80/20 into train/test first.
    """
    if not path.is_dir():
        raise DataNotFound(f"imagefolder: {path.resolve()} is not a directory")
    train_dir = path / "train" if (path / "train").is_dir() else path
    try:
        classes, samples, skipped = _list_images(train_dir)
    except (FileNotFoundError, RuntimeError) as e:
        raise DataNotFound(f"imagefolder: no class folders under {train_dir.resolve()} ({e})") from None
    if not samples:
        raise DataNotFound(f"imagefolder: no images under {train_dir.resolve()}"
                           + (f" (files whose suffix is not an image's: {suffix_counts(skipped)})" if skipped else ""))
    paths = np.array([p for p, _ in samples])
    y = np.array([c for _, c in samples], dtype=np.int64)
    test_dir = next((path / d for d in ("val", "test") if train_dir != path and (path / d).is_dir()), None)
    # each class keeps a training image beside the one val holds out (and, in a single tree, test)
    _check_classes(train_dir, classes, y, 2 if test_dir is not None else 3)
    if test_dir is not None:
        try:
            test_classes, _ = _find_classes(test_dir)
        except (FileNotFoundError, RuntimeError):
            test_classes = []
        extra = sorted(set(test_classes) - set(classes))
        if extra:
            raise DataNotFound(f"imagefolder: {test_dir.resolve()} has classes {train_dir.resolve()} lacks: "
                               f"{', '.join(extra[:8])}{' ...' if len(extra) > 8 else ''}; a model trained "
                               f"on the train classes cannot be tested on them")
        _, test_samples, test_skipped = _list_images(test_dir, {c: i for i, c in enumerate(classes)})
        skipped += test_skipped
        te_paths = np.array([p for p, _ in test_samples])
        te_y = np.array([c for _, c in test_samples], dtype=np.int64)
    else:
        rest, test = stratified_split(y, 0.2, SPLIT_SEED + 1)
        paths, y, te_paths, te_y = paths[rest], y[rest], paths[test], y[test]
    rest, val = stratified_split(y, VAL_FRACTION, SPLIT_SEED)

    def fs(p, t):
        return FileSplit(tuple(p.tolist()), torch.from_numpy(t), image_size)

    return DataSet(
        name=f"imagefolder:{path}", num_classes=len(classes), input_shape=(3, image_size, image_size),
        mean=IMAGENET_MEAN, std=IMAGENET_STD, train=fs(paths[rest], y[rest]), val=fs(paths[val], y[val]),
        test=fs(te_paths, te_y), source=str(path.resolve()), augment="imagenet", classes=tuple(classes),
        skipped=tuple(sorted(skipped.items())),
    )


@dataclass(frozen=True)
class DataSpec:
    name: str
    description: str
    loader: Callable[[Path, bool], DataSet]
    where: str  # where under the data root the files are expected


DATASETS: dict[str, DataSpec] = {
    s.name: s for s in [
        DataSpec("digits", "scikit-learn's 1797 real 8x8 handwritten digits (default, offline)",
                 load_digits_dataset, "(bundled with scikit-learn)"),
        DataSpec("mnist", "MNIST 28x28 digits, official IDX files", load_mnist, "MNIST/raw/"),
        DataSpec("cifar10", "CIFAR-10 32x32, official python batches", load_cifar10, "cifar-10-batches-py/"),
        DataSpec("cifar100", "CIFAR-100 32x32, official python batches", load_cifar100, "cifar-100-python/"),
        DataSpec("svhn", "SVHN 32x32 (train/test .mat)", load_svhn, "svhn/"),
    ]
}


def resolve_data_root(flag: str | os.PathLike | None = None, config: str | None = None) -> tuple[Path, str]:
    """The data root and where it came from: --data-root, then $EVOPRUNE_DATA_ROOT, then config."""
    if flag:
        return Path(flag), "--data-root"
    if os.environ.get("EVOPRUNE_DATA_ROOT"):
        return Path(os.environ["EVOPRUNE_DATA_ROOT"]), "$EVOPRUNE_DATA_ROOT"
    if config:
        return Path(config), "config"
    return Path(DEFAULT_DATA_ROOT), "default"


def dataset_names() -> list[str]:
    return [*DATASETS, "imagefolder:PATH"]


@lru_cache(maxsize=8)
def _load_cached(name: str, root: str, download: bool) -> DataSet:
    if name.startswith("imagefolder:"):
        rel, _, query = name.split(":", 1)[1].partition("?")
        if not rel:
            raise EvopruneError("imagefolder needs a path: imagefolder:/path/to/tree")
        size = 224
        if query:
            key, _, value = query.partition("=")
            if key != "size" or not value.isdigit() or int(value) < 8:
                raise EvopruneError(f"imagefolder: unknown option {query!r} (the one option is ?size=PIXELS, >= 8)")
            size = int(value)
        p = Path(rel)
        if not p.exists() and not p.is_absolute():  # a relative path may live under the data root
            p = Path(root) / p if (Path(root) / p).exists() else p
        return load_imagefolder(p, size)
    if name not in DATASETS:
        raise UnknownName("data set", name, dataset_names())
    return DATASETS[name].loader(Path(root), download)


@lru_cache(maxsize=8)
def _with_val_fraction(name: str, root: str, download: bool, fraction: float) -> DataSet:
    """The data set with val carved anew from train + val: `fraction` of each class (a search
    task may want more validation images than the default tenth; the test split stays)."""
    ds = _load_cached(name, root, download)
    if abs(fraction - VAL_FRACTION) < 1e-12:
        return ds
    y = torch.cat([ds.train.y, ds.val.y])
    rest, val = (torch.from_numpy(i) for i in stratified_split(y.numpy(), fraction, SPLIT_SEED))
    if isinstance(ds.train, FileSplit):
        paths = ds.train.paths + ds.val.paths
        pick = lambda idx: FileSplit(tuple(paths[i] for i in idx.tolist()), y[idx], ds.train.image_size)  # noqa: E731
    else:
        x = torch.cat([ds.train.x, ds.val.x])
        pick = lambda idx: TensorSplit(x[idx], y[idx])  # noqa: E731
    return replace(ds, train=pick(rest), val=pick(val))


def load_dataset(name: str, root: str | os.PathLike | None = None, download: bool | None = None,
                 val_fraction: float = VAL_FRACTION) -> DataSet:
    """Load a registered data set by name, reading files under `root` (see resolve_data_root);
    `val_fraction` of the training images (per class) form the validation split."""
    if not 0 < val_fraction < 0.9:
        raise EvopruneError(f"val_fraction must be in (0, 0.9), got {val_fraction}")
    root_path, _ = resolve_data_root(root)
    if download is None:
        download = os.environ.get("EVOPRUNE_DOWNLOAD", "") in ("1", "true", "yes")
    return _with_val_fraction(name, str(root_path), bool(download), float(val_fraction))


# --------------------------------------------------------------------------- batching
def _normalizer(ds: DataSet, device: torch.device):
    mean = torch.tensor(ds.mean, device=device).view(1, -1, 1, 1)
    std = torch.tensor(ds.std, device=device).view(1, -1, 1, 1)
    return lambda x: (x - mean) / std


def _augment(x: Tensor, kind: str, g: torch.Generator) -> Tensor:
    """Random flips / 4-pixel translations, per sample, on a float batch [B, C, H, W]."""
    b, _, h, w = x.shape
    if kind in ("crop", "crop-flip"):
        pad = 4
        xp = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
        dy = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
        dx = torch.randint(0, 2 * pad + 1, (b,), generator=g).to(x.device)
        rows = (torch.arange(h, device=x.device)[None] + dy[:, None])[:, None, :, None]
        cols = (torch.arange(w, device=x.device)[None] + dx[:, None])[:, None, None, :]
        bi = torch.arange(b, device=x.device)[:, None, None, None]
        ci = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = xp[bi, ci, rows, cols]
    if kind in ("flip", "crop-flip"):
        flip = (torch.rand(b, generator=g) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(3), x)
    return x


def iterate(ds: DataSet, split: Split, *, batch_size: int, shuffle: bool = False, augment: str = "none",
            seed: int = 0, device: torch.device | str = "cpu", drop_last: bool = False,
            limit: int | None = None, workers: int = 0,
            shard: tuple[int, int] = (0, 1)) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield normalized (x float32 [B, C, H, W], y int64 [B]) batches on `device`.

    The order depends only on `seed`, so every candidate can see the same data stream.
    `limit` caps the number of images (a subset drawn in the seeded order). `shard=(rank,
    world)` gives process `rank` of `world` every world-th image of that order (as PyTorch's
    DistributedSampler does; the order is first cut to a multiple of `world`, so every process
    sees as many batches); `batch_size` is then per process.
    """
    device = torch.device(device)
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(split), generator=g) if shuffle else torch.arange(len(split))
    if limit is not None:
        order = order[:limit]
    rank, world = shard
    if world > 1:
        order = order[: len(order) - len(order) % world][rank::world]
    if isinstance(split, FileSplit):
        yield from _iterate_files(ds, split, order, batch_size=batch_size, augment=augment, device=device,
                                  drop_last=drop_last, workers=workers, g=g, shard=shard)
        return
    norm = _normalizer(ds, device)
    scale = 255.0 if split.x.dtype == torch.uint8 else 1.0
    stop = len(order) - (len(order) % batch_size if drop_last else 0)
    for i in range(0, stop, batch_size):
        idx = order[i: i + batch_size]
        x = split.x[idx].to(device, non_blocking=True).float().div_(scale)
        if augment != "none":
            x = _augment(x, augment, g)
        yield norm(x), split.y[idx].to(device, non_blocking=True)


class _FileDataset(torch.utils.data.Dataset):
    """The images of `split` in `order`, decoded and augmented one by one (in DataLoader workers).
    Item k's random crop and flip come from a generator seeded with `seed` + its position in the
    unsharded order (`k * world + rank`), never from the global RNG: the stream depends on
    `iterate`'s seed alone, whatever the number of workers, and shards draw differently.
    `augment`: none (resize and centre crop), imagenet (RandomResizedCrop and flip, drawn as
    torchvision draws them), or the tensor kinds (flip, crop, crop-flip) on the centre crop."""

    def __init__(self, split: FileSplit, order: list[int], augment: str, seed: int, shard: tuple[int, int]):
        from torchvision import transforms as T

        s = split.image_size
        self.split, self.order, self.augment, self.seed, self.shard = split, order, augment, seed, shard
        self.center = T.Compose([T.Resize(int(round(s * 256 / 224))), T.CenterCrop(s)])

    def __len__(self):
        return len(self.order)

    def __getitem__(self, k):
        from PIL import Image

        i = self.order[k]
        g = torch.Generator().manual_seed(self.seed + k * self.shard[1] + self.shard[0])
        try:
            with Image.open(self.split.paths[i]) as im:
                rgb = im.convert("RGB")  # decodes the whole file
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            # a truncated or mislabelled file, one that vanished or PIL will not open: the user's data
            raise BadImage(f"imagefolder: cannot read {self.split.paths[i]} ({one_line(e, 120)}); "
                           f"remove or replace it") from None
        return self._item(rgb, g), self.split.y[i]

    def _item(self, im, g: torch.Generator) -> Tensor:
        from torchvision.transforms import functional as TF

        if self.augment == "imagenet":
            s = self.split.image_size
            x = TF.to_tensor(TF.resized_crop(im, *_crop_box(im.width, im.height, g), [s, s]))
            return x.flip(2) if torch.rand(1, generator=g).item() < 0.5 else x
        x = TF.to_tensor(self.center(im))
        return _augment(x[None], self.augment, g)[0] if self.augment != "none" else x


def _crop_box(width: int, height: int, g: torch.Generator, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """(top, left, height, width) of a random crop, as torchvision's RandomResizedCrop picks it,
    drawn from `g`."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        u = torch.rand(2, generator=g).tolist()
        target = area * (scale[0] + (scale[1] - scale[0]) * u[0])
        aspect = math.exp(log_ratio[0] + (log_ratio[1] - log_ratio[0]) * u[1])
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=g))
            left = int(torch.randint(0, width - w + 1, (1,), generator=g))
            return top, left, h, w
    in_ratio = width / height  # fallback: the centre, clamped to the ratio range
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _iterate_files(ds, split, order, *, batch_size, augment, device, drop_last, workers, g, shard):
    seed = int(torch.randint(0, 2**62, (1,), generator=g))  # the stream's augmentation, from its seed
    items = _FileDataset(split, order.tolist(), augment, seed, shard)
    dl = torch.utils.data.DataLoader(items, batch_size=batch_size, num_workers=workers, drop_last=drop_last,
                                     pin_memory=device.type == "cuda")
    norm = _normalizer(ds, device)
    try:
        for x, y in dl:
            yield norm(x.to(device, non_blocking=True)), y.to(device, non_blocking=True)
    except BadImage as e:  # from a DataLoader worker, its text is the worker's whole traceback
        raise BadImage(str(e).strip().splitlines()[-1].removeprefix(f"{BadImage.__module__}.BadImage: ")) from None


def quick_status(name: str, root: Path) -> str:
    """Whether a data set's files are present under root, without reading them."""
    spec = DATASETS[name]
    if name == "digits":
        return "available"
    return "found" if (root / spec.where).exists() else "not found"
