"""Datasets for the ``hzo-ext`` command: scikit-learn's digits (ships with scikit-learn, no
download) and CIFAR-10 read from a local folder of the standard python-pickle batches."""
from __future__ import annotations

import os
import pickle
from dataclasses import dataclass

import numpy as np
import torch

CIFAR10_FILES = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])


def load_digits(image: bool = False, test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """8x8 handwritten digits (1797 images), pixels scaled to [0, 1]; a fixed stratified split.
    ``image=True`` gives [N, 1, 8, 8] tensors, else [N, 64]."""
    from sklearn.datasets import load_digits as sk_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_load_digits()
    x = bunch.data.astype(np.float32) / 16.0
    x_tr, x_te, y_tr, y_te = train_test_split(x, bunch.target, test_size=test_fraction, random_state=seed,
                                              stratify=bunch.target)
    shape = (-1, 1, 8, 8) if image else (-1, 64)
    return Dataset("digits", torch.from_numpy(x_tr).reshape(shape), torch.from_numpy(y_tr).long(),
                   torch.from_numpy(x_te).reshape(shape), torch.from_numpy(y_te).long(), 10)


def load_cifar10(folder: str) -> Dataset:
    """CIFAR-10 from ``folder`` holding data_batch_1..5 and test_batch (the python version of
    the dataset, unpacked); per-channel standardised [N, 3, 32, 32] float32. A missing file
    raises FileNotFoundError, an unreadable or wrong-shape one ValueError naming it."""
    missing = [f for f in CIFAR10_FILES if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise FileNotFoundError(f"CIFAR-10 folder {folder!r} lacks {', '.join(missing)} (expected the python "
                                f"pickle batches {', '.join(CIFAR10_FILES)})")

    def read(name):
        path = os.path.join(folder, name)
        try:
            with open(path, "rb") as f:
                batch = pickle.load(f, encoding="bytes")
            data, labels = np.asarray(batch[b"data"]), np.asarray(batch[b"labels"])
        except Exception as exc:  # a truncated or foreign file raises any of a dozen types
            raise ValueError(f"CIFAR-10 batch {path} is not a python-pickle batch with b'data' and b'labels' "
                             f"({type(exc).__name__}: {exc})") from exc
        if not (data.dtype == np.uint8 and data.ndim == 2 and data.shape[0] >= 1 and data.shape[1] == 3 * 32 * 32
                and labels.shape == data.shape[:1] and np.issubdtype(labels.dtype, np.integer)
                and labels.min() >= 0 and labels.max() <= 9):
            raise ValueError(f"CIFAR-10 batch {path}: expected uint8 data [N, 3072] and N labels in 0..9, got data "
                             f"{data.dtype} {list(data.shape)} and labels {labels.dtype} {list(labels.shape)}")
        return data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0, labels

    parts = [read(f) for f in CIFAR10_FILES[:5]]
    x_tr, y_tr = np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])
    x_te, y_te = read("test_batch")
    mean, std = x_tr.mean(axis=(0, 2, 3), keepdims=True), x_tr.std(axis=(0, 2, 3), keepdims=True)
    norm = lambda a: torch.from_numpy((a - mean) / std)  # noqa: E731
    return Dataset("cifar10", norm(x_tr), torch.from_numpy(y_tr).long(), norm(x_te), torch.from_numpy(y_te).long(), 10)
