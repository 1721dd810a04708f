"""The SSM scans agree: minimamba.ssd, kernels.ssd_chunked (eager and compiled) and ssd_step against
the oracle kernels.ssd_sequential, for hypothesis-drawn shapes, groups, chunk sizes, initial states
and dtypes; and no result depends on the chunk size."""

import functools

import pytest
import torch
from conftest import max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import minimamba_kernels as kernels
from minimamba import segsum, ssd, ssd_step

TOL = {torch.float64: 1e-10, torch.float32: 2e-5}


@st.composite
def scan_inputs(draw):
    """Random SSM inputs of a drawn shape; decays span slow (alpha ~ 1) to fast forgetting."""
    b = draw(st.integers(1, 2))
    l = draw(st.integers(1, 40))
    g = draw(st.integers(1, 3))
    h = g * draw(st.integers(1, 3))
    p = draw(st.integers(1, 4))
    n = draw(st.integers(1, 6))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    per_token_A = draw(st.booleans())
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * draw(st.sampled_from([0.01, 0.5, 2.0]))
    A_shape = (b, l, h) if per_token_A else (h,)
    A = -torch.rand(*A_shape, generator=gen, dtype=dtype) * draw(st.sampled_from([0.1, 1.0, 8.0]))
    D = randn(h) if draw(st.booleans()) else None
    S0 = randn(b, h, p, n) if draw(st.booleans()) else None
    return dict(x=randn(b, l, h, p), dt=dt, A=A, B=randn(b, l, g, n), C=randn(b, l, g, n), D=D,
                initial_state=S0), dtype


def tricks(segment, factored_range):
    """kernels.ssd_chunked's CPU tricks with segments of `segment` tokens (rounded down to whole
    chunks), so that short test inputs cross segment boundaries (the default, 512, would give one
    segment), and the factored decay mask up to `factored_range` nats (0: step 1 recomputes (nearly)
    every row from the per-head blocks; 60: the default)."""
    return kernels.CpuTricks(segment=segment, factored_range=factored_range)


def _check(actual, expected, dtype, what, scale=None):
    """max |actual - expected| relative to max |expected|, or to `scale` where the result is a sum that
    cancels (float rounding is relative to the size of the summands, not of their sum)."""
    diff = (actual.double() - expected.double()).abs()
    err = diff.max().item() / max(expected.double().abs().max().item() if scale is None else scale, 1e-30)
    assert err <= TOL[dtype], f"{what}: max rel err {err:.3g} (mean abs diff {diff.mean().item():.3g}) > {TOL[dtype]}"


def summand_scale(kw):
    """max |state| of the recurrence run on |x|, |B|, |C|, |D|, |S0|: the size of the terms the final state
    sums, which bounds its rounding error when they cancel."""
    absolute = {k: (v.double().abs() if k in ("x", "B", "C", "D", "initial_state") else v.double())
                for k, v in kw.items() if v is not None}
    return kernels.ssd_sequential(**absolute)[1].abs().max().item()


@settings(max_examples=60, deadline=None)
@given(scan_inputs(), st.integers(1, 17), st.sampled_from([1, 8, 20, 512]), st.sampled_from([0.0, 1.0, 60.0]))
def test_chunked_scans_equal_sequential(inputs, chunk_size, segment, factored_range):
    kw, dtype = inputs
    y0, s0 = kernels.ssd_sequential(**kw)
    fast = functools.partial(kernels.ssd_chunked, cpu_tricks=tricks(segment, factored_range))
    for name, fn in (("minimamba.ssd", ssd), ("kernels.ssd_chunked", fast), ("kernels.ssd_chunked, no tricks",
                                                                              functools.partial(kernels.ssd_chunked, cpu_tricks=None))):
        y, s = fn(**kw, chunk_size=chunk_size)
        assert y.dtype == kw["x"].dtype and y.shape == y0.shape
        _check(y, y0, dtype, f"{name} y")
        _check(s, s0, dtype, f"{name} final state", scale=summand_scale(kw))


@pytest.mark.parametrize("A", [-0.9, -1.5, 3.0])
def test_factored_decay_mask_near_and_beyond_its_range(A):
    """Chunks of 64 tokens whose log-decay reaches 0.9 * 64 = 57.6 nats (inside
    CpuTricks.factored_range: every row factored), 96 nats (the rows past 60 nats come from the
    per-head blocks) and a growing 'decay' (A > 0, outside the model's range; the factors are clamped)
    all match the float64 oracle in float32."""
    gen = torch.Generator().manual_seed(0)
    b, l, h, p, n, q = 2, 200, 2, 3, 4, 64
    x, B, C = torch.randn(b, l, h, p, generator=gen), torch.randn(b, l, 1, n, generator=gen), torch.randn(b, l, 1, n, generator=gen)
    dt, A_ = torch.ones(b, l, h) * 0.1 if A > 0 else torch.ones(b, l, h), torch.full((h,), A)
    y0, s0 = kernels.ssd_sequential(x.double(), dt.double(), A_.double(), B.double(), C.double())
    with torch.no_grad():
        y, s = kernels.ssd_chunked(x, dt, A_, B, C, chunk_size=q)
    _check(y, y0, torch.float32, f"y, A={A}")
    _check(s, s0, torch.float32, f"state, A={A}")


@settings(max_examples=30, deadline=None)
@given(scan_inputs(), st.integers(1, 9), st.integers(10, 64))
def test_result_does_not_depend_on_chunk_size(inputs, q1, q2):
    """Every chunk size lands within the dtype's tolerance of the exact (float64) answer. (Comparing two
    float32 results with each other would double the rounding error of a sum that cancels.)"""
    kw, dtype = inputs
    exact = {k: (v.double() if v is not None else None) for k, v in kw.items()}
    y0, s0 = kernels.ssd_sequential(**exact)
    for fn in (ssd, kernels.ssd_chunked):
        for q in (q1, q2):
            y, s = fn(**kw, chunk_size=q)
            _check(y, y0, dtype, f"{fn.__name__} y, q={q}")
            _check(s, s0, dtype, f"{fn.__name__} state, q={q}", scale=summand_scale(kw))


@settings(max_examples=30, deadline=None)
@given(scan_inputs())
def test_step_by_step_equals_sequential(inputs):
    kw, dtype = inputs
    y0, s0 = kernels.ssd_sequential(**kw)
    state, ys = kw["initial_state"], []
    for t in range(kw["x"].shape[1]):
        A = kw["A"] if kw["A"].dim() == 1 else kw["A"][:, t]
        y, state = ssd_step(kw["x"][:, t], kw["dt"][:, t], A, kw["B"][:, t], kw["C"][:, t], D=kw["D"], state=state)
        ys.append(y)
    _check(torch.stack(ys, 1), y0, dtype, "ssd_step y")
    _check(state, s0, dtype, "ssd_step state")


@settings(max_examples=30, deadline=None)
@given(st.integers(1, 40), st.integers(0, 1000))
def test_doubling_state_pass_equals_loop(c, seed):
    """The compile-time chunk pass (doubling scan) equals the eager loop."""
    gen = torch.Generator().manual_seed(seed)
    states = torch.randn(2, c, 3, 2, 4, generator=gen, dtype=torch.float64)
    log_decay = -torch.rand(2, c, 3, generator=gen, dtype=torch.float64) * 3
    S0 = torch.randn(2, 3, 2, 4, generator=gen, dtype=torch.float64)
    e1, f1 = kernels._pass_states_loop(states, log_decay, S0)
    e2, f2 = kernels._pass_states_doubling(states, log_decay, S0)
    assert max_rel_err(e2, e1) < 1e-12 and max_rel_err(f2, f1) < 1e-12


def test_splitting_a_sequence_with_the_state_carried_is_exact():
    torch.manual_seed(0)
    b, l, h, p, g, n = 2, 50, 4, 3, 2, 5
    x, dt, A = torch.randn(b, l, h, p), torch.rand(b, l, h), -torch.rand(h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    y, s = ssd(x, dt, A, B, C, chunk_size=8)
    y1, s1 = ssd(x[:, :23], dt[:, :23], A, B[:, :23], C[:, :23], chunk_size=8)
    y2, s2 = ssd(x[:, 23:], dt[:, 23:], A, B[:, 23:], C[:, 23:], chunk_size=8, initial_state=s1)
    assert max_rel_err(torch.cat([y1, y2], 1), y) < 1e-5 and max_rel_err(s2, s) < 1e-5


def test_segsum_is_stable_for_long_chunks():
    """exp(segsum) must not overflow where exp(cumsum_i) * exp(-cumsum_j) would."""
    a = torch.full((512,), -5.0)  # cumsum reaches -2560: exp(+2560) overflows in float32
    L = torch.exp(segsum(a))
    assert torch.isfinite(L).all()
    assert torch.equal(L.triu(1), torch.zeros_like(L))
    assert torch.allclose(L.diagonal(), torch.ones(512))
    assert torch.allclose(L[3, 1], torch.exp(torch.tensor(-10.0)))


def test_bad_scan_inputs_are_named():
    x, dt, A = torch.randn(1, 5, 4, 2), torch.rand(1, 5, 4), -torch.rand(4)
    B = C = torch.randn(1, 5, 1, 3)
    with pytest.raises(ValueError, match="dt must be"):
        ssd(x, dt[:, :4], A, B, C, chunk_size=4)
    with pytest.raises(ValueError, match="A must be"):
        ssd(x, dt, -torch.rand(3), B, C, chunk_size=4)
    with pytest.raises(ValueError, match="g dividing h"):
        ssd(x, dt, A, torch.randn(1, 5, 3, 3), torch.randn(1, 5, 3, 3), chunk_size=4)
    with pytest.raises(ValueError, match="chunk_size"):
        ssd(x, dt, A, B, C, chunk_size=0)
    with pytest.raises(ValueError, match="state must be"):
        kernels.ssd_chunked(x, dt, A, B, C, chunk_size=4, initial_state=torch.zeros(1, 4, 2, 2))
    with pytest.raises(TypeError, match="must be tensors, got Tensor, Tensor, list"):  # was a raw AttributeError
        ssd(x, dt, [-1.0] * 4, B, C, chunk_size=4)
    with pytest.raises(ValueError, match=r"non-empty floating-point \(b, l, h, p\) tensor"):  # l = 0 divided by 0
        ssd(x[:, :0], dt[:, :0], A, B[:, :0], C[:, :0], chunk_size=4)
    with pytest.raises(ValueError, match="floating-point"):  # integer x was rounded back to integers, silently
        ssd(x.long(), dt, A, B, C, chunk_size=4)
    with pytest.raises(ValueError, match=r"floating-point \(b, h, p\)"):
        ssd_step(x[:, 0].long(), dt[:, 0], A, B[:, 0], C[:, 0])


@pytest.mark.slow
def test_compiled_chunked_equals_the_oracle_one_graph_per_bucket_and_trains():
    """ssd_chunked_compiled: lengths of one power-of-two bucket of chunk counts share one static graph; forward
    and the gradients autograd takes through the compiled graph match the float64 oracle."""
    import torch._dynamo

    torch._dynamo.reset()
    kernels._compiled = None
    counts = torch._dynamo.utils.counters
    counts.clear()
    torch.manual_seed(0)
    h, p, g, n, q = 4, 8, 2, 16, 16
    for l in (70, 90, 100, 128, 111):  # 5..8 chunks: one bucket
        leaves = [t.requires_grad_() for t in (torch.randn(1, l, h, p), torch.rand(1, l, h), -torch.rand(h),
                                                torch.randn(1, l, g, n), torch.randn(1, l, g, n))]
        exact_leaves = [t.detach().double().requires_grad_() for t in leaves]
        kw = dict(D=torch.ones(h), initial_state=torch.randn(1, h, p, n))
        exact = kernels.ssd_sequential(*exact_leaves, **{k: v.double() for k, v in kw.items()})
        out = kernels.ssd_chunked_compiled(*leaves, chunk_size=q, **kw)
        # Each float32 path is held to the exact answer, not to eager: the compiled code sums in another order
        # (and, on some CPUs, with other vector instructions); a wrong scan is off by O(1).
        ey, es = max_rel_err(out[0], exact[0]), max_rel_err(out[1], exact[1])
        assert ey < 2e-4 and es < 2e-4, f"l={l}: y err {ey:.3g}, state err {es:.3g}"
        loss = lambda y, s: (y * torch.linspace(-1, 1, l, dtype=y.dtype)[:, None, None]).sum() + s.square().sum()  # noqa: E731
        for name, got, ref in zip("x dt A B C".split(), torch.autograd.grad(loss(*out), leaves),
                                  torch.autograd.grad(loss(*exact), exact_leaves)):
            assert max_rel_err(got, ref) < 1e-3, f"l={l}: d{name} err {max_rel_err(got, ref):.3g}"
    assert counts["stats"]["unique_graphs"] <= 1, dict(counts["stats"])


# kernels.ssd_chunked has a hand-written backward (kernels._SSDChunked): checked by finite differences
# in float64 (torch.autograd.gradcheck) and, in float32, against autograd through the oracle.


@settings(max_examples=12, deadline=None)
@given(st.integers(1, 2), st.integers(1, 13), st.integers(1, 2), st.integers(1, 2), st.integers(1, 3),
       st.integers(1, 3), st.integers(1, 6), st.booleans(), st.booleans(), st.booleans(), st.sampled_from([1, 6, 512]),
       st.sampled_from([0.0, 1.0, 60.0]), st.integers(0, 2**31 - 1))
def test_chunked_backward_passes_gradcheck(b, l, g, r, p, n, q, per_token_A, with_D, with_state, segment,
                                           factored_range, seed):
    """Segments (CpuTricks.segment) of one chunk, of a few chunks, and one segment for the whole input;
    step 1's backward through the per-head blocks (range 0), the factored mask (60), and a mix (1)."""
    gen = torch.Generator().manual_seed(seed)
    h, dd = g * r, torch.float64

    def leaf(t):
        return t.to(dd).requires_grad_(True)

    args = (leaf(torch.randn(b, l, h, p, generator=gen)), leaf(torch.rand(b, l, h, generator=gen) * 0.5 + 0.05),
            leaf(-torch.rand(*((b, l, h) if per_token_A else (h,)), generator=gen) * 3),
            leaf(torch.randn(b, l, g, n, generator=gen)), leaf(torch.randn(b, l, g, n, generator=gen)),
            leaf(torch.randn(h, generator=gen)) if with_D else None,
            leaf(torch.randn(b, h, p, n, generator=gen)) if with_state else None)

    def fn(x, dt, A, B, C, D, S0):
        return kernels.ssd_chunked(x, dt, A, B, C, chunk_size=q, D=D, initial_state=S0,
                                   cpu_tricks=tricks(segment, factored_range))

    assert torch.autograd.gradcheck(fn, args, atol=1e-7, rtol=1e-5)


@settings(max_examples=15, deadline=None)
@given(scan_inputs(), st.integers(1, 17), st.sampled_from([1, 12, 512]), st.sampled_from([0.0, 1.0, 60.0]),
       st.booleans())
def test_chunked_gradients_equal_autograd_through_the_oracle(inputs, chunk_size, segment, factored_range,
                                                             blocks_only):
    """Every input's gradient (x, dt, A, B, C, D, initial_state), float32 and float64, per-token A too;
    blocks_only runs step 1's backward through the per-head blocks alone (the GPU path) on the CPU."""
    kw, dtype = inputs
    leaves = {k: v.clone().requires_grad_(True) for k, v in kw.items() if v is not None}
    gen = torch.Generator().manual_seed(0)
    x = kw["x"]
    w_y = torch.randn(x.shape, generator=gen, dtype=dtype)
    w_s = torch.randn(x.shape[0], x.shape[2], x.shape[3], kw["B"].shape[-1], generator=gen, dtype=dtype)
    grads = {}
    fast = kernels.CpuTricks(segment=segment, factored_range=factored_range, factored_backward=not blocks_only)
    for name, fn in (("oracle", kernels.ssd_sequential_chunked),
                     ("chunked", functools.partial(kernels.ssd_chunked, cpu_tricks=fast))):
        y, s = fn(**{**kw, **leaves}, chunk_size=chunk_size)
        loss = (y * w_y).sum() + (s * w_s).sum()
        grads[name] = dict(zip(leaves, torch.autograd.grad(loss, list(leaves.values()))))
    tol = {torch.float64: 1e-9, torch.float32: 1e-4}[dtype]
    largest = max(g.abs().max().item() for g in grads["oracle"].values())
    for k, ref in grads["oracle"].items():
        # float64: relative to this gradient's own max |ref|, floored at 1e-3 (gradients here are O(1)).
        # float32: relative to the largest gradient of any input. A gradient that is exactly 0 (dA for a
        # single token, whose output does not depend on its own decay) keeps the float32 rounding noise of
        # the O(1-10) terms that cancel in it (the factored mask's exp(cs) exp(-cs) is not exactly 1): seen
        # up to 1.5e-6, far above 1e-4 of its own floor. The float64 draws hold every gradient to its own scale.
        diff = (grads["chunked"][k].double() - ref.double()).abs().max().item()
        err = diff / max(ref.abs().max().item() if dtype == torch.float64 else largest, 1e-3)
        mean = (grads["chunked"][k].double() - ref.double()).abs().mean().item()
        assert err <= tol, f"d{k}: max rel err {err:.3g} (mean abs diff {mean:.3g}) > {tol}"
