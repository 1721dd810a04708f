"""Tests for mitigations.py: each method against an independent step-by-step oracle, the sliding window
against the true window (a zero state run over only the last r tokens) and the banded quadratic form,
the identities when disabled, and chunked == streaming == step under every method.

Run: python -m pytest -q tests/test_mitigations.py
"""

import contextlib
import copy
import dataclasses
import math
import pickle

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import minimamba
import mitigations as mit

SETTINGS = dict(max_examples=25, deadline=None, derandomize=True)
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-10), torch.float32: dict(rtol=2e-4, atol=2e-4)}


def assert_close(got, want, what, **tol):
    """torch.testing.assert_close with the max / mean absolute difference in the message."""
    diff = (got.double() - want.double()).abs()
    msg = f"{what}: max |diff| = {diff.max().item():.3e}, mean |diff| = {diff.mean().item():.3e}"
    torch.testing.assert_close(got, want, msg=msg, **tol)


# --------------------------------------------------------------------------------------------------
# An independent oracle: the recurrence one token at a time, with every method written out plainly
# --------------------------------------------------------------------------------------------------


def oracle(x, dt, A, B, C, D=None, h0=None, lambda_a=1.0, lambda_B=1.0, taus=None, every=None):
    """h_t = lambda_a exp(dt_t A_t) h_{t-1} + lambda_B dt_t x_t B_t^T; optional clamp after every
    `every`-th token; y_t = h_t C_t + D x_t. Returns (y, h_final), computed in x.dtype."""
    b, l, h, p = x.shape
    g, n = B.shape[-2:]
    rep = h // g
    A = A.expand(b, l, h) if A.dim() == 1 else A
    state = torch.zeros(b, h, p, n, dtype=x.dtype) if h0 is None else h0.clone()
    ys = []
    for t in range(l):
        alpha = lambda_a * torch.exp(dt[:, t] * A[:, t])  # (b, h)
        Bt = B[:, t].repeat_interleave(rep, dim=1)  # (b, h, n)
        Ct = C[:, t].repeat_interleave(rep, dim=1)
        state = alpha[..., None, None] * state + lambda_B * dt[:, t, :, None, None] * x[:, t, :, :, None] * Bt[:, :, None, :]
        if taus is not None and (t + 1) % every == 0:
            norm = state.flatten(2).norm(dim=-1)  # (b, h)
            state = state * torch.clamp(taus / norm, max=1.0)[..., None, None]
        y = (state * Ct[:, :, None, :]).sum(-1)
        if D is not None:
            y = y + D[:, None] * x[:, t]
        ys.append(y)
    return torch.stack(ys, 1), state


def true_window(x, dt, A, B, C, window, D=None):
    """Position t's output from a zero state run over only tokens t-r+1..t (the definition)."""
    l = x.shape[1]
    out = []
    for t in range(l):
        lo = max(0, t - window + 1)
        Asl = A if A.dim() == 1 else A[:, lo:t + 1]
        y, _ = oracle(x[:, lo:t + 1], dt[:, lo:t + 1], Asl, B[:, lo:t + 1], C[:, lo:t + 1], D)
        out.append(y[:, -1])
    return torch.stack(out, 1)


@st.composite
def scan_inputs(draw, dtype=torch.float64, max_len=24, per_token_A=None):
    """Random scan inputs: shapes, groups, decays (from nearly none to strong) and lengths."""
    b = draw(st.integers(1, 2))
    g = draw(st.integers(1, 2))
    h = g * draw(st.integers(1, 2))
    p, n = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    l = draw(st.integers(1, max_len))
    decay = draw(st.sampled_from([1e-3, 0.1, 1.0]))  # typical |dt A| per token
    seed = draw(st.integers(0, 2**31 - 1))
    per_tok = draw(st.booleans()) if per_token_A is None else per_token_A
    gen = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64)  # noqa: E731
    x = r(b, l, h, p)
    dt = torch.rand(b, l, h, generator=gen, dtype=torch.float64) * 0.9 + 0.1
    A = -decay * (torch.rand(b, l, h, generator=gen, dtype=torch.float64) + 0.5 if per_tok
                  else torch.rand(h, generator=gen, dtype=torch.float64) + 0.5)
    B, C = r(b, l, g, n), r(b, l, g, n)
    D = r(h) if draw(st.booleans()) else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return tuple(cast(t) for t in (x, dt, A, B, C, D))


def draw_window(data, l):
    """Windows of 1, shorter than the input, equal to it and longer."""
    kind = data.draw(st.sampled_from(["one", "shorter", "equal", "longer"]))
    return {"one": 1, "shorter": data.draw(st.integers(1, max(1, l - 1))), "equal": l,
            "longer": l + data.draw(st.integers(1, 5))}[kind]


# --------------------------------------------------------------------------------------------------
# Sliding window by state difference
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@settings(**SETTINGS)
@given(data=st.data())
def test_sliding_window_equals_true_window_and_banded_form(dtype, data):
    x, dt, A, B, C, D = data.draw(scan_inputs(dtype))
    l = x.shape[1]
    window = draw_window(data, l)
    chunk = data.draw(st.integers(1, 8))
    got = mit.sliding_window_ssd(x, dt, A, B, C, window=window, D=D, chunk_size=chunk)
    cast64 = lambda t: None if t is None else t.double()  # noqa: E731
    want = true_window(*(cast64(t) for t in (x, dt, A, B, C)), window, cast64(D))
    assert_close(got.double(), want, f"state difference vs true window (r={window}, l={l})", **TOL[dtype])
    banded = mit.sliding_window_quadratic(x, dt, A, B, C, window=window, D=D)
    assert_close(banded.double(), want, "banded quadratic vs true window", **TOL[dtype])
    assert_close(got.double(), banded.double(), "state difference vs banded quadratic", **TOL[dtype])


@settings(**SETTINGS)
@given(data=st.data())
def test_sliding_window_streaming_and_step_equal_one_shot(data):
    """Any split into pieces, and any mix of chunked pieces and single steps, gives the one-shot y."""
    x, dt, A, B, C, D = data.draw(scan_inputs(torch.float64))
    l = x.shape[1]
    window = draw_window(data, l)
    want = mit.sliding_window_ssd(x, dt, A, B, C, window=window, D=D, chunk_size=4)
    scan = mit.SlidingWindowScan(minimamba.DefaultScan(), window)
    cuts = sorted(set(data.draw(st.lists(st.integers(1, max(1, l - 1)), max_size=4)))) + [l]
    state, ys, start = None, [], 0
    for end in cuts:
        if end <= start:
            continue
        sl = slice(start, end)
        Asl = A if A.dim() == 1 else A[:, sl]
        if end - start == 1 or data.draw(st.booleans()):  # this piece token by token
            for t in range(start, end):
                At = A if A.dim() == 1 else A[:, t]
                y, state = scan.step(x[:, t], dt[:, t], At, B[:, t], C[:, t], D, state)
                ys.append(y[:, None])
        else:
            y, state = scan.chunked(x[:, sl], dt[:, sl], Asl, B[:, sl], C[:, sl], D, state, 3)
            ys.append(y)
        start = end
    assert_close(torch.cat(ys, 1), want, f"streamed vs one-shot (r={window}, cuts={cuts})", **TOL[torch.float64])
    # the carried state holds at most `window` cached tokens, and h_T is the full-context state
    assert state.cache_x.shape[1] <= window, f"{state.cache_x.shape[1]} tokens cached for a window of {window}"
    _, h_full = oracle(x, dt, A, B, C)
    assert_close(state.h, h_full, "carried h_T vs oracle final state", **TOL[torch.float64])
    # its window state h_T - alpha h_{T-r} is the state of a zero-state run over the last r tokens
    lo = max(0, l - window)
    _, h_win = oracle(x[:, lo:], dt[:, lo:], A if A.dim() == 1 else A[:, lo:], B[:, lo:], C[:, lo:])
    assert_close(state.window_state(), h_win, "window state vs last-r-tokens state", **TOL[torch.float64])


def test_sliding_window_memory_is_bounded_by_the_window():
    torch.manual_seed(0)
    b, h, p, g, n, window = 1, 2, 3, 1, 4, 16
    scan = mit.SlidingWindowScan(minimamba.DefaultScan(), window)
    state, sizes = None, []
    for piece in range(6):
        L = 50
        x, dt = torch.randn(b, L, h, p), torch.rand(b, L, h) + 0.1
        A, B, C = -torch.rand(h) - 0.1, torch.randn(b, L, g, n), torch.randn(b, L, g, n)
        _, state = scan.chunked(x, dt, A, B, C, None, state, 8)
        sizes.append(state.nbytes())
        # the cache owns its memory (no view into the piece that would keep it alive)
        assert state.cache_x.untyped_storage().nbytes() == state.cache_x.numel() * state.cache_x.element_size()
    assert len(set(sizes)) == 1, f"window state size changes with stream length: {sizes}"


def test_sliding_window_long_stream_float32_stays_accurate():
    """Over a 2000-token float32 stream, the state-difference output stays close to the true window
    (the decay comes from a float64 cumsum, so no drift), for slow and fast decays."""
    torch.manual_seed(1)
    b, l, h, p, g, n, window = 1, 2000, 2, 2, 1, 3, 32
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h) * 0.5 + 0.05
    A, B, C = torch.tensor([-0.02, -1.0]), torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    got = mit.sliding_window_ssd(x, dt, A, B, C, window=window, chunk_size=64)
    want = mit.sliding_window_quadratic(x.double(), dt.double(), A.double(), B.double(), C.double(), window=window)
    # the state difference cancels |h_t| ~ sqrt(1/(2*0.02*0.3)) ~ 10x larger terms: float32 loses ~1 digit
    assert_close(got.double(), want, "float32 long stream vs float64 banded", rtol=1e-3, atol=1e-3)


def test_sliding_window_at_least_length_is_exactly_the_plain_scan():
    torch.manual_seed(2)
    b, l, h, p, g, n = 2, 20, 4, 3, 2, 5
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h) + 0.1
    A, B, C, D = -torch.rand(h) - 0.1, torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h)
    want, _ = minimamba.DefaultScan().chunked(x, dt, A, B, C, D, None, 8)
    for window in (l, l + 7):
        got = mit.sliding_window_ssd(x, dt, A, B, C, window=window, D=D, chunk_size=8)
        assert torch.equal(got, want), f"window={window} >= l={l} must be the identity"


# --------------------------------------------------------------------------------------------------
# RRI and Delta scaling
# --------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_rri_and_delta_scaling_equal_the_oracle_in_both_paths(data):
    x, dt, A, B, C, D = data.draw(scan_inputs(torch.float64))
    lambda_a = data.draw(st.sampled_from([1.0, 0.999, 0.9]))
    lambda_B = data.draw(st.sampled_from([1.0, 0.75, 1.5]))
    factor = data.draw(st.sampled_from([1.0, 0.5, 0.2]))
    h0 = torch.randn(x.shape[0], x.shape[2], x.shape[3], B.shape[-1], dtype=torch.float64)
    want, want_h = oracle(x, dt, A, B, C, D, h0, lambda_a=lambda_a, lambda_B=lambda_B)
    got, got_h = mit.rri_ssd(x, dt, A, B, C, lambda_a=lambda_a, lambda_B=lambda_B, chunk_size=5, D=D, initial_state=h0)
    assert_close(got, want, f"rri chunked (lambda_a={lambda_a}, lambda_B={lambda_B})", **TOL[torch.float64])
    assert_close(got_h, want_h, "rri final state", **TOL[torch.float64])
    # step path
    scan, s, ys = mit.RRIScan(minimamba.DefaultScan(), lambda_a, lambda_B), h0, []
    for t in range(x.shape[1]):
        y, s = scan.step(x[:, t], dt[:, t], A if A.dim() == 1 else A[:, t], B[:, t], C[:, t], D, s)
        ys.append(y)
    assert_close(torch.stack(ys, 1), want, "rri step", **TOL[torch.float64])
    # Delta scaling = the oracle with dt * factor (decay and insertion), D x untouched
    want_d, _ = oracle(x, dt * factor, A, B, C, D, h0)
    got_d, _ = mit.delta_scaled_ssd(x, dt, A, B, C, factor=factor, chunk_size=4, D=D, initial_state=h0)
    assert_close(got_d, want_d, f"delta scaling x{factor}", **TOL[torch.float64])


def test_rri_and_delta_disabled_are_exactly_the_plain_scan():
    torch.manual_seed(3)
    b, l, h, p, g, n = 2, 13, 2, 3, 1, 4
    x, dt = torch.randn(b, l, h, p), torch.rand(b, l, h) + 0.1
    A, B, C, D = -torch.rand(h) - 0.1, torch.randn(b, l, g, n), torch.randn(b, l, g, n), torch.randn(h)
    want = minimamba.DefaultScan().chunked(x, dt, A, B, C, D, None, 4)
    for got in (mit.rri_ssd(x, dt, A, B, C, lambda_a=1.0, lambda_B=1.0, chunk_size=4, D=D),
                mit.delta_scaled_ssd(x, dt, A, B, C, factor=1.0, chunk_size=4, D=D)):
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rri_effective_horizon():
    """With no input and alpha = 1 (A ~ 0), RRI alone forgets at rate lambda_a per token."""
    b, l, h, p, g, n = 1, 100, 1, 1, 1, 1
    x = torch.zeros(b, l, h, p, dtype=torch.float64)
    dt = torch.full((b, l, h), 0.3, dtype=torch.float64)
    A = torch.full((h,), -1e-12, dtype=torch.float64)
    B = C = torch.ones(b, l, g, n, dtype=torch.float64)
    h0 = torch.ones(b, h, p, n, dtype=torch.float64)
    _, hT = mit.rri_ssd(x, dt, A, B, C, lambda_a=0.99, lambda_B=1.0, chunk_size=16, initial_state=h0)
    assert math.isclose(hT.item(), 0.99 ** l, rel_tol=1e-9), (hT.item(), 0.99 ** l)


# --------------------------------------------------------------------------------------------------
# State normalization
# --------------------------------------------------------------------------------------------------


@settings(**SETTINGS)
@given(data=st.data())
def test_clamp_never_increases_the_norm_and_leaves_small_states_alone(data):
    seed = data.draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(2, 3, 4, 5, generator=gen) * data.draw(st.sampled_from([1e-3, 1.0, 1e3]))
    tau = torch.rand(3, generator=gen) * 10 + 1e-3
    out, scale = mit.clamp_state(h, tau)
    n_in, n_out = h.flatten(2).norm(dim=-1), out.flatten(2).norm(dim=-1)
    assert bool((n_out <= n_in * (1 + 1e-6)).all()), "the clamp increased a norm"
    assert bool((n_out <= tau * (1 + 1e-5)).all()), "a clamped norm exceeds tau"
    below = n_in <= tau
    assert torch.equal(out[below], h[below]), "a state below tau was changed"
    assert bool((scale <= 1).all())
    # tau = inf never clamps; a zero state stays zero
    assert torch.equal(mit.clamp_state(h, torch.full((3,), math.inf))[0], h)
    assert torch.equal(mit.clamp_state(torch.zeros_like(h), tau)[0], torch.zeros_like(h))


@settings(**SETTINGS)
@given(data=st.data())
def test_state_norm_equals_oracle_in_chunked_streaming_and_step(data):
    x, dt, A, B, C, D = data.draw(scan_inputs(torch.float64))
    every = data.draw(st.integers(1, 6))
    l = x.shape[1]
    # thresholds from a fraction of the typical norm so that clamps really happen
    _, h_plain = oracle(x, dt, A, B, C)
    taus = h_plain.flatten(2).norm(dim=-1).mean(0) * data.draw(st.sampled_from([0.1, 0.5, 2.0])) + 1e-3
    want, want_h = oracle(x, dt, A, B, C, D, taus=taus, every=every)
    got, got_h = mit.state_norm_ssd(x, dt, A, B, C, taus=taus, every=every, chunk_size=4, D=D)
    assert_close(got, want, f"state norm chunked (every={every})", **TOL[torch.float64])
    assert_close(got_h, want_h, "state norm final state", **TOL[torch.float64])
    # streaming: pieces that do not line up with the clamp positions, mixed with single steps
    scan = mit.StateNormScan(minimamba.DefaultScan(), taus, every)
    cut = data.draw(st.integers(0, l))
    y1, s = scan.chunked(x[:, :cut], dt[:, :cut], A if A.dim() == 1 else A[:, :cut], B[:, :cut], C[:, :cut], D, None, 3) \
        if cut > 0 else (x[:, :0], None)
    ys = [y1]
    for t in range(cut, l):
        y, s = scan.step(x[:, t], dt[:, t], A if A.dim() == 1 else A[:, t], B[:, t], C[:, t], D, s)
        ys.append(y[:, None])
    assert_close(torch.cat(ys, 1), want, f"state norm chunked({cut}) + steps", **TOL[torch.float64])


def test_state_norm_disabled_and_above_all_norms():
    torch.manual_seed(4)
    b, l, h, p, g, n = 2, 30, 2, 3, 1, 4
    x, dt = torch.randn(b, l, h, p, dtype=torch.float64), torch.rand(b, l, h, dtype=torch.float64) + 0.1
    A, B, C = -torch.rand(h, dtype=torch.float64) - 0.1, torch.randn(b, l, g, n, dtype=torch.float64), torch.randn(b, l, g, n, dtype=torch.float64)
    want = minimamba.DefaultScan().chunked(x, dt, A, B, C, None, None, 8)
    off = mit.state_norm_ssd(x, dt, A, B, C, taus=torch.full((h,), math.inf), every=4, chunk_size=8)
    assert torch.equal(off[0], want[0]) and torch.equal(off[1], want[1]), "tau = inf must be the identity"
    high = mit.state_norm_ssd(x, dt, A, B, C, taus=torch.full((h,), 1e9), every=4, chunk_size=8)
    assert_close(high[0], want[0], "tau above every norm changes nothing", **TOL[torch.float64])


# --------------------------------------------------------------------------------------------------
# Model level: every method in chunked forward, streaming forward, step and generate
# --------------------------------------------------------------------------------------------------

from minimamba import Mamba2Config, Mamba2LM  # noqa: E402

# larger step sizes and slower decays than the default init, so that the state matters to the logits
TINY = dict(d_model=32, n_layer=2, vocab_size=40, d_state=8, headdim=8, ngroups=2, chunk_size=8,
            dt_min=0.05, dt_max=0.5, A_init_range=(0.5, 2.0))
MODEL_TOL = dict(rtol=1e-5, atol=2e-6)  # float32 model; the paths differ by ~2e-7, the methods' effects ~1e-2


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(**TINY)).eval()
    ids = torch.randint(0, TINY["vocab_size"], (2, 20), generator=torch.Generator().manual_seed(1))
    return model, ids


def methods(model, ids):
    """(name, a function that returns a fresh context manager) for each method, set so that it acts."""
    h = model.config.nheads
    # thresholds well below the states' norms so the clamp really acts
    with torch.no_grad():
        taus = mit.calibrate_state_norm(model, ids[:, :12], every=4) * 0.3
    return [
        ("plain", lambda: mit._SwappedScans(model, lambda inner, i: inner)),
        ("rri", lambda: mit.rri(model, lambda_a=0.9, lambda_B=0.7)),
        ("delta", lambda: mit.delta_scaling(model, 0.5)),
        ("state_norm", lambda: mit.state_norm(model, taus, every=3)),
        ("window", lambda: mit.sliding_window(model, 5)),
        ("window+rri", lambda: _both(mit.sliding_window(model, 7), lambda: mit.rri(model, 0.95, 0.8))),
        ("norm+delta", lambda: _both(mit.state_norm(model, torch.full((2, h), 0.5), every=1),
                                     lambda: mit.delta_scaling(model, 0.7))),
    ]


@__import__("contextlib").contextmanager
def _both(first, make_second):
    with first, make_second():
        yield


@torch.no_grad()
def run_paths(model, ids, cuts=(7, 8, 13)):
    """Logits from one forward, from a streamed forward in pieces, and from prefill + step."""
    full, _ = model(ids)
    pieces, state, start = [], None, 0
    for end in (*cuts, ids.shape[1]):
        logits, state = model(ids[:, start:end], state)
        pieces.append(logits)
        start = end
    streamed = torch.cat(pieces, 1)
    prefill = 5
    logits, state = model(ids[:, :prefill])
    stepped = [logits]
    for t in range(prefill, ids.shape[1]):
        logits, state = model.step(ids[:, t], state)
        stepped.append(logits[:, None])
    return full, streamed, torch.cat(stepped, 1)


def test_every_method_agrees_across_chunked_streaming_step_and_generate(tiny):
    model, ids = tiny
    plain_full = run_paths(model, ids)[0]
    for name, ctx in methods(model, ids):
        with ctx():
            full, streamed, stepped = run_paths(model, ids)
            assert_close(streamed, full, f"{name}: streamed vs one forward", **MODEL_TOL)
            assert_close(stepped, full, f"{name}: prefill + step vs one forward", **MODEL_TOL)
            # generate (greedy) == re-running the whole sequence and taking the argmax each time
            out = model.generate(ids[:, :6], max_new_tokens=3, temperature=0)
            seq = ids[:, :6]
            for _ in range(3):
                logits, _ = model(seq)
                seq = torch.cat([seq, logits[:, -1, : model.config.vocab_size].argmax(-1, keepdim=True)], 1)
        assert torch.equal(out, seq), f"{name}: generate differs from greedy over the chunked forward"
        if name != "plain":  # the method really acts (the swap is not a no-op)
            assert (full - plain_full).abs().max() > 1e-3, f"{name} did not change the logits"
    # on exit every layer has its default scan back
    assert all(type(m.scan).__name__ == "DefaultScan" for m in mit._mixers(model))


def test_disabled_methods_are_exactly_the_model(tiny):
    model, ids = tiny
    h, l = model.config.nheads, ids.shape[1]
    want = run_paths(model, ids)
    for name, ctx in [("rri", mit.rri(model, 1.0, 1.0)), ("delta", mit.delta_scaling(model, 1.0)),
                      ("state_norm", mit.state_norm(model, torch.full((2, h), math.inf), every=2)),
                      ("window", mit.sliding_window(model, l))]:
        with ctx:
            got = run_paths(model, ids)
        for path, g, w in zip(("full", "streamed", "stepped"), got, want):
            assert torch.equal(g, w), f"{name} disabled changed the {path} logits: max |diff| {(g - w).abs().max():.3e}"


def test_wrong_order_and_shapes_are_refused_and_leave_the_model_alone(tiny):
    model, _ = tiny
    h = model.config.nheads
    with mit.rri(model, 0.9, 0.9):
        with pytest.raises(ValueError, match="before rri"):
            with mit.sliding_window(model, 4):
                pass
        with pytest.raises(ValueError, match="before rri"):
            with mit.state_norm(model, torch.ones(2, h), every=2):
                pass
        assert all(isinstance(m.scan, mit.RRIScan) for m in mit._mixers(model))
    with pytest.raises(ValueError, match="n_layer, h"):
        mit.state_norm(model, torch.ones(h), every=2)
    with pytest.raises(ValueError, match="lambda_a"):
        mit.rri(model, lambda_a=1.5)
    with pytest.raises(ValueError, match="window"):
        mit.sliding_window(model, 0)


def test_state_norm_caps_the_model_state_and_window_state_is_bounded(tiny):
    model, ids = tiny
    h = model.config.nheads
    taus = torch.full((2, h), 0.05)
    with torch.no_grad(), mit.state_norm(model, taus, every=1):
        _, state = model(ids)
    for s in state.ssm:  # clamped after the last token (every = 1)
        norms = s.h.flatten(2).norm(dim=-1)
        assert bool((norms <= 0.05 * (1 + 1e-5)).all()), norms.max()
    with torch.no_grad(), mit.sliding_window(model, 4):
        _, state = model(ids)
        sizes = [s.nbytes() for s in state.ssm]
        _, state = model(ids, state)
        assert [s.nbytes() for s in state.ssm] == sizes


# --------------------------------------------------------------------------------------------------
# Diagnostics
# --------------------------------------------------------------------------------------------------


def test_state_statistics_by_hand():
    # one batch row, two heads, p = 1, n = 4
    h = torch.tensor([[[[1.0, -2.0, 3.0, -4.0]], [[0.0, 0.0, 0.0, 2.0]]]])
    s = mit.state_statistics(h, top_k=2)
    assert s["mean"].tolist() == [-0.5, 0.5]
    assert s["var"].tolist() == [(1.5**2 + 1.5**2 + 3.5**2 + 3.5**2) / 4, (3 * 0.25 + 1.5**2) / 4]  # 6.25, 0.75
    assert torch.allclose(s["rms"], torch.tensor([math.sqrt(30 / 4), 1.0], dtype=torch.float64))
    assert s["max_abs"].tolist() == [4.0, 2.0]
    assert torch.allclose(s["norm"], torch.tensor([math.sqrt(30), 2.0], dtype=torch.float64))
    assert s["top_channels"].tolist()[0] == [3, 2] and s["top_values"].tolist()[0] == [4.0, 3.0]
    assert s["top_channels"].tolist()[1][0] == 3


def test_first_token_retention_by_hand():
    dt = torch.tensor([[[1.0], [0.5], [2.0]]])  # (b=1, l=3, h=1)
    A = torch.tensor([-0.1])
    r = mit.first_token_retention(dt, A)[0, :, 0]
    want = [1.0, math.exp(-0.05), math.exp(-0.05 - 0.2)]  # prod_{j=2..t} exp(dt_j A)
    assert torch.allclose(r, torch.tensor(want, dtype=torch.float64)), (r, want)


@pytest.mark.parametrize("name,d_model,n_layer,table", [("130m", 768, 24, 4.848), ("370m", 1024, 48, 12.915),
                                                         ("780m", 1536, 48, 19.354)])
def test_state_size_reproduces_the_paper_table(name, d_model, n_layer, table):
    config = Mamba2Config(d_model=d_model, n_layer=n_layer, vocab_size=50277)
    assert round(mit.state_size(config) / 1e6, 3) == table, (name, mit.state_size(config))


def test_trace_states_matches_direct_computation(tiny):
    model, ids = tiny
    every = 6
    # capture layer 0's dt and A over the whole input, for the retention check
    seen = []

    class Capture:
        def __init__(self, inner):
            self.inner = inner

        def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
            seen.append((dt, A))
            return self.inner.chunked(x, dt, A, B, C, D, state, chunk_size, return_state=return_state)

    with torch.no_grad(), mit._SwappedScans(model, lambda inner, i: Capture(inner) if i == 0 else inner):
        _, state = model(ids[:, :every * 2])
    trace = mit.trace_states(model, ids, every=every, top_k=3)
    l = ids.shape[1]
    assert trace.positions == [6, 12, 18, 20]
    assert trace.mean.shape == (4, 2, model.config.nheads) and trace.top_channels.shape == (4, 2, model.config.nheads, 3)
    direct = mit.state_statistics(state.ssm[1], top_k=3)
    for key in ("mean", "var", "rms", "max_abs", "norm", "top_values"):
        assert_close(trace.__dict__[key][1, 1], direct[key], f"trace {key} at 12 tokens", rtol=1e-5, atol=1e-6)
    dt, A = seen[0]
    ret = mit.first_token_retention(dt, A)[:, every * 2 - 1].mean(0)
    assert_close(trace.retention[1, 0], ret, "first-token retention at 12 tokens", rtol=1e-6, atol=1e-9)
    # under RRI the retention includes lambda_a^(t-1)
    with mit.rri(model, lambda_a=0.9, lambda_B=1.0):
        tr = mit.trace_states(model, ids[:, :every * 2], every=every)
    assert_close(tr.retention[1, 0], ret * 0.9 ** (every * 2 - 1), "retention under RRI", rtol=1e-5, atol=1e-9)
    assert l == 20 and "state_size" in trace.as_dict()
    # it runs under the methods whose state is an object (reads NormState.h / WindowState.window_state())
    for ctx in (mit.sliding_window(model, 4), mit.state_norm(model, torch.full((2, model.config.nheads), 0.1), every=2)):
        with ctx:
            tr = mit.trace_states(model, ids[:, :8], every=4)
        assert tr.mean.shape == (2, 2, model.config.nheads) and bool(torch.isfinite(tr.rms).all())
    assert bool((tr.norm <= 0.1 * (1 + 1e-5)).all()), "state_norm trace: norms above tau at the clamp points"


# --------------------------------------------------------------------------------------------------
# Refusals: bad arguments, states from another block, another shape or device; blocks left out of order
# --------------------------------------------------------------------------------------------------


def small_inputs(b=2, l=6, h=4, p=2, g=2, n=3, seed=5):
    """x, dt, A, B, C for the scan-level refusal tests (float32, per-head A)."""
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(b, l, h, p, generator=gen), torch.rand(b, l, h, generator=gen) + 0.1,
            -torch.rand(h, generator=gen) - 0.1, torch.randn(b, l, g, n, generator=gen),
            torch.randn(b, l, g, n, generator=gen))


# (call(model, x, dt, A, B, C), the error, the words its message must hold: what was expected and got)
BAD_ARGUMENTS = {
    "rri_ssd lambda_B=inf": (lambda m, *s: mit.rri_ssd(*s, lambda_a=1.0, lambda_B=math.inf, chunk_size=4),
                             ValueError, ["lambda_B must be a finite number > 0", "got inf"]),
    "delta_scaled_ssd factor=inf": (lambda m, *s: mit.delta_scaled_ssd(*s, factor=math.inf, chunk_size=4),
                                    ValueError, ["factor must be a finite number > 0", "got inf"]),
    "rri lambda_B=inf": (lambda m, *s: mit.rri(m, lambda_B=math.inf), ValueError, ["lambda_B", "got inf"]),
    "rri lambda_B=nan": (lambda m, *s: mit.rri(m, lambda_B=math.nan), ValueError, ["lambda_B", "got nan"]),
    "rri lambda_B=0": (lambda m, *s: mit.rri(m, lambda_B=0.0), ValueError, ["lambda_B", "got 0.0"]),
    "rri lambda_B=10**400": (lambda m, *s: mit.rri(m, lambda_B=10**400), ValueError, ["lambda_B", "got 1000"]),
    "rri lambda_B=None": (lambda m, *s: mit.rri(m, lambda_B=None), TypeError, ["lambda_B", "got None (NoneType)"]),
    "rri lambda_a=nan": (lambda m, *s: mit.rri(m, lambda_a=math.nan), ValueError, ["lambda_a must be a number in (0, 1]", "got nan"]),
    "rri lambda_a=inf": (lambda m, *s: mit.rri(m, lambda_a=math.inf), ValueError, ["lambda_a", "got inf"]),
    "rri lambda_a=1.5": (lambda m, *s: mit.rri(m, lambda_a=1.5), ValueError, ["lambda_a", "got 1.5"]),
    "rri lambda_a=0": (lambda m, *s: mit.rri(m, lambda_a=0), ValueError, ["lambda_a", "got 0"]),
    "rri lambda_a=True": (lambda m, *s: mit.rri(m, lambda_a=True), TypeError, ["lambda_a", "got True (bool)"]),
    "rri lambda_a='0.9'": (lambda m, *s: mit.rri(m, lambda_a="0.9"), TypeError, ["lambda_a", "got '0.9' (str)"]),
    "rri lambda_a=tensor": (lambda m, *s: mit.rri(m, lambda_a=torch.tensor(0.9)), TypeError, ["lambda_a", "(Tensor)"]),
    "delta_scaling inf": (lambda m, *s: mit.delta_scaling(m, math.inf), ValueError, ["factor", "got inf"]),
    "delta_scaling -inf": (lambda m, *s: mit.delta_scaling(m, -math.inf), ValueError, ["factor", "got -inf"]),
    "delta_scaling nan": (lambda m, *s: mit.delta_scaling(m, math.nan), ValueError, ["factor", "got nan"]),
    "delta_scaling 0": (lambda m, *s: mit.delta_scaling(m, 0), ValueError, ["factor", "got 0"]),
    "delta_scaling True": (lambda m, *s: mit.delta_scaling(m, True), TypeError, ["factor", "got True (bool)"]),
    "sliding_window 0": (lambda m, *s: mit.sliding_window(m, 0), ValueError, ["window must be a positive int", "got 0"]),
    "sliding_window True": (lambda m, *s: mit.sliding_window(m, True), TypeError, ["window", "got True (bool)"]),
    "sliding_window 4.0": (lambda m, *s: mit.sliding_window(m, 4.0), TypeError, ["window", "got 4.0 (float)"]),
    "sliding_window inf": (lambda m, *s: mit.sliding_window(m, math.inf), TypeError, ["window", "got inf (float)"]),
    "sliding_window None": (lambda m, *s: mit.sliding_window(m, None), TypeError, ["window", "got None"]),
    "sliding_window_quadratic 0": (lambda m, *s: mit.sliding_window_quadratic(*s, window=0), ValueError, ["window", "got 0"]),
    "sliding_window_quadratic -1": (lambda m, *s: mit.sliding_window_quadratic(*s, window=-1), ValueError, ["window", "got -1"]),
    "sliding_window_quadratic inf": (lambda m, *s: mit.sliding_window_quadratic(*s, window=math.inf), TypeError, ["window", "got inf"]),
    "state_norm every=0": (lambda m, *s: mit.state_norm(m, torch.ones(2, 8), every=0), ValueError, ["every must be a positive int", "got 0"]),
    "state_norm every=True": (lambda m, *s: mit.state_norm(m, torch.ones(2, 8), every=True), TypeError, ["every", "got True (bool)"]),
    "state_norm every=2.0": (lambda m, *s: mit.state_norm(m, torch.ones(2, 8), every=2.0), TypeError, ["every", "got 2.0 (float)"]),
    "state_norm taus nan": (lambda m, *s: mit.state_norm(m, torch.full((2, 8), math.nan)), ValueError, ["taus must be a (n_layer, h) = (2, 8) tensor of thresholds > 0", "got [nan"]),
    "state_norm taus 0": (lambda m, *s: mit.state_norm(m, torch.zeros(2, 8)), ValueError, ["taus", "got [0.0"]),
    "state_norm taus -inf": (lambda m, *s: mit.state_norm(m, torch.full((2, 8), -math.inf)), ValueError, ["taus", "got [-inf"]),
    "state_norm taus bool": (lambda m, *s: mit.state_norm(m, torch.ones(2, 8, dtype=torch.bool)), TypeError, ["taus", "got a torch.bool tensor"]),
    "state_norm taus complex": (lambda m, *s: mit.state_norm(m, torch.ones(2, 8, dtype=torch.cfloat)), TypeError, ["taus", "got a torch.complex64 tensor"]),
    "state_norm taus str": (lambda m, *s: mit.state_norm(m, "big"), TypeError, ["taus", "got 'big' (str)"]),
    "state_norm taus (h,)": (lambda m, *s: mit.state_norm(m, torch.ones(8)), ValueError, ["taus", "got shape (8,)"]),
    "state_norm_ssd taus (1,)": (lambda m, *s: mit.state_norm_ssd(*s, taus=torch.ones(1), every=2, chunk_size=4),
                                 ValueError, ["taus has 1 thresholds, the inputs have h = 4 heads"]),
    "state_norm_ssd taus (h+1,)": (lambda m, *s: mit.state_norm_ssd(*s, taus=torch.ones(5), every=2, chunk_size=4),
                                   ValueError, ["taus has 5 thresholds"]),
    "state_norm_ssd initial_state of another d_state": (
        lambda m, *s: mit.state_norm_ssd(*s, taus=torch.ones(4), every=2, chunk_size=4, initial_state=torch.zeros(2, 4, 2, 5)),
        ValueError, ["state must be (b, h, p, n) = (2, 4, 2, 3) on cpu, got (2, 4, 2, 5)"]),
    "clamp_state tau (h+1,)": (lambda m, *s: mit.clamp_state(torch.ones(1, 2, 3, 4), torch.ones(3)), ValueError, ["tau (h,)", "(3,)"]),
    "SlidingWindowScan layer=True": (lambda m, *s: mit.SlidingWindowScan(None, 4, layer=True), TypeError, ["layer", "got True"]),
    "StateNormScan layer=-1": (lambda m, *s: mit.StateNormScan(None, torch.ones(4), 2, layer=-1), ValueError, ["layer", "got -1"]),
    "rri_ssd A of another h": (lambda m, x, dt, A, B, C: mit.rri_ssd(x, dt, torch.ones(5), B, C, lambda_a=0.9, lambda_B=1.0, chunk_size=4),
                               ValueError, ["A must be (h,) = (4,)", "got (5,)"]),
    "first_token_retention A of another h": (lambda m, x, dt, *s: mit.first_token_retention(dt, torch.ones(5)), ValueError, ["A (h,)", "shape (5,)"]),
    "first_token_retention dt list": (lambda m, *s: mit.first_token_retention([0.1], torch.ones(1)), ValueError, ["dt must be a (b, l, h) tensor", "got a list"]),
    "rri_ssd chunk_size=None": (lambda m, *s: mit.rri_ssd(*s, lambda_a=0.9, lambda_B=1.0, chunk_size=None), TypeError, ["chunk_size", "got None"]),
    "sliding_window_ssd chunk_size=True": (lambda m, *s: mit.sliding_window_ssd(*s, window=2, chunk_size=True), TypeError, ["chunk_size", "got True"]),
    "chunked return_state='no'": (lambda m, *s: mit.RRIScan(minimamba.DefaultScan(), 0.9).chunked(*s, None, None, 4, return_state="no"),
                                  TypeError, ["return_state must be a bool", "got 'no'"]),
    "state_statistics top_k=0": (lambda m, *s: mit.state_statistics(torch.ones(1, 2, 3, 4), top_k=0), ValueError, ["top_k", "got 0"]),
    "state_statistics top_k=True": (lambda m, *s: mit.state_statistics(torch.ones(1, 2, 3, 4), top_k=True), TypeError, ["top_k", "got True"]),
    "trace_states every=True": (lambda m, *s: mit.trace_states(m, torch.zeros(1, 4, dtype=torch.long), every=True), TypeError, ["every", "got True"]),
    "trace_states empty input": (lambda m, *s: mit.trace_states(m, torch.zeros(1, 0, dtype=torch.long)), ValueError, ["l >= 1", "shape (1, 0)"]),
    "trace_states on_progress=5": (lambda m, *s: mit.trace_states(m, torch.zeros(1, 4, dtype=torch.long), on_progress=5), TypeError, ["on_progress", "got 5"]),
}


@pytest.mark.parametrize("case", list(BAD_ARGUMENTS))
def test_bad_arguments_are_refused_with_what_was_expected_and_received(tiny, case):
    model, _ = tiny
    call, error, words = BAD_ARGUMENTS[case]
    before = [m.scan for m in mit._mixers(model)]
    with pytest.raises(error) as info:
        call(model, *small_inputs())
    for w in words:
        assert w in str(info.value), f"{case}: {w!r} not in the message {str(info.value)!r}"
    assert all(a is b for a, b in zip(before, [m.scan for m in mit._mixers(model)])), f"{case} touched the model"


def test_numbers_of_any_real_type_are_accepted():
    """ints for floats, numpy scalars, lists for taus: converted, and the same method as the plain value."""
    np = pytest.importorskip("numpy")
    assert mit.RRIScan(None, np.float64(0.9), 1).lambda_a == 0.9 and mit.RRIScan(None, 1, 1).lambda_B == 1.0
    assert type(mit.SlidingWindowScan(None, np.int64(4)).window) is int
    assert mit.StateNormScan(None, [1, 2], np.int32(3)).taus.dtype == torch.float32
    assert mit.DeltaScaleScan(None, 2).name == "delta_scaling(factor=2.0)"
    # a huge window and lambda_a in the denormal range are valid, and still compute
    x, dt, A, B, C = small_inputs()
    want = mit.sliding_window_ssd(x, dt, A, B, C, window=6, chunk_size=4)
    assert torch.equal(mit.sliding_window_ssd(x, dt, A, B, C, window=10**30, chunk_size=4), want)
    assert torch.equal(mit.sliding_window_quadratic(x, dt, A, B, C, window=10**30),
                       mit.sliding_window_quadratic(x, dt, A, B, C, window=6))
    y, _ = mit.rri_ssd(x, dt, A, B, C, lambda_a=1e-310, lambda_B=1.0, chunk_size=4)
    assert bool(torch.isfinite(y).all())


def test_rri_with_dt_zero_or_below_the_floor_stays_finite():
    """dt = 0 (softplus underflow) or a denormal dt with a strong lambda_a: log(lambda_a) / dt would be
    -inf in float32 and 0 * inf = nan; with the floor the output is finite and, the tokens being the first
    ones (nothing to forget yet, almost nothing written), equal to the oracle."""
    x, dt, A, B, C = small_inputs()
    dt[:, 0], dt[:, 1] = 0.0, 1e-40
    got, got_h = mit.rri_ssd(x, dt, A, B, C, lambda_a=1e-3, lambda_B=1.0, chunk_size=4)
    assert bool(torch.isfinite(got).all()) and bool(torch.isfinite(got_h).all())
    want, _ = oracle(*(t.double() for t in (x, dt, A, B, C)), lambda_a=1e-3)
    assert_close(got.double(), want, "rri with dt = 0 and 1e-40 vs oracle", **TOL[torch.float32])


def in_block(block):
    """The block, or no block at all for None."""
    return block if block is not None else contextlib.nullcontext()


def model_state(model, ids, block):
    """The model's state after ids inside `block` (None: outside any block)."""
    with torch.no_grad(), in_block(block):
        return model(ids)[1]


FOREIGN_STATES = {  # (block that makes the state, block that continues it, error, words)
    "window 4 -> window 8": (lambda m: mit.sliding_window(m, 4), lambda m: mit.sliding_window(m, 8), ValueError,
                             ["this state was made by sliding_window(window=4) in layer 0; "
                              "this block is sliding_window(window=8) in layer 0"]),
    "state_norm -> window": (lambda m: mit.state_norm(m, torch.ones(2, 8), every=3), lambda m: mit.sliding_window(m, 4),
                             ValueError, ["made by state_norm(every=3, taus=#", "this block is sliding_window(window=4)"]),
    "window -> state_norm": (lambda m: mit.sliding_window(m, 4), lambda m: mit.state_norm(m, torch.ones(2, 8), every=3),
                             ValueError, ["made by sliding_window(window=4) in layer 0; this block is state_norm(every=3"]),
    "state_norm every 3 -> 4": (lambda m: mit.state_norm(m, torch.ones(2, 8), every=3),
                                lambda m: mit.state_norm(m, torch.ones(2, 8), every=4), ValueError, ["this block is state_norm(every=4"]),
    "state_norm taus -> other taus": (lambda m: mit.state_norm(m, torch.ones(2, 8), every=3),
                                      lambda m: mit.state_norm(m, torch.full((2, 8), 2.0), every=3), ValueError, ["made by state_norm(every=3, taus=#"]),
    "plain -> window": (lambda m: None, lambda m: mit.sliding_window(m, 4), TypeError,
                        ["this block is sliding_window(window=4) in layer 0, which continues only a state made by the same block, got a Tensor"]),
    "plain -> state_norm": (lambda m: None, lambda m: mit.state_norm(m, torch.ones(2, 8), every=3), TypeError,
                            ["this block is state_norm(every=3", "got a Tensor", "start the block from state None"]),
    "rri -> window": (lambda m: mit.rri(m, 0.9, 0.9), lambda m: mit.sliding_window(m, 4), TypeError, ["got a Tensor"]),
    "window -> rri": (lambda m: mit.sliding_window(m, 4), lambda m: mit.rri(m, 0.9, 0.9), TypeError,
                      ["this state was made by sliding_window(window=4) in layer 0; this block is rri(lambda_a=0.9, lambda_B=0.9)"]),
    "state_norm -> delta": (lambda m: mit.state_norm(m, torch.ones(2, 8), every=3), lambda m: mit.delta_scaling(m, 0.5), TypeError,
                            ["made by state_norm(every=3", "this block is delta_scaling(factor=0.5)"]),
    "window -> no block": (lambda m: mit.sliding_window(m, 4), lambda m: None, TypeError, ["got a WindowState"]),
    "state_norm -> no block": (lambda m: mit.state_norm(m, torch.ones(2, 8), every=3), lambda m: None, TypeError, ["got a NormState"]),
}


@pytest.mark.parametrize("case", list(FOREIGN_STATES))
def test_a_state_continues_only_in_the_block_that_made_it(tiny, case):
    model, ids = tiny
    make, cont, error, words = FOREIGN_STATES[case]
    state = model_state(model, ids[:, :10], make(model))
    with pytest.raises(error) as info, torch.no_grad(), in_block(cont(model)):
        model(ids[:, 10:], state)
    for w in words:
        assert w in str(info.value), f"{case}: {w!r} not in {str(info.value)!r}"
    assert all(type(m.scan).__name__ == "DefaultScan" for m in mit._mixers(model)), f"{case}: a block stayed installed"


def test_the_same_block_entered_again_continues_its_state(tiny):
    """A state is tied to its block's kind and parameters, not to the `with` statement: a new block with
    the same parameters (and rri on top, which does not change the state's form) continues it exactly."""
    model, ids = tiny
    h = model.config.nheads
    for make in (lambda: mit.sliding_window(model, 4), lambda: mit.state_norm(model, torch.full((2, h), 0.5), every=3)):
        with torch.no_grad(), make():
            want, _ = model(ids)
        with torch.no_grad():
            with make():
                first, state = model(ids[:, :9])
            with make():
                second, _ = model(ids[:, 9:], state.detach())  # detach keeps the record
        assert_close(torch.cat([first, second], 1), want, "continued in a second block", **MODEL_TOL)
    with torch.no_grad():
        with mit.sliding_window(model, 4):
            _, state = model(ids[:, :9])
        with mit.sliding_window(model, 4), mit.rri(model, 0.9, 0.9):
            model(ids[:, 9:], state)


def test_a_state_of_another_layer_shape_or_device_is_refused():
    x, dt, A, B, C = small_inputs()  # b 2, h 4, p 2, g 2, n 3
    base = minimamba.DefaultScan()
    window, norm = mit.SlidingWindowScan(base, 4, layer=0), mit.StateNormScan(base, torch.ones(4), 2, layer=0)
    _, ws = window.chunked(x, dt, A, B, C, None, None, 4)
    _, ns = norm.chunked(x, dt, A, B, C, None, None, 4)
    other = small_inputs(n=4)
    for scan, st in ((window, ws), (norm, ns)):
        with pytest.raises(ValueError, match=r"in layer 0; this block is .* in layer 1"):
            type(scan)(base, *((4,) if scan is window else (torch.ones(4), 2)), layer=1).chunked(x, dt, A, B, C, None, st, 4)
        with pytest.raises(ValueError, match=r"this state is \(b, h, p, n\) = \(2, 4, 2, 3\), the inputs need \(2, 4, 2, 4\)"):
            scan.chunked(*other, None, st, 4)  # another d_state
        with pytest.raises(ValueError, match=r"= \(2, 4, 2, 3\), the inputs need \(1, 4, 2, 3\)"):
            scan.step(x[:1, 0], dt[:1, 0], A, B[:1, 0], C[:1, 0], None, st)  # another batch
        moved = dataclasses.replace(st, h=st.h.to("meta"))
        with pytest.raises(ValueError, match="this state is on meta, the inputs on cpu"):
            scan.chunked(x, dt, A, B, C, None, moved, 4)
    with pytest.raises(ValueError, match=r"this state's cached B has g = 2 groups, the inputs' B has 1"):
        x1, dt1, A1, B1, C1 = small_inputs(g=1)
        window.chunked(x1, dt1, A1, B1, C1, None, ws, 4)
    # a tensor state of another shape under a transform: the model's scan says so
    with pytest.raises(ValueError, match=r"state must be \(b, h, p, n\) = \(2, 4, 2, 3\)"):
        mit.RRIScan(base, 0.9).chunked(x, dt, A, B, C, None, torch.zeros(2, 4, 2, 5), 4)


def chain(model):
    """Each layer's scans from the top: [[type name, ...], ...]."""
    out = []
    for m in mit._mixers(model):
        names, s = [], m.scan
        while s is not None:
            names.append(type(s).__name__)
            s = getattr(s, "inner", None)
        out.append(names)
    return out


@pytest.mark.parametrize("order", ["A B -A -B", "A B -A C -C -B", "A B C -B -A -C", "A B C -A -C -B"])
def test_blocks_left_out_of_order_restore_every_layer(tiny, order):
    """Enter and leave blocks in any order: while open, each layer holds exactly the open blocks' scans
    (oldest lowest) and computes what those blocks compute; once all are left, the model's own scans."""
    model, ids = tiny
    base = [m.scan for m in mit._mixers(model)]
    make = {"A": lambda: mit.sliding_window(model, 5), "B": lambda: mit.rri(model, 0.9, 0.8),
            "C": lambda: mit.delta_scaling(model, 0.5)}
    kind = {"A": "SlidingWindowScan", "B": "RRIScan", "C": "DeltaScaleScan"}
    open_blocks, ctx = [], {}
    for step in order.split():
        name = step.lstrip("-")
        if step.startswith("-"):
            ctx.pop(name).__exit__(None, None, None)
            open_blocks.remove(name)
        else:
            ctx[name] = make[name]()
            ctx[name].__enter__()
            open_blocks.append(name)
        want_chain = [kind[b] for b in reversed(open_blocks)] + [type(base[0]).__name__]
        assert chain(model) == [want_chain] * len(base), f"after {step}: {chain(model)}"
    assert all(a is b for a, b in zip(base, [m.scan for m in mit._mixers(model)]))
    # the blocks still open after "A B -A" compute what B alone computes
    with mit.rri(model, 0.9, 0.8):
        want = run_paths(model, ids)[0]
    a, b = mit.sliding_window(model, 5), mit.rri(model, 0.9, 0.8)
    a.__enter__(), b.__enter__(), a.__exit__(None, None, None)
    try:
        assert torch.equal(run_paths(model, ids)[0], want)
    finally:
        b.__exit__(None, None, None)
    assert all(a is b for a, b in zip(base, [m.scan for m in mit._mixers(model)]))


def test_an_exception_inside_a_block_restores_the_model(tiny):
    model, ids = tiny
    base = [m.scan for m in mit._mixers(model)]
    with pytest.raises(KeyError):
        with mit.sliding_window(model, 4), mit.rri(model, 0.9, 0.9):
            raise KeyError("inside")
    plain = model_state(model, ids, None)
    with pytest.raises(TypeError, match="got a Tensor"):  # an error from inside the forward
        with torch.no_grad(), mit.state_norm(model, torch.ones(2, model.config.nheads), every=2):
            model(ids, plain)
    assert all(a is b for a, b in zip(base, [m.scan for m in mit._mixers(model)]))


def test_a_block_is_entered_again_once_left_and_not_while_open(tiny):
    model, ids = tiny
    base = [m.scan for m in mit._mixers(model)]
    block = mit.sliding_window(model, 4)
    with torch.no_grad():
        with block:
            first, _ = model(ids)
        with block:  # the same object, a second time
            assert torch.equal(model(ids)[0], first)
        with block:
            with pytest.raises(RuntimeError, match="this block is already open"):
                block.__enter__()
    with pytest.raises(RuntimeError, match="this block is not open"):
        block.__exit__(None, None, None)
    assert all(a is b for a, b in zip(base, [m.scan for m in mit._mixers(model)]))


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_taken_inside_a_block_is_the_plain_model(tiny, how):
    """copy.deepcopy, or pickle as torch.save does, inside a block copies the model without the block's scans:
    the exit restores only the model it was entered on, so a copy that kept a method would keep it for good.
    The original keeps its blocks until they are left; a scan installed by hand, not by a block, is copied."""
    model, ids = tiny
    clone = (lambda m: copy.deepcopy(m)) if how == "deepcopy" else (lambda m: pickle.loads(pickle.dumps(m)))
    plain = run_paths(model, ids)
    with mit.sliding_window(model, 5), mit.rri(model, 0.9, 0.8):
        inside = run_paths(model, ids)[0]
        twin = clone(model)
        assert chain(twin) == [["DefaultScan"]] * len(chain(model)), f"the copy kept {chain(twin)}"
        for path, got, want in zip(("full", "streamed", "stepped"), run_paths(twin, ids), plain):
            assert torch.equal(got, want), f"{path}: the copy is not the plain model"
        assert torch.equal(run_paths(model, ids)[0], inside), "copying changed the original's blocks"
    assert all(type(m.scan).__name__ == "DefaultScan" for m in mit._mixers(model))
    # a scan installed by hand is part of the model: a copy keeps it
    mixers = mit._mixers(model)
    for m in mixers:
        m.scan = mit.RRIScan(m.scan, 0.9, 0.8)
    try:
        assert chain(clone(model)) == [["RRIScan", "DefaultScan"]] * len(mixers)
    finally:
        for m in mixers:
            m.scan = m.scan.inner


def test_return_state_goes_through_transforms_and_stateful_scans_return_theirs():
    x, dt, A, B, C = small_inputs()
    flags = []

    class Recording(minimamba.DefaultScan):
        def chunked(self, *args, return_state=True):
            flags.append(return_state)
            return super().chunked(*args, return_state=return_state)

    y, _ = mit.DeltaScaleScan(mit.RRIScan(Recording(), 0.9), 0.5).chunked(x, dt, A, B, C, None, None, 4, return_state=False)
    assert flags and not any(flags), f"return_state seen below the transforms: {flags}"
    for scan in (mit.SlidingWindowScan(Recording(), 3), mit.StateNormScan(Recording(), torch.ones(4), 2)):
        _, state = mit.RRIScan(scan, 0.9).chunked(x, dt, A, B, C, None, None, 4, return_state=False)
        assert isinstance(state, (mit.WindowState, mit.NormState)) and state.h is not None
