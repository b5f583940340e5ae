"""Machine learning for the reference agents: scikit-learn's bundled digits, a multinomial
logistic regression, safe (pickle-free) serialization and FedAvg.

* Data: :func:`sklearn.datasets.load_digits` (1 797 8x8 images, 10 classes, bundled with
  scikit-learn: nothing is downloaded), pixels scaled to ``[0, 1]``. :func:`split_digits`
  cuts it deterministically (a seed) into validator hold-outs, the customer's test set and
  ``n`` training shards.
* Model: :class:`Model` = ``coef`` (classes x 64), ``intercept`` (classes), ``classes``;
  trained by :class:`sklearn.linear_model.LogisticRegression` (lbfgs, multinomial),
  warm-started from a previous round's averaged model when one is given.
* Bytes: ``numpy.savez`` archives of plain arrays (models; shards are compressed with
  ``savez_compressed``). Loading is meant for hostile input: the archive's members, their
  inflated sizes and every ``.npy`` header (dtype, shape vs. size) are checked before numpy
  reads them, ``np.load(..., allow_pickle=False)`` never unpickles, and every array's dtype,
  shape and finiteness are checked (:class:`UnsafeData` otherwise).
* Aggregation: :func:`fedavg`, the (optionally weighted) mean of coefficients and
  intercepts of models with the same classes and shape.
"""

from __future__ import annotations

import io
import threading
import warnings
import zipfile
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from service.agents.storage import DEFAULT_MAX_MODEL_BYTES

N_FEATURES = 64  # 8x8 pixels
CLASSES = np.arange(10)  # the digits 0..9
DEFAULT_SEED = 7
#: Upper bounds for what an agent accepts from others (bytes of a .npz, rows of a shard). The
#: model bound is a setting (``Blobs.max_model_bytes``, ``--max-model-bytes``); this is its
#: default. A large bound costs no memory for a bad archive: members' inflated sizes and
#: array headers are checked before numpy reads anything.
MAX_MODEL_BYTES = DEFAULT_MAX_MODEL_BYTES
MAX_SHARD_BYTES = 16 << 20
MAX_SHARD_ROWS = 100_000

_FIT_LOCK = threading.Lock()
_MODEL_MEMBERS = {"coef.npy", "intercept.npy", "classes.npy"}
_DATASET_MEMBERS = {"X.npy", "y.npy"}


class UnsafeData(ValueError):
    """Bytes that are not an acceptable model or shard (malformed, oversized, wrong shape, non-finite)."""


@dataclass(frozen=True)
class Dataset:
    X: np.ndarray  # (n, 64) float64 in [0, 1]
    y: np.ndarray  # (n,) int64 in 0..9

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass(frozen=True)
class Model:
    coef: np.ndarray  # (n_classes, 64) float64
    intercept: np.ndarray  # (n_classes,) float64
    classes: np.ndarray  # (n_classes,) int64

    def predict(self, X: np.ndarray) -> np.ndarray:
        return self.classes[np.argmax(X @ self.coef.T + self.intercept, axis=1)]


@dataclass(frozen=True)
class DigitsSplit:
    """A deterministic partition: training shards, validator hold-outs, the customer's test set."""

    shards: tuple[Dataset, ...]
    holdouts: tuple[Dataset, ...]
    test: Dataset


# --------------------------------------------------------------------------- data


def load_digits_data() -> Dataset:
    from sklearn.datasets import load_digits

    X, y = load_digits(return_X_y=True)
    return Dataset(X=np.asarray(X, dtype=np.float64) / 16.0, y=np.asarray(y, dtype=np.int64))


def split_digits(
    n_shards: int = 3,
    n_validators: int = 2,
    *,
    seed: int = DEFAULT_SEED,
    holdout_fraction: float = 0.2,
    test_fraction: float = 0.2,
) -> DigitsSplit:
    """Shuffle the digits with ``seed``; the first ``holdout_fraction`` is the validators' pool
    (cut into ``n_validators`` disjoint hold-outs), the next ``test_fraction`` the customer's
    test set, the rest ``n_shards`` training shards of (almost) equal size.

    The validators' pool and the customer's test set do not depend on ``n_shards``, so a
    validator computes its hold-out knowing only the seed (:func:`validator_holdout`).
    """
    if n_shards < 1 or n_validators < 1:
        raise ValueError("n_shards and n_validators must be at least 1")
    data = load_digits_data()
    order = np.random.default_rng(seed).permutation(len(data))
    n_hold = int(len(data) * holdout_fraction)
    n_test = int(len(data) * test_fraction)
    pool, test, rest = order[:n_hold], order[n_hold : n_hold + n_test], order[n_hold + n_test :]
    if len(rest) < n_shards * 20:
        raise ValueError("too many shards for the digits data set")

    def take(idx: np.ndarray) -> Dataset:
        return Dataset(X=data.X[idx], y=data.y[idx])

    return DigitsSplit(
        shards=tuple(take(part) for part in np.array_split(rest, n_shards)),
        holdouts=tuple(take(part) for part in np.array_split(pool, n_validators)),
        test=take(test),
    )


def validator_holdout(index: int = 0, count: int = 1, *, seed: int = DEFAULT_SEED) -> Dataset:
    """Validator ``index``'s hold-out when ``count`` validators share the pool (seeded)."""
    if not 0 <= index < count:
        raise ValueError("validator index must be in 0..count-1")
    return split_digits(1, count, seed=seed).holdouts[index]


# ------------------------------------------------------------------------ training


def train(data: Dataset, *, start: Model | None = None, max_iter: int = 100, C: float = 1.0) -> Model:
    """Multinomial logistic regression (lbfgs) on ``data``, warm-started from ``start`` if given
    (and if ``start`` has exactly the classes present in ``data``)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    if len(data) == 0:
        raise ValueError("cannot train on an empty shard")
    present = np.unique(data.y)
    warm = start is not None and np.array_equal(start.classes, present)
    clf = LogisticRegression(C=C, max_iter=max_iter, warm_start=warm)
    if warm:
        assert start is not None
        clf.coef_ = start.coef.copy()
        clf.intercept_ = start.intercept.copy()
    with _FIT_LOCK, warnings.catch_warnings():  # catch_warnings is process-wide: one fit at a time
        warnings.simplefilter("ignore", ConvergenceWarning)
        clf.fit(data.X, data.y)
    coef = np.asarray(clf.coef_, dtype=np.float64)
    intercept = np.asarray(clf.intercept_, dtype=np.float64)
    if coef.shape[0] == 1 and len(clf.classes_) == 2:  # binary: sklearn keeps one row; expand to two
        coef = np.vstack([-coef, coef]) / 2
        intercept = np.array([-intercept[0], intercept[0]]) / 2
    return Model(coef=coef, intercept=intercept, classes=np.asarray(clf.classes_, dtype=np.int64))


def random_model(seed: int | None = None) -> Model:
    """What a dishonest provider returns: random weights of the right shape (about 10 % accuracy)."""
    rng = np.random.default_rng(seed)
    return Model(
        coef=rng.normal(0, 1, (len(CLASSES), N_FEATURES)),
        intercept=rng.normal(0, 1, len(CLASSES)),
        classes=CLASSES.copy(),
    )


def accuracy(model: Model, data: Dataset) -> float:
    if len(data) == 0:
        raise ValueError("cannot evaluate on an empty data set")
    if model.coef.shape[1] != data.X.shape[1]:
        raise UnsafeData("the model's feature count does not match the data")
    return float(np.mean(model.predict(data.X) == data.y))


def fedavg(models: Sequence[Model], weights: Sequence[float] | None = None) -> Model:
    """Federated averaging: the mean (weighted by ``weights``, e.g. shard sizes) of coefficients
    and intercepts. All models must have the same classes and shapes."""
    if not models:
        raise ValueError("nothing to average")
    first = models[0]
    for m in models[1:]:
        if not np.array_equal(m.classes, first.classes) or m.coef.shape != first.coef.shape:
            raise ValueError("models with different classes or shapes cannot be averaged")
    w = np.ones(len(models)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(models),) or not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise ValueError("weights must be non-negative, finite, one per model, not all zero")
    w = w / w.sum()
    coef = np.tensordot(w, np.stack([m.coef for m in models]), axes=1)
    intercept = np.tensordot(w, np.stack([m.intercept for m in models]), axes=1)
    return Model(coef=coef, intercept=intercept, classes=first.classes.copy())


# --------------------------------------------------------------------- bytes, safely


def savez(arrays: Mapping[str, np.ndarray], *, compress: bool = False) -> bytes:
    buf = io.BytesIO()
    if compress:
        np.savez_compressed(buf, **dict(arrays))  # type: ignore[arg-type]
    else:
        np.savez(buf, **dict(arrays))  # type: ignore[arg-type]
    return buf.getvalue()


def check_members(zf: zipfile.ZipFile, members: set[str], max_bytes: int) -> None:
    """Before numpy reads anything: exactly ``members``, plain or deflated, at most ``max_bytes``
    once inflated, and each ``.npy`` header a plain numeric dtype whose shape fits its member
    (so numpy never allocates more than the declared, bounded, size)."""
    infos = zf.infolist()
    if sorted(i.filename for i in infos) != sorted(members):
        raise UnsafeData(f"archive members must be exactly {sorted(members)}")
    if any(i.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) for i in infos):
        raise UnsafeData("archive members must be stored or deflated")
    if sum(i.file_size for i in infos) > max_bytes:
        raise UnsafeData("archive inflates beyond the size limit")
    for info in infos:
        with zf.open(info) as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            elif version == (2, 0):
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
            else:
                raise UnsafeData("unsupported .npy version")
        if dtype.hasobject or dtype.kind not in "fiu" or dtype.itemsize > 8:
            raise UnsafeData(f"{info.filename}: plain numeric arrays only")
        if int(np.prod(shape, dtype=np.float64)) * dtype.itemsize > info.file_size:
            raise UnsafeData(f"{info.filename}: shape larger than its data")


def load_npz(data: bytes, members: set[str], max_bytes: int) -> dict[str, np.ndarray]:
    """Read a .npz of exactly ``members``: no unpickling, no inflation bomb, no huge allocation."""
    if type(data) is not bytes:
        raise UnsafeData("expected bytes")
    if len(data) > max_bytes:
        raise UnsafeData(f"archive is larger than {max_bytes} bytes")
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as zf:
            check_members(zf, members, max_bytes)
        with np.load(io.BytesIO(data), allow_pickle=False) as npz:
            out = {name[:-4]: np.array(npz[name[:-4]]) for name in members}
    except UnsafeData:
        raise
    except (zipfile.BadZipFile, ValueError, OSError, EOFError, KeyError, MemoryError, zlib.error) as exc:
        raise UnsafeData(f"not a valid .npz archive: {type(exc).__name__}") from None
    for name, arr in out.items():
        if arr.dtype.hasobject or arr.dtype.kind not in "fiu":
            raise UnsafeData(f"{name}: numeric arrays only")
    return out


def finite_float(arr: np.ndarray, name: str) -> np.ndarray:
    if arr.dtype.kind != "f":
        raise UnsafeData(f"{name} must be floating point")
    out = arr.astype(np.float64)
    if not np.all(np.isfinite(out)):
        raise UnsafeData(f"{name} has NaN or infinite values")
    return out


def model_to_bytes(model: Model) -> bytes:
    return savez(
        {
            "coef": model.coef.astype(np.float64),
            "intercept": model.intercept.astype(np.float64),
            "classes": model.classes.astype(np.int64),
        }
    )


def model_from_bytes(data: bytes, *, max_bytes: int = MAX_MODEL_BYTES, n_features: int = N_FEATURES) -> Model:
    arrays = load_npz(data, _MODEL_MEMBERS, max_bytes)
    coef = finite_float(arrays["coef"], "coef")
    intercept = finite_float(arrays["intercept"], "intercept")
    classes = arrays["classes"]
    if classes.dtype.kind not in "iu" or classes.ndim != 1 or not 2 <= len(classes) <= 1000:
        raise UnsafeData("classes must be a 1-d integer array of 2..1000 labels")
    if len(np.unique(classes)) != len(classes):
        raise UnsafeData("classes must be distinct")
    if coef.shape != (len(classes), n_features) or intercept.shape != (len(classes),):
        raise UnsafeData(f"coef must be (classes, {n_features}) and intercept (classes,)")
    return Model(coef=coef, intercept=intercept, classes=classes.astype(np.int64))


def dataset_to_bytes(data: Dataset) -> bytes:
    """A shard as a compressed ``.npz`` of ``X`` (float32) and ``y`` (int64)."""
    return savez({"X": data.X.astype(np.float32), "y": data.y.astype(np.int64)}, compress=True)


def dataset_from_bytes(
    data: bytes, *, max_bytes: int = MAX_SHARD_BYTES, n_features: int = N_FEATURES, max_rows: int = MAX_SHARD_ROWS
) -> Dataset:
    arrays = load_npz(data, _DATASET_MEMBERS, max_bytes)
    X = finite_float(arrays["X"], "X")
    y = arrays["y"]
    if X.ndim != 2 or X.shape[1] != n_features or not 1 <= X.shape[0] <= max_rows:
        raise UnsafeData(f"X must be (1..{max_rows}, {n_features})")
    if y.dtype.kind not in "iu" or y.shape != (X.shape[0],):
        raise UnsafeData("y must be a 1-d integer array, one label per row of X")
    return Dataset(X=X, y=y.astype(np.int64))


def evaluate_bytes(model_bytes: bytes, data: Dataset, *, max_bytes: int = MAX_MODEL_BYTES) -> float:
    """Accuracy of a serialized model on ``data`` (raises :class:`UnsafeData` for a bad model)."""
    return accuracy(model_from_bytes(model_bytes, max_bytes=max_bytes, n_features=data.X.shape[1]), data)
