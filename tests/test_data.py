"""Data sets: deterministic, disjoint splits; the official readers on real files; clear errors."""
from __future__ import annotations

import hashlib
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from evoprune import data as D
from evoprune.errors import DataNotFound, UnknownName

from helpers import image_folder


def _reload(name, root):
    D._load_cached.cache_clear()  # a second, independent read from disk
    return D.load_dataset(name, root)


def _read_anew(name: str, root=None):
    D._load_cached.cache_clear()
    D._with_val_fraction.cache_clear()
    return D.load_dataset(name, root)


def _row_hashes(x) -> Counter:
    flat = x.reshape(len(x), -1)
    return Counter(hashlib.sha1(np.ascontiguousarray(r)).hexdigest() for r in np.asarray(flat))


@given(st.lists(st.integers(0, 4), min_size=5, max_size=200), st.floats(0.05, 0.5), st.integers(0, 99))
@settings(max_examples=60, deadline=None)
def test_stratified_split_is_a_partition(labels, frac, seed):
    y = np.array(labels)
    rest, held = D.stratified_split(y, frac, seed)
    assert len(np.intersect1d(rest, held)) == 0
    assert sorted(np.concatenate([rest, held]).tolist()) == list(range(len(y)))
    assert set(y[held]) == set(y)  # every class is represented in the held-out part
    again = D.stratified_split(y, frac, seed)
    assert np.array_equal(again[1], held)


@pytest.mark.parametrize("name", ["digits", "cifar10", "mnist"])
def test_splits_are_stable_across_reads(name, shared_data):
    a = _reload(name, shared_data)
    b = _reload(name, shared_data)
    assert a.fingerprint() == b.fingerprint()
    for sa, sb in ((a.train, b.train), (a.val, b.val), (a.test, b.test)):
        assert torch.equal(sa.x, sb.x) and torch.equal(sa.y, sb.y)


def test_cifar_train_and_val_partition_the_official_train_files(shared_data):
    ds = _reload("cifar10", shared_data)
    folder = shared_data / "cifar-10-batches-py"
    x, _ = D.read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    assert _row_hashes(ds.train.x.numpy()) + _row_hashes(ds.val.x.numpy()) == _row_hashes(x)
    assert not set(_row_hashes(ds.val.x.numpy())) & set(_row_hashes(ds.test.x.numpy()))


def test_digits_splits_partition_the_bundled_set():
    from sklearn.datasets import load_digits

    ds = _reload("digits", None)
    allx = (load_digits().images.astype(np.float32) / 16.0)[:, None]
    parts = [ds.train.x.numpy(), ds.val.x.numpy(), ds.test.x.numpy()]
    assert sum(map(len, parts)) == 1797
    assert sum((_row_hashes(p) for p in parts), Counter()) == _row_hashes(allx)


def test_cifar_reader_reads_the_shared_subset(shared_data):
    folder = shared_data / "cifar-10-batches-py"
    x, y = D.read_cifar_batches(folder, [f"data_batch_{i}" for i in range(1, 6)], "labels")
    assert x.shape == (5170, 3, 32, 32) and x.dtype == np.uint8
    counts = np.bincount(y, minlength=10)
    assert counts.min() >= 484 and counts.max() <= 540  # as the data README says
    xt, yt = D.read_cifar_batches(folder, ["test_batch"], "labels")
    assert xt.shape == (1017, 3, 32, 32) and set(yt) == set(range(10))
    ds = _reload("cifar10", shared_data)
    assert ds.num_classes == 10 and ds.input_shape == (3, 32, 32)
    assert len(ds.train) + len(ds.val) == 5170 and len(ds.test) == 1017


def test_mnist_reader_reads_the_shared_subset(shared_data):
    ds = _reload("mnist", shared_data)
    assert len(ds.train) + len(ds.val) == 17435 and len(ds.test) == 10000
    assert ds.input_shape == (1, 28, 28)


def test_missing_data_says_where_it_looked(tmp_path):
    with pytest.raises(DataNotFound) as e:
        _reload("cifar10", tmp_path)
    assert str(tmp_path / "cifar-10-batches-py") in str(e.value) and "--download" in str(e.value)
    with pytest.raises(DataNotFound, match="MNIST/raw"):
        _reload("mnist", tmp_path)


def test_corrupt_cifar_batch_is_reported(tmp_path, shared_data):
    folder = tmp_path / "cifar-10-batches-py"
    shutil.copytree(shared_data / "cifar-10-batches-py", folder)
    raw = (folder / "data_batch_3").read_bytes()
    (folder / "data_batch_3").write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataNotFound, match="corrupt CIFAR batch file .*data_batch_3"):
        _reload("cifar10", tmp_path)


def test_unknown_dataset_name():
    with pytest.raises(UnknownName, match="unknown data set 'imagenette'"):
        D.load_dataset("imagenette")


def test_batches_are_deterministic_and_normalized(shared_data):
    ds = _reload("cifar10", shared_data)
    kw = dict(batch_size=256, shuffle=True, augment="crop-flip", seed=7)
    (x1, y1), (x2, y2) = next(D.iterate(ds, ds.train, **kw)), next(D.iterate(ds, ds.train, **kw))
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert x1.shape == (256, 3, 32, 32)
    x3, _ = next(D.iterate(ds, ds.train, **{**kw, "seed": 8}))
    assert not torch.equal(x1, x3)
    plain = torch.cat([x for x, _ in D.iterate(ds, ds.train, batch_size=1000)])
    assert plain.mean().abs() < 0.05 and (plain.std() - 1).abs() < 0.05


def test_imagefolder_tree_from_real_images(tmp_path, shared_data):
    from PIL import Image

    x, y = D.read_cifar_batches(shared_data / "cifar-10-batches-py", ["test_batch"], "labels")
    for split, rows in (("train", range(0, 60)), ("val", range(60, 80))):
        for i in rows:
            d = tmp_path / split / f"class{y[i] % 3}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].transpose(1, 2, 0)).save(d / f"{i}.png")
    ds = D.load_imagefolder(tmp_path, image_size=32)
    assert ds.num_classes == 3 and len(ds.test) == 20 and len(ds.train) + len(ds.val) == 60
    xb, yb = next(D.iterate(ds, ds.test, batch_size=8))
    assert xb.shape == (8, 3, 32, 32) and yb.dtype == torch.int64
    with pytest.raises(DataNotFound, match="no images|no class folders"):
        D.load_imagefolder(tmp_path / "train" / "class0")


@pytest.mark.parametrize("augment", ["imagenet", "crop-flip"])
def test_an_image_folder_stream_depends_on_its_seed_alone(tmp_path, shared_data, augment):
    """Random crops and flips of files are drawn from the stream's seed, never from torch's global
    RNG, so every candidate of a search sees the same images, with or without loader workers."""
    ds = D.load_imagefolder(image_folder(tmp_path, shared_data, classes=2, train=12, val=2), image_size=32)

    def stream(seed, **kw):
        return [b for b in D.iterate(ds, ds.train, batch_size=8, shuffle=True, augment=augment, seed=seed, **kw)]

    first = stream(3)
    torch.manual_seed(123)  # the global RNG plays no part
    for again in (stream(3), stream(3, workers=2)):
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(first, again))
    assert not torch.equal(first[0][0], stream(4)[0][0])
    plain = next(D.iterate(ds, ds.train, batch_size=8, shuffle=True, seed=3))[0]
    assert first[0][0].shape == plain.shape and not torch.equal(first[0][0], plain)  # augmented


def test_an_image_folder_takes_any_pil_mode_and_names_what_it_cannot_use(tmp_path, shared_data, capsys):
    """ImageNet's .JPEG suffix, grayscale, palette, RGBA and CMYK files are read as RGB; a GIF is
    left out and counted by `data check`; an empty class folder, a val class train lacks and an
    unreadable file are each one error line (exit 2) that names them."""
    from PIL import Image

    from helpers import run

    root = image_folder(tmp_path / "t", shared_data, classes=2, train=10, val=3)
    pngs = sorted((root / "train" / "class0").glob("*.png"))
    for p, mode, suffix in zip(pngs, ["L", "P", "RGBA", "CMYK", "RGB"], [".png", ".png", ".png", ".jpg", ".JPEG"]):
        Image.open(p).convert(mode).save(p.with_suffix(suffix))
        if suffix != ".png":
            p.unlink()
    Image.open(pngs[5]).save(root / "train" / "class1" / "anim.gif")
    name = f"imagefolder:{root}?size=16"
    rc, out, err = run(capsys, "data", "check", name)
    assert rc == 0 and "train 18  val 2  test 6" in out
    assert "left out 1 files whose suffix is not an image's (.gif 1)" in out
    ds = _read_anew(name)
    xs = torch.cat([x for x, _ in D.iterate(ds, ds.train, batch_size=32)])
    assert xs.shape == (18, 3, 16, 16) and torch.isfinite(xs).all()

    spoiled = sorted((root / "train" / "class1").glob("*.png"))[0]
    spoiled.write_bytes(spoiled.read_bytes()[:60])  # truncated
    for workers in (0, 2):
        with pytest.raises(D.BadImage, match=f"^imagefolder: cannot read {spoiled} \\(.*\\); remove or replace it$"):
            list(D.iterate(ds, ds.train, batch_size=32, workers=workers))
    tasks = tmp_path / "tasks.toml"
    tasks.write_text(f'[t]\ndataset = "{name}"\nmodel = "cnn"\nrecipe = {{ epochs = 1, batch_size = 8 }}\n')
    rc, out, err = run(capsys, "pretrain", "t", "--tasks-file", str(tasks), "--cache-dir", str(tmp_path / "c"))
    assert rc == 2 and err.startswith(f"error: imagefolder: cannot read {spoiled}") and err.count("\n") == 1, err
    spoiled.unlink()

    (root / "val" / "class7").mkdir()
    Image.open(pngs[5]).save(root / "val" / "class7" / "x.png")
    with pytest.raises(DataNotFound, match="val has classes .* lacks: class7;"):
        _read_anew(name)
    shutil.rmtree(root / "val" / "class7")
    (root / "train" / "class2").mkdir()
    (root / "train" / "class2" / "notes.txt").write_text("no images here")
    with pytest.raises(DataNotFound, match=r"fewer than 2 images: class2 \(0\); add images or remove"):
        _read_anew(name)
    only_gifs = tmp_path / "gifs" / "train" / "a"
    only_gifs.mkdir(parents=True)
    Image.open(pngs[5]).save(only_gifs / "x.gif")
    with pytest.raises(DataNotFound, match=r"no images under .*gifs/train \(files whose suffix is not an image's: "
                                           r"\.gif 1\)"):
        _read_anew(f"imagefolder:{tmp_path / 'gifs'}")
