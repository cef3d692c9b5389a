"""Every error case of SPEC section 7 for solve_weights: a clear ValueError/TypeError naming
the argument, for numpy and torch inputs alike."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from pub_native import solve_weights

GOOD = np.array([[2.0, 0.5], [0.5, 1.0]])


@pytest.mark.parametrize("wrap", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
@pytest.mark.parametrize(
    "G,match",
    [
        (np.ones((2, 3)), "square"),
        (np.ones((4, 2, 3)), "square"),
        (np.ones(3), r"\(K, K\)"),
        (np.ones((1, 1, 1, 1)), r"\(K, K\)"),
        (np.zeros((0, 0)), "at least one task"),
        (np.array([[1.0, 2.0], [0.0, 1.0]]), "symmetric"),
        (np.array([[1.0, np.nan], [np.nan, 1.0]]), "NaN or Inf"),
        (np.array([[np.inf, 0.0], [0.0, 1.0]]), "NaN or Inf"),
    ],
)
def test_bad_matrix(wrap, G, match):
    with pytest.raises(ValueError, match=match) as exc:
        solve_weights(wrap(G))
    assert "G" in str(exc.value)


def test_bad_matrix_in_batch_names_problem():
    Gs = np.stack([GOOD, GOOD, GOOD])
    Gs[2, 0, 1] = np.nan
    with pytest.raises(ValueError, match=r"problem 2"):
        solve_weights(Gs)


@pytest.mark.parametrize(
    "G",
    [
        GOOD.astype(np.int64),
        GOOD.astype(np.float16),
        GOOD.astype(np.complex128),
        torch.tensor(GOOD, dtype=torch.bfloat16),
        torch.tensor(GOOD, dtype=torch.float16),
        torch.tensor(GOOD, dtype=torch.complex64),
    ],
    ids=["int64", "float16", "complex128", "t-bfloat16", "t-float16", "t-complex64"],
)
def test_bad_dtype(G):
    with pytest.raises(TypeError, match="G must be"):
        solve_weights(G)


def test_bad_type():
    with pytest.raises(TypeError, match="G must be a numpy array or a torch tensor"):
        solve_weights("not a matrix")


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(method="adam"), "method"),
        (dict(method=None), "method"),
        (dict(ridge=-1.0), "ridge"),
        (dict(ridge=float("nan")), "ridge"),
        (dict(tol=0.0), "tol"),
        (dict(tol=-1e-3), "tol"),
        (dict(max_iter=0), "max_iter"),
        (dict(max_iter=2.5), "max_iter"),
        (dict(max_iter=True), "max_iter"),
        (dict(ridge=True), "ridge"),
        (dict(tol=True), "tol"),
        (dict(warm_start=np.ones(3)), "warm_start"),
        (dict(warm_start=np.array([1.0, -1.0])), "warm_start"),
        (dict(warm_start=np.array([1.0, np.nan])), "warm_start"),
    ],
)
def test_bad_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        solve_weights(GOOD, **kwargs)



@pytest.mark.parametrize("warm", [np.array([1 + 5j, 1 - 5j]), torch.tensor([1 + 5j, 1 - 5j]),
                                  torch.ones(2, device="meta")],
                         ids=["complex-numpy", "complex-torch", "meta"])
@pytest.mark.parametrize("wrap", [np.asarray, torch.as_tensor], ids=["numpy", "torch"])
def test_a_warm_start_that_is_not_real_weights_is_a_type_error(warm, wrap):
    # A complex warm start lost its imaginary part with only a warning; a meta one gave
    # torch's "Cannot copy out of meta tensor".
    with pytest.raises(TypeError, match="warm_start must be real"):
        solve_weights(wrap(GOOD), warm_start=warm)


def test_a_warm_start_with_the_negative_bit_is_read_as_its_values():
    warm = torch.tensor([0.7, 0.2], dtype=torch.float64)
    neg = (-warm)._neg_view()
    assert neg.is_neg() and torch.equal(neg, warm)
    G = torch.as_tensor(GOOD)
    a = solve_weights(G, warm_start=warm, max_iter=1)
    b = solve_weights(G, warm_start=neg, max_iter=1)
    assert torch.equal(torch.as_tensor(a.weights), torch.as_tensor(b.weights))

def test_numpy_scalars_and_array_subclasses_are_taken(tmp_path):
    # max_iter=np.int64(5) and tol=np.float32(...) were refused as not numbers, and a
    # np.memmap as not an array; each gives what the plain Python value or array gives.
    ref = solve_weights(GOOD, tol=1e-9, max_iter=5, ridge=1e-8)
    got = solve_weights(GOOD, tol=np.float32(1e-9), max_iter=np.int64(5), ridge=np.float64(1e-8))
    np.testing.assert_array_equal(got.weights, solve_weights(
        GOOD, tol=float(np.float32(1e-9)), max_iter=5, ridge=1e-8).weights)
    assert got.status == ref.status
    mm = np.memmap(tmp_path / "g.bin", dtype=np.float64, mode="w+", shape=GOOD.shape)
    mm[:] = GOOD
    np.testing.assert_array_equal(solve_weights(mm).weights, solve_weights(GOOD).weights)
    with pytest.raises(ValueError, match="max_iter"):
        solve_weights(GOOD, max_iter=np.bool_(True))


def test_batched_warm_start_shape():
    with pytest.raises(ValueError, match=r"warm_start must have shape \(B, K\)"):
        solve_weights(np.stack([GOOD, GOOD]), warm_start=np.ones(2))


def test_input_not_modified():
    G = GOOD.copy()
    warm = np.array([0.3, 0.7])
    solve_weights(G, warm_start=warm, method="ccp")
    np.testing.assert_array_equal(G, GOOD)
    np.testing.assert_array_equal(warm, [0.3, 0.7])


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=120)


def _assert_each_raises(prelude: str, cases: str, exc: str, text: str, count: int) -> None:
    """In a subprocess (where a read of memory that is not there would crash): after `prelude`,
    solve_weights(G, **kwargs) for each (G, kwargs) of `cases` raises `exc` with `text`."""
    out = _run(textwrap.dedent(prelude) + textwrap.dedent(f"""
        for G, kwargs in {cases}:
            try:
                solve_weights(G, **kwargs)
            except {exc} as e:
                assert {text!r} in str(e), e
                print("raised")
    """))
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["raised"] * count


def test_freed_tensor_storage_raises():
    """A tensor whose storage was resized to 0 (as FSDP frees parameters) or shrunk keeps its
    shape; its memory is gone, and reading it must raise: one matrix with the default options
    (the fast path), and a batch and a matrix with options (the general path)."""
    _assert_each_raises(f"""
        import torch
        from pub_native import solve_weights

        def freed(shape, keep):
            n = 1
            for d in shape:
                n *= d
            G = torch.zeros(4096, dtype=torch.float64)[4000:4000 + n].view(shape)
            G.copy_(torch.tensor({GOOD.tolist()!r}, dtype=torch.float64).expand(shape))
            G.untyped_storage().resize_(keep)
            return G
    """, """[(freed((2, 2), 0), {}), (freed((2, 2), 4002 * 8), {}),
             (freed((3, 2, 2), 0), {"method": "ccp"}),
             (freed((2, 2), 4002 * 8), {"method": "ccp"})]""",
        "ValueError", "storage is smaller", 4)


def test_a_warm_start_with_freed_storage_raises():
    # Its storage shrunk (as FSDP frees parameters) with its view kept: it was read past the
    # end of its memory (weights from leftover heap data), with numpy and torch G alike.
    _assert_each_raises(f"""
        import numpy as np
        import torch
        from pub_native import solve_weights

        def freed_warm(keep):
            w = torch.ones(4096, dtype=torch.float64)[4000:4002]
            w.untyped_storage().resize_(keep)
            return w

        G = {GOOD.tolist()!r}
    """, """[(np.array(G), {"warm_start": freed_warm(0)}),
             (torch.tensor(G), {"warm_start": freed_warm(4001 * 8)}),
             (torch.tensor(G), {"warm_start": freed_warm(0), "method": "ccp"})]""",
        "ValueError", "warm_start's storage is smaller than its view", 3)


def test_masked_arrays_with_masked_entries_are_refused_and_other_warm_starts_taken():
    # A masked array's mask went with its class: the masked (invalid) entries were used. A
    # bfloat16 warm start (no numpy dtype) raised torch's TypeError; it holds real weights.
    G = np.ma.masked_array(GOOD, mask=[[False, False], [False, True]])
    with pytest.raises(ValueError, match="G is a masked array with masked entries"):
        solve_weights(G)
    with pytest.raises(ValueError, match="warm_start is a masked array"):
        solve_weights(GOOD, warm_start=np.ma.masked_array([1.0, 1.0], mask=[True, False]))
    want = solve_weights(GOOD).weights
    np.testing.assert_allclose(solve_weights(np.ma.masked_array(GOOD)).weights, want,
                               rtol=1e-12)
    for dtype in (torch.bfloat16, torch.float16, torch.int64):
        got = solve_weights(GOOD, warm_start=torch.tensor([2.0, 3.0]).to(dtype)).weights
        np.testing.assert_allclose(got, want, rtol=1e-9)


def test_tensor_without_memory_raises():
    """A ZeroTensor has a storage size but no memory (its data pointer is 0 plus the view's
    offset): a view of one must raise, not be read."""
    _assert_each_raises("""
        import torch
        from pub_native import solve_weights
        z = torch._efficientzerotensor((3, 3), dtype=torch.float64)
    """, """[(z, {}), (z[1:, 1:], {}), (z[1:, 1:], {"method": "ccp"})]""",
        "TypeError", "no memory", 3)


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors is in prototype")
@pytest.mark.parametrize("make", [
    lambda G: G.to_sparse_csr(),
    lambda G: G.to_sparse_csc(),
    lambda G: G.float().to_mkldnn(),
    lambda G: torch.nested.nested_tensor([G, G], layout=torch.jagged),
    lambda G: torch.nested.nested_tensor([G, G]),
], ids=["csr", "csc", "mkldnn", "jagged", "nested"])
def test_other_layouts_raise_type_error(make):
    with pytest.raises(TypeError, match="G must be a dense"):
        solve_weights(make(torch.tensor(GOOD)))


def test_inside_function_transforms_raises_type_error():
    G = torch.tensor(GOOD)
    for transform in (torch.vmap(lambda g: solve_weights(g).weights),
                      torch.func.grad(lambda g: solve_weights(g).weights.sum())):
        with pytest.raises(TypeError, match="wrapper tensor"):
            transform(torch.stack([G, G]) if "vmap" in repr(transform) else G)


@pytest.mark.slow
def test_array_too_large_to_copy_raises_memory_error():
    """A broadcast (stride 0) array whose contiguous copy cannot be allocated (in a subprocess:
    it used to be read through a null pointer)."""
    _assert_each_raises("""
        import numpy as np
        from pub_native import solve_weights
    """, "[(np.broadcast_to(np.ones(1), (2**20, 2**20)), {})]", "MemoryError",
        "G could not be copied", 1)


def test_tensor_that_lies_about_its_memory_is_not_trusted():
    """The native side reads a tensor's address, strides and storage through torch's own C
    descriptors: an attribute set on the tensor, a patch of torch.Tensor or UntypedStorage, or a
    torch function mode that answers other values cannot make it read other memory. Each gives
    the weights of the tensor's real values (in a subprocess: a read elsewhere would crash)."""
    out = _run("""
        import torch
        from torch.overrides import TorchFunctionMode
        from pub_native import solve_weights
        G = torch.tensor([[2.0, 0.5], [0.5, 1.0]], dtype=torch.float64)
        expected = solve_weights(G.numpy().copy()).weights

        class Fake:
            def data_ptr(self):
                return 4096
            def nbytes(self):
                return 1 << 40

        other = torch.full((1 << 16,), 7.0, dtype=torch.float64)  # real memory, other values

        class Lies(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                name = getattr(func, "__name__", "")
                if name == "data_ptr":
                    return other.data_ptr()
                if name == "untyped_storage":
                    return other.untyped_storage()
                return func(*args, **(kwargs or {}))

        def check(what):
            r = solve_weights(G)
            assert torch.equal(r.weights, torch.from_numpy(expected)), (what, r.weights)
            print(what)

        G.untyped_storage = lambda: Fake()
        G.data_ptr = lambda: 4096 * 1024
        G.stride = lambda: (0, 0)
        check("instance")
        del G.untyped_storage, G.data_ptr, G.stride
        saved = torch.Tensor.data_ptr, torch.Tensor.stride, torch.UntypedStorage.nbytes
        torch.Tensor.data_ptr = lambda self: 4096 * 1024
        torch.Tensor.stride = lambda self: (0, 0)
        torch.UntypedStorage.nbytes = lambda self: 1 << 40
        check("class")
        torch.Tensor.data_ptr, torch.Tensor.stride, torch.UntypedStorage.nbytes = saved
        with Lies():
            check("mode")
    """)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["instance", "class", "mode"]


def test_native_result_class_must_be_a_named_tuple():
    """The native default call fills the four items of the result class it was given; a
    tuple type that keeps other items (struct sequences such as os.stat_result, whose hidden
    fields would be left unset) or has other fields is refused, and the class in use stays."""
    import os
    import time

    from pub_native import SolveStatus
    from pub_native._native import _C

    statuses = tuple(SolveStatus)
    for cls in (os.stat_result, time.struct_time, tuple, list):
        with pytest.raises(TypeError, match="NamedTuple"):
            _C.set_result_refs(cls, statuses, 1e-12, 50)
    r = solve_weights(np.eye(2))
    assert type(r).__name__ == "SolveResult" and r.status is SolveStatus.CONVERGED
