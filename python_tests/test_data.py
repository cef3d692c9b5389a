"""pub_native.demo.data: the embedded Adult set (shapes, label rates, the fixed split, encoding) and
the loader for the user's own CSV file or DataFrame (task specs, errors)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pub_native.demo.data import (
    ADULT_PATH,
    from_columns,
    from_frame,
    load_adult,
    load_csv,
    split_indices,
)

ADULT_ROWS = 48842


@pytest.fixture(scope="module")
def adult():
    return load_adult()


def test_adult_shapes(adult):
    assert ADULT_PATH.is_file()
    assert (len(adult.train), len(adult.validation), len(adult.test)) == (34190, 4884, 9768)
    assert adult.task_names == ("income", "marital-status")
    assert adult.categorical_columns == ("workclass", "education", "occupation", "relationship",
                                         "race", "gender", "native-country")
    assert adult.numerical_columns == ("age", "fnlwgt", "educational-num", "capital-gain",
                                       "capital-loss", "hours-per-week")
    for split in (adult.train, adult.validation, adult.test):
        n = len(split)
        assert split.categorical.shape == (n, 7) and split.categorical.dtype == torch.int64
        assert split.numerical.shape == (n, 6) and split.numerical.dtype == torch.float32
        assert split.labels.shape == (n, 2) and split.labels.dtype == torch.float32
        assert set(split.labels.unique().tolist()) == {0.0, 1.0}
        sizes = torch.tensor(adult.vocab_sizes)
        assert bool((split.categorical >= 0).all() and (split.categorical < sizes).all())


def test_adult_task_columns_are_not_inputs(adult):
    inputs = set(adult.categorical_columns) | set(adult.numerical_columns)
    assert "marital-status" not in inputs and "income" not in inputs


def test_adult_label_rates(adult):
    labels = torch.cat([adult.train.labels, adult.validation.labels, adult.test.labels])
    rates = labels.mean(0)
    # 11,687 / 48,842 rows earn > 50K, 16,117 / 48,842 never married.
    assert rates[0].item() == pytest.approx(11687 / ADULT_ROWS, abs=1e-6)
    assert rates[1].item() == pytest.approx(16117 / ADULT_ROWS, abs=1e-6)
    for split in (adult.train, adult.validation, adult.test):
        assert split.label_rates[0].item() == pytest.approx(0.24, abs=0.015)
        assert split.label_rates[1].item() == pytest.approx(0.33, abs=0.015)


def test_adult_numerical_standardized_on_train(adult):
    x = adult.train.numerical.double()
    assert torch.allclose(x.mean(0), torch.zeros(6, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(x.std(0, unbiased=False), torch.ones(6, dtype=torch.float64),
                          atol=1e-4)
    assert adult.numerical_mean[0] == pytest.approx(38.6, abs=0.5)  # mean age


def test_adult_split_is_deterministic(adult):
    again = load_adult()
    for a, b in ((adult.train, again.train), (adult.test, again.test)):
        assert torch.equal(a.categorical, b.categorical)
        assert torch.equal(a.numerical, b.numerical)
        assert torch.equal(a.labels, b.labels)
    other = load_adult(split_seed=1)
    assert not torch.equal(adult.test.numerical, other.test.numerical)


def test_split_indices_fixed_disjoint_and_complete():
    tr, va, te = split_indices(ADULT_ROWS)
    assert (len(tr), len(va), len(te)) == (34190, 4884, 9768)
    everything = np.concatenate([tr, va, te])
    assert len(np.unique(everything)) == ADULT_ROWS and everything.min() == 0
    # The split is a fixed function of (seed, row): pinned so that it cannot drift.
    assert tr[:3].tolist() == _expected_first_train_rows()
    tr1, _, _ = split_indices(ADULT_ROWS, seed=1)
    assert not np.array_equal(tr, tr1)
    with pytest.raises(ValueError, match="fractions"):
        split_indices(10, fractions=(0.5, 0.5, 0.5))


def _expected_first_train_rows():
    # splitmix64 of 0..n-1, recomputed with Python integers (independent of numpy).
    def mix(x):
        m = (1 << 64) - 1
        z = (x + 0x9E3779B97F4A7C15) & m
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & m
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & m
        return z ^ (z >> 31)

    keys = sorted(range(ADULT_ROWS), key=mix)
    return keys[:3]


def test_adult_vocabulary_from_train_only(adult):
    # Every training code is known (> 0); codes cover each vocabulary.
    assert bool((adult.train.categorical > 0).all())
    for c, size in enumerate(adult.vocab_sizes):
        assert int(adult.train.categorical[:, c].max()) == size - 1
    assert "?" in adult.vocabularies[0]  # workclass keeps "?" as a category


# -- the generic loader -------------------------------------------------------------------------

def _table(n=60, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "color": np.array([["red", "green", "blue"][i % 3] for i in range(n)]),
        "size": rng.normal(10.0, 2.0, n),
        "clicked": (np.arange(n) % 4 == 0).astype(np.int64),
        "bought": np.array(["yes" if i % 5 == 0 else "no" for i in range(n)]),
        "price": rng.uniform(1, 100, n),
    }


def test_from_columns_task_specs():
    cols = _table()
    data = from_columns(cols, tasks={"clicked": None, "bought": "yes",
                                     "price": lambda v: v > 50})
    assert data.task_names == ("clicked", "bought", "price")
    assert data.categorical_columns == ("color",)
    assert data.numerical_columns == ("size",)
    labels = torch.cat([data.train.labels, data.validation.labels, data.test.labels])
    tr, va, te = split_indices(60)
    order = np.concatenate([tr, va, te])
    expected = np.stack([cols["clicked"] == 1, cols["bought"] == "yes", cols["price"] > 50], 1)
    np.testing.assert_array_equal(labels.numpy(), expected[order].astype(np.float32))
    # A list of names means already-binary columns.
    assert from_columns(cols, tasks=["clicked"]).task_names == ("clicked",)


def test_missing_task_column_is_named():
    with pytest.raises(ValueError, match="task column 'converted' not found"):
        from_columns(_table(), tasks={"clicked": None, "converted": 1})
    with pytest.raises(ValueError, match="categorical column 'shape' not found"):
        from_columns(_table(), tasks=["clicked"], categorical=["shape"])


def test_bad_tasks():
    with pytest.raises(ValueError, match="'bought' is not binary"):
        from_columns(_table(), tasks=["bought"])
    with pytest.raises(ValueError, match="every row is negative"):
        from_columns(_table(), tasks={"bought": "maybe"})
    with pytest.raises(ValueError, match="task column"):
        from_columns(_table(), tasks=["clicked"], numerical=["clicked"])
    with pytest.raises(ValueError, match="at least one"):
        from_columns(_table(), tasks={})


def test_unknown_category_gets_reserved_code():
    cols = _table(n=100)
    tr, va, te = split_indices(100)
    cols["color"] = cols["color"].astype(object)
    cols["color"][te[0]] = "purple"  # a value never seen in training
    data = from_columns(cols, tasks=["clicked"])
    assert "purple" not in data.vocabularies[0]
    assert int(data.test.categorical[0, 0]) == 0
    assert bool((data.train.categorical > 0).all())


def test_csv_loader_matches_columns(tmp_path):
    cols = _table()
    path = tmp_path / "table.csv"
    with open(path, "w") as f:
        f.write(",".join(cols) + "\n")
        for i in range(60):
            f.write(", ".join(str(cols[c][i]) for c in cols) + "\n")  # spaces are stripped
    data = load_csv(path, tasks={"clicked": None, "bought": "yes"}, drop=["price"])
    ref = from_columns(cols, tasks={"clicked": None, "bought": "yes"}, drop=["price"])
    assert data.numerical_columns == ("size",) and data.categorical_columns == ("color",)
    assert torch.equal(data.train.categorical, ref.train.categorical)
    assert torch.allclose(data.train.numerical, ref.train.numerical, atol=1e-5)
    assert torch.equal(data.test.labels, ref.test.labels)
    with pytest.raises(ValueError, match="task column 'nope' not found"):
        load_csv(path, tasks=["nope"])


class _Frame:
    """The part of the pandas DataFrame interface the loader uses."""

    class _Series:
        def __init__(self, values):
            self._values = values

        def to_numpy(self):
            return self._values

    def __init__(self, columns):
        self._columns = columns
        self.columns = list(columns)

    def __getitem__(self, name):
        return self._Series(self._columns[name])


def test_frame_loader_duck_typed():
    cols = _table()
    data = from_frame(_Frame(cols), tasks={"clicked": None, "bought": "yes"})
    ref = from_columns(cols, tasks={"clicked": None, "bought": "yes"})
    assert data.categorical_columns == ref.categorical_columns
    assert torch.equal(data.validation.labels, ref.validation.labels)
    with pytest.raises(ValueError, match="task column 'income' not found"):
        from_frame(_Frame(cols), tasks=["income"])
    with pytest.raises(TypeError, match="DataFrame-like"):
        from_frame([1, 2, 3], tasks=["clicked"])


def test_pandas_frame():
    pd = pytest.importorskip("pandas")
    cols = _table()
    frame = pd.DataFrame(cols)
    frame["color"] = frame["color"].astype("category")
    data = from_frame(frame, tasks={"clicked": None, "bought": "yes"})
    ref = from_columns(cols, tasks={"clicked": None, "bought": "yes"})
    assert data.categorical_columns == ("color",)
    assert torch.equal(data.train.categorical, ref.train.categorical)


def test_batches_cover_the_split_once(adult):
    split = adult.validation
    seen = torch.cat([b.labels for b in split.batches(1000)])
    assert torch.equal(seen, split.labels)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    a = [b.numerical for b in split.batches(999, shuffle=True, generator=g1)]
    b = [b.numerical for b in split.batches(999, shuffle=True, generator=g2)]
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert sum(len(x) for x in a) == len(split)
    assert not torch.equal(a[0], split.numerical[:999])
    with pytest.raises(ValueError, match="batch_size"):
        next(split.batches(0))


def test_id_like_columns_are_left_out_with_the_reason():
    n = 50
    rng = np.random.default_rng(0)
    columns = {
        "row": np.arange(n) * 3 + 100,  # distinct whole numbers: an ID
        "name": np.array([f"u{i}" for i in range(n)]),  # distinct text: an ID
        "height": rng.normal(size=n),  # distinct fractions: a measurement, kept
        "kind": rng.choice(["a", "b"], size=n),
        "y1": np.arange(n) % 2, "y2": (np.arange(n) // 2) % 2,
    }
    data = from_columns(columns, tasks=["y1", "y2"])
    assert [c for c, _ in data.dropped_columns] == ["row", "name"]
    assert all("all 50 values distinct" in reason for _, reason in data.dropped_columns)
    assert data.numerical_columns == ("height",) and data.categorical_columns == ("kind",)
    # Named explicitly, or with the screening off, they stay.
    named = from_columns(columns, tasks=["y1", "y2"], categorical=["name", "kind"])
    assert "name" in named.categorical_columns
    kept = from_columns(columns, tasks=["y1", "y2"], drop_id_like=False)
    assert "row" in kept.numerical_columns and kept.dropped_columns == ()


def test_adult_has_no_id_like_column(adult):
    assert adult.dropped_columns == ()
    assert adult.label_copies == ()  # no input determines a task: no false alarm


def test_inputs_that_copy_a_label_are_named():
    n = 200
    rng = np.random.default_rng(1)
    y1 = rng.integers(0, 2, n)
    y2 = rng.integers(0, 2, n)
    columns = {
        "y1": y1, "y2": y2,
        "answer": np.where(y2 == 1, "yes", "no"),  # the label under another name
        "bucket": y1 * 3 + rng.integers(0, 3, n),  # 6 numbers, each with one label of y1
        "noise": rng.choice(["a", "b", "c"], n),  # unrelated
        "tag": np.where(rng.random(n) < 0.05, 1 - y1, y1),  # close to y1, not a copy
    }
    data = from_columns(columns, tasks=["y1", "y2"], categorical=["answer", "noise", "tag"],
                        numerical=["bucket"])
    assert set(data.label_copies) == {("answer", "y2"), ("bucket", "y1")}
