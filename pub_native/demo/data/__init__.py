"""Tabular multi-task data for the examples and benchmarks: the embedded UCI Adult set and a
loader for the user's own table (a CSV file or a pandas DataFrame).

Demo layer used by ``pub_native.demo`` and the benchmarks; pure numpy + csv, pandas is not
required (a DataFrame is accepted by duck typing).
"""

from __future__ import annotations

import csv
import functools
import gzip
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = [
    "ADULT_PATH",
    "ADULT_TASKS",
    "SPLIT_FRACTIONS",
    "SPLIT_SEED",
    "Batch",
    "MultiTaskData",
    "Split",
    "from_columns",
    "from_frame",
    "load_adult",
    "load_csv",
    "split_indices",
]

ADULT_PATH = Path(__file__).with_name("adult.csv.gz")
#: The MMoE paper's two tasks on Adult: column -> positive class.
ADULT_TASKS = {"income": ">50K", "marital-status": "Never-married"}
#: The fixed split: rows ordered by splitmix64(SPLIT_SEED + row index), then cut in this order
#: into train / validation / test by these fractions (see :func:`split_indices`).
SPLIT_SEED = 0
SPLIT_FRACTIONS = (0.7, 0.1, 0.2)

# Cells read as "missing" in numerical CSV columns (categorical columns keep any text, "?"
# included, as a category of its own).
_MISSING = ("", "nan", "NaN", "NA", "N/A", "null", "None")


class NotBinaryTask(ValueError):
    """A task column that is not binary, given without its positive class. ``column``: its
    name; ``values``: the first of its values, as the message shows them (the command line
    rewords the advice for its ``--task column=VALUE``)."""

    def __init__(self, message: str, column: str | None = None, values: str = ""):
        super().__init__(message)
        self.column = column
        self.values = values


class Batch(NamedTuple):
    """A batch of rows: the model input and the K binary labels."""

    categorical: torch.Tensor  # (B, C) int64 codes; 0 is the reserved "unknown" code
    numerical: torch.Tensor  # (B, F) float32, standardized with train statistics
    labels: torch.Tensor  # (B, K) float32 in {0, 1}


@dataclass(frozen=True)
class Split:
    """One part (train, validation or test) of a :class:`MultiTaskData`."""

    categorical: torch.Tensor
    numerical: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.shape[0]

    def __repr__(self) -> str:
        return (f"Split(rows={len(self)}, categorical={self.categorical.shape[1]}, "
                f"numerical={self.numerical.shape[1]}, tasks={self.labels.shape[1]})")

    @property
    def label_rates(self) -> torch.Tensor:
        """Fraction of positive rows per task, shape (K,)."""
        return self.labels.mean(0)

    def batch(self) -> Batch:
        """The whole split as one batch."""
        return Batch(self.categorical, self.numerical, self.labels)

    def head(self, n: int) -> Split:
        """The first ``n`` rows (the split is already in random order)."""
        return Split(self.categorical[:n], self.numerical[:n], self.labels[:n])

    def batches(self, batch_size: int, *, shuffle: bool = False,
                generator: torch.Generator | None = None, drop_last: bool = False
                ) -> Iterator[Batch]:
        """Mini-batches in order, or in a random order drawn from ``generator``."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            if order is None:
                sl = slice(start, start + batch_size)
                yield Batch(self.categorical[sl], self.numerical[sl], self.labels[sl])
            else:
                idx = order[start:start + batch_size]
                yield Batch(self.categorical[idx], self.numerical[idx], self.labels[idx])


@dataclass(frozen=True)
class MultiTaskData:
    """A table split into train / validation / test, encoded for an embedding model.

    Categorical column c has codes 1..len(vocabularies[c]) for the values seen in the training
    rows (sorted) and 0 for any other value; numerical columns are standardized with the
    training rows' mean and standard deviation, missing values set to 0 (the training mean).
    """

    train: Split
    validation: Split
    test: Split
    task_names: tuple[str, ...]
    categorical_columns: tuple[str, ...]
    numerical_columns: tuple[str, ...]
    vocabularies: tuple[tuple[str, ...], ...]
    numerical_mean: tuple[float, ...]
    numerical_std: tuple[float, ...]
    #: Columns left out automatically, with the reason (see ``drop_id_like``).
    dropped_columns: tuple[tuple[str, str], ...] = ()
    #: (input column, task) pairs where the column's value determines the task's label on
    #: every row: most likely a copy of the label that leaks it (see :func:`label_copies`).
    label_copies: tuple[tuple[str, str], ...] = ()

    @property
    def n_tasks(self) -> int:
        return len(self.task_names)

    @property
    def n_numerical(self) -> int:
        return len(self.numerical_columns)

    @property
    def vocab_sizes(self) -> tuple[int, ...]:
        """Embedding table size of each categorical column (vocabulary + the unknown code)."""
        return tuple(len(v) + 1 for v in self.vocabularies)

    def __repr__(self) -> str:
        return (f"MultiTaskData(tasks={list(self.task_names)}, train={len(self.train)}, "
                f"validation={len(self.validation)}, test={len(self.test)}, "
                f"categorical={len(self.categorical_columns)}, "
                f"numerical={len(self.numerical_columns)})")


def split_indices(n: int, *, seed: int = SPLIT_SEED,
                  fractions: Sequence[float] = SPLIT_FRACTIONS
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row indices of the train, validation and test parts of an ``n``-row table.

    Rows are ordered by the splitmix64 hash of ``seed + row`` (a fixed function, so the split
    does not depend on the numpy version); the last ``int(fractions[2]·n)`` rows of that order
    are the test part, the ``int(fractions[1]·n)`` before them the validation part, and the
    rest the training part. Each part is returned in that random order.
    """
    if len(fractions) != 3 or any(not 0 <= f <= 1 for f in fractions) or \
            abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions must be three numbers in [0, 1] summing to 1, got "
                         f"{tuple(fractions)}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    order = np.argsort(_splitmix64(np.arange(n, dtype=np.uint64) + np.uint64(seed)),
                       kind="stable")
    n_test = int(fractions[2] * n)
    n_val = int(fractions[1] * n)
    n_train = n - n_test - n_val
    return order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]


def _splitmix64(x: np.ndarray) -> np.ndarray:
    # Integer overflow wraps modulo 2^64 for uint64 arrays, which is what splitmix64 wants.
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


def load_adult(*, split_seed: int = SPLIT_SEED,
               fractions: Sequence[float] = SPLIT_FRACTIONS) -> MultiTaskData:
    """The embedded UCI Adult census-income set with the MMoE paper's two tasks.

    Tasks: ``income`` > 50K (24% positive) and ``marital-status`` == "Never-married" (33%
    positive); neither column is an input. Inputs: 7 categorical columns (workclass,
    education, occupation, relationship, race, gender, native-country; "?" is a category of
    its own) and 6 numerical ones (age, fnlwgt, educational-num, capital-gain, capital-loss,
    hours-per-week). All 48,842 rows (the original train and test files together) are split
    70 / 10 / 20 % by :func:`split_indices` with seed 0: 34,190 train, 4,884 validation and
    9,768 test rows. Data: Becker & Kohavi (1996), CC BY 4.0, see ``ADULT_LICENSE.md``.
    """
    return from_columns(_adult_columns(), tasks=ADULT_TASKS, split_seed=split_seed,
                        fractions=fractions)


@functools.lru_cache(maxsize=1)
def _adult_columns() -> dict[str, np.ndarray]:
    columns = _read_csv(ADULT_PATH, ",")
    for values in columns.values():
        values.flags.writeable = False  # shared by every call: from_columns only reads them
    return columns


def _read_csv(path: Path, delimiter: str) -> dict[str, np.ndarray]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f, delimiter=delimiter))
    if not rows:
        raise ValueError(f"{path} is empty (a header row is required)")
    header = [h.strip() for h in rows[0]]
    body = [r for r in rows[1:] if r]
    for line, r in enumerate(body, start=2):
        if len(r) != len(header):
            raise ValueError(f"{path}: row {line} has {len(r)} fields, the header has "
                             f"{len(header)}")
    cells = np.char.strip(np.array(body, dtype=str).reshape(len(body), len(header)))
    return {name: _parse_column(cells[:, j]) for j, name in enumerate(header)}


def load_csv(path: str | os.PathLike, *, tasks, categorical: Sequence[str] | None = None,
             numerical: Sequence[str] | None = None, drop: Sequence[str] = (),
             split_seed: int = SPLIT_SEED, fractions: Sequence[float] = SPLIT_FRACTIONS,
             delimiter: str = ",", drop_id_like: bool = True) -> MultiTaskData:
    """Load a CSV file (``.gz`` is decompressed) with a header row; see :func:`from_columns`.

    Cells are stripped of surrounding spaces. A column is numerical when every cell parses
    as a number (empty, "NA", "nan", ... are missing), categorical otherwise.
    """
    columns = _read_csv(Path(path), delimiter)
    return from_columns(columns, tasks=tasks, categorical=categorical, numerical=numerical,
                        drop=drop, split_seed=split_seed, fractions=fractions,
                        drop_id_like=drop_id_like)


def from_frame(frame, *, tasks, categorical: Sequence[str] | None = None,
               numerical: Sequence[str] | None = None, drop: Sequence[str] = (),
               split_seed: int = SPLIT_SEED, fractions: Sequence[float] = SPLIT_FRACTIONS,
               drop_id_like: bool = True) -> MultiTaskData:
    """Load a pandas DataFrame (or anything with ``.columns`` and ``frame[name]``).

    Columns of integer, float or bool dtype are numerical, others categorical (their values
    are compared as ``str(value)``). The frame's index is ignored: rows are taken in order.
    See :func:`from_columns`.
    """
    if not hasattr(frame, "columns"):
        raise TypeError(f"frame must be a DataFrame-like object with .columns, got "
                        f"{type(frame).__name__}")
    columns = {}
    for name in frame.columns:
        col = frame[name]
        values = col.to_numpy() if hasattr(col, "to_numpy") else np.asarray(col)
        columns[str(name)] = values
    return from_columns(columns, tasks=tasks, categorical=categorical, numerical=numerical,
                        drop=drop, split_seed=split_seed, fractions=fractions,
                        drop_id_like=drop_id_like)


def from_columns(columns: Mapping[str, Any], *, tasks, categorical: Sequence[str] | None = None,
                 numerical: Sequence[str] | None = None, drop: Sequence[str] = (),
                 split_seed: int = SPLIT_SEED, fractions: Sequence[float] = SPLIT_FRACTIONS,
                 drop_id_like: bool = True) -> MultiTaskData:
    """Build a :class:`MultiTaskData` from named columns of equal length.

    Args:
        columns: column name -> sequence of values.
        tasks: the binary tasks, in order. Either a list of names of columns that are already
            binary (0/1 or bool), or a mapping column name -> positive class, where the
            positive class is a value (rows equal to it are positive; text naming a number
            matches that number in a numerical column), a callable (called on each value,
            truthy = positive) or ``None`` (the column is already binary).
            Task columns are never inputs.
        categorical, numerical: the input columns of each kind; by default every column that
            is not a task or in ``drop``, numerical when its values are numbers.
        drop: columns not to use.
        split_seed, fractions: the train / validation / test split, see :func:`split_indices`.
        drop_id_like: leave out ID-like columns among the inputs chosen automatically (not
            those named in ``categorical``/``numerical``): columns whose values are all
            distinct and that are text or whole numbers (a row ID, a user ID, a timestamp in
            seconds): one embedding per row teaches a model nothing that carries over to new
            rows. They are listed in ``dropped_columns``. Columns of fractional numbers are
            kept even when all distinct (measurements).

    Raises:
        ValueError: a task, categorical, numerical or drop column is missing (the message
            names it); a task is not binary or has only one class in the data; columns of
            different lengths; a task column also given as an input.
    """
    columns = {str(k): np.asarray(v) if not isinstance(v, np.ndarray) else v
               for k, v in columns.items()}
    lengths = {len(v) for v in columns.values()}
    if len(lengths) > 1:
        raise ValueError(f"columns must have equal lengths, got {sorted(lengths)}")
    n = lengths.pop() if lengths else 0
    task_specs = _task_specs(tasks)
    available = ", ".join(repr(c) for c in columns)
    for name in task_specs:
        if name not in columns:
            raise ValueError(f"task column {name!r} not found; the columns are {available}")
    for arg, names in (("categorical", categorical), ("numerical", numerical), ("drop", drop)):
        for name in names or ():
            if name not in columns:
                raise ValueError(f"{arg} column {name!r} not found; the columns are {available}")
            if arg != "drop" and name in task_specs:
                raise ValueError(f"{arg} column {name!r} is a task column; task columns cannot "
                                 "be inputs")
    if n < 3:
        raise ValueError(f"the table needs at least 3 rows to be split, got {n}")

    features = [c for c in columns if c not in task_specs and c not in set(drop)]
    dropped = []
    if drop_id_like:
        given = set(categorical or ()) | set(numerical or ())
        for c in features:
            if c not in given and _is_id_like(columns[c]):
                dropped.append((c, f"ID-like: all {n} values distinct"))
        features = [c for c in features if c not in {d for d, _ in dropped}]
    if not features and categorical is None and numerical is None:
        raise ValueError("no input columns are left (every column is a task, dropped or "
                         "ID-like)")
    if categorical is None:
        taken = set(numerical or ())
        categorical = [c for c in features if c not in taken and not _is_numeric(columns[c])]
    if numerical is None:
        taken = set(categorical)
        numerical = [c for c in features if c not in taken]
    for name in numerical:
        if not _is_numeric(columns[name]):
            raise ValueError(f"numerical column {name!r} holds non-numeric values")

    labels = np.stack([_task_labels(name, columns[name], spec)
                       for name, spec in task_specs.items()], axis=1).astype(np.float32)
    copies = label_copies({c: columns[c] for c in (*categorical, *numerical)},
                          dict(zip(task_specs, labels.T)))
    train_idx, val_idx, test_idx = split_indices(n, seed=split_seed, fractions=fractions)

    vocabularies, codes = [], []
    for name in categorical:
        values = columns[name]
        if values.dtype.kind != "U":
            values = np.array([str(v) for v in values.tolist()], dtype=str)
        uniq, inverse = np.unique(values, return_inverse=True)
        vocab = np.unique(values[train_idx])
        pos = np.minimum(np.searchsorted(vocab, uniq), max(len(vocab) - 1, 0))
        known = vocab[pos] == uniq if len(vocab) else np.zeros(len(uniq), dtype=bool)
        codes.append(np.where(known, pos + 1, 0)[inverse.reshape(-1)].astype(np.int64))
        vocabularies.append(tuple(vocab.tolist()))
    cat = np.stack(codes, axis=1) if codes else np.zeros((n, 0), dtype=np.int64)

    means, stds, nums = [], [], []
    for name in numerical:
        x = np.asarray(columns[name], dtype=np.float64)
        tr = x[train_idx]
        tr = tr[np.isfinite(tr)]
        mean = float(tr.mean()) if tr.size else 0.0
        std = float(tr.std()) if tr.size else 0.0
        std = std if std > 0 else 1.0
        z = (x - mean) / std
        nums.append(np.where(np.isfinite(z), z, 0.0))
        means.append(mean)
        stds.append(std)
    num = (np.stack(nums, axis=1) if nums else np.zeros((n, 0))).astype(np.float32)

    def part(idx: np.ndarray) -> Split:
        return Split(torch.from_numpy(cat[idx]), torch.from_numpy(num[idx]),
                     torch.from_numpy(labels[idx]))

    return MultiTaskData(
        train=part(train_idx), validation=part(val_idx), test=part(test_idx),
        task_names=tuple(task_specs), categorical_columns=tuple(categorical),
        numerical_columns=tuple(numerical), vocabularies=tuple(vocabularies),
        numerical_mean=tuple(means), numerical_std=tuple(stds), dropped_columns=tuple(dropped),
        label_copies=copies,
    )


def label_copies(inputs: Mapping[str, np.ndarray], labels: Mapping[str, np.ndarray]
                 ) -> tuple[tuple[str, str], ...]:
    """The (input, task) pairs where every value of the input column comes with one label of
    the task — both labels occurring, and at most half as many distinct values as rows (so
    that a column of unique values, which trivially "determines" anything, is not named). Such
    a column is usually the label under another name ("bought" = "yes"/"no"); a model reads
    the answer from it, and every method looks perfect."""
    out = []
    for col, values in inputs.items():
        keys = values if _is_numeric(values) else np.array([str(v) for v in values.tolist()])
        uniq, inverse = np.unique(keys, return_inverse=True)
        if len(uniq) > len(keys) // 2:
            continue
        inverse = inverse.reshape(-1)
        for task, y in labels.items():
            if y.min() == y.max():
                continue
            lo = np.full(len(uniq), np.inf)
            hi = np.full(len(uniq), -np.inf)
            np.minimum.at(lo, inverse, y)
            np.maximum.at(hi, inverse, y)
            if (lo == hi).all():
                out.append((col, task))
    return tuple(out)


def _parse_column(cells: np.ndarray) -> np.ndarray:
    """CSV cells -> float64 array (missing = NaN) when all are numbers, else the strings."""
    missing = np.isin(cells, _MISSING)
    try:
        parsed = cells[~missing].astype(np.float64)
    except ValueError:
        return cells
    if not parsed.size:
        return cells
    out = np.full(cells.shape, np.nan)
    out[~missing] = parsed
    return out


def _is_id_like(values: np.ndarray) -> bool:
    """All values distinct, and text or whole numbers (see ``drop_id_like``)."""
    n = len(values)
    if n < 2:
        return False
    if _is_numeric(values):
        x = np.asarray(values, dtype=np.float64)
        if not np.isfinite(x).all() or not (x == np.round(x)).all():
            return False
        return len(np.unique(x)) == n
    return len(np.unique(np.asarray([str(v) for v in values.tolist()]))) == n


def _is_numeric(values: np.ndarray) -> bool:
    return values.dtype.kind in "biuf"


def _task_specs(tasks) -> dict[str, Any]:
    if isinstance(tasks, Mapping):
        specs = {str(k): v for k, v in tasks.items()}
    elif isinstance(tasks, Sequence) and not isinstance(tasks, (str, bytes)):
        specs = {str(k): None for k in tasks}
    else:
        raise ValueError("tasks must be a list of binary column names or a mapping column name "
                         f"-> positive class, got {type(tasks).__name__}")
    if not specs:
        raise ValueError("tasks must name at least one task column")
    return specs


def _task_labels(name: str, values: np.ndarray, spec: Callable | Any) -> np.ndarray:
    if spec is None:
        if values.dtype.kind == "b":
            y = values.astype(bool)
        elif values.dtype.kind in "iuf" and np.isin(values, (0, 1)).all():
            y = values == 1
        else:
            shown = ", ".join(repr(v) for v in list(dict.fromkeys(values.tolist()))[:5])
            raise NotBinaryTask(f"task column {name!r} is not binary (values {shown}, ...); give "
                                f"its positive class, e.g. tasks={{{name!r}: value}}", name, shown)
    elif callable(spec):
        y = np.fromiter((bool(spec(v)) for v in values.tolist()), dtype=bool, count=len(values))
    elif values.dtype.kind in "OSU":
        y = np.array([str(v) for v in values.tolist()], dtype=object) == str(spec)
    elif isinstance(spec, str):
        # A number given as text (e.g. from a command line) for a numerical column.
        try:
            y = values == float(spec)
        except ValueError:
            raise ValueError(f"task {name!r}: the column is numerical but the positive class "
                             f"{spec!r} is not a number") from None
    else:
        y = values == spec
    y = np.asarray(y, dtype=bool)
    if y.all() or not y.any():
        which = "positive" if y.all() else "negative"
        raise ValueError(f"task {name!r}: every row is {which} (positive class {spec!r}); a "
                         "task needs both classes")
    return y

