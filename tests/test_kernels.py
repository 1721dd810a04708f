"""minimamba_kernels.py changes nothing but speed: an accelerated model gives the plain model's logits, states and
parameter gradients (with and without a carried state, inside one chunk and across chunks), the
mitigations give the same results with and without it, its conv and quadratic scan pass gradcheck
and agree with nn.functional.conv1d and the recurrence, and accelerate() installs and restores."""

import contextlib
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

import minimamba_kernels as kernels
import mitigations as mit
from minimamba import DefaultScan, Mamba2Config, Mamba2LM, causal_conv_silu

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=8, ngroups=2)


def pair(seed=0, dtype=torch.float64, **overrides):
    torch.manual_seed(seed)
    plain = Mamba2LM(Mamba2Config(**{**TINY, **overrides})).to(dtype)
    return plain, kernels.accelerate(copy.deepcopy(plain))


@pytest.mark.parametrize("pieces, return_state", [((45,), True), ((13, 32), True), ((5,), False), ((8,), False),
                                                  ((30,), False)])
def test_accelerated_model_equals_the_plain_one_logits_and_gradients(pieces, return_state):
    """float64: pieces of a stream with the state carried (ssd_chunked's hand-written backward), and
    plain training pieces that fit one chunk (ssd_quadratic) or not (ssd_chunked without a final state)."""
    ids = torch.randint(0, 50, (3, sum(pieces)), generator=torch.Generator().manual_seed(1))
    plain, fast = pair()
    outs = {}
    for name, m in (("plain", plain), ("fast", fast)):
        state, start, logits = None, 0, []
        for n in pieces:
            out, state = m(ids[:, start:start + n], state, return_state=return_state or n != pieces[-1])
            logits.append(out)
            start += n
        logits = torch.cat(logits, 1)
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=logits.dtype)).sum().backward()
        outs[name] = (logits, state, {k: p.grad for k, p in m.named_parameters()})
    assert max_rel_err(outs["fast"][0], outs["plain"][0]) < 1e-12
    if return_state:
        for a, b in zip(outs["fast"][1].ssm + outs["fast"][1].conv, outs["plain"][1].ssm + outs["plain"][1].conv):
            assert max_rel_err(a, b) < 1e-12
    for k, ref in outs["plain"][2].items():
        err = max_rel_err(outs["fast"][2][k], ref)
        assert err < 1e-10, f"d{k}: accelerated vs plain max rel err {err:.3g}"


def test_accelerated_float32_training_step_matches_and_inference_paths_agree():
    plain, fast = pair(dtype=torch.float32, chunk_size=64)
    ids = torch.randint(0, 50, (4, 64), generator=torch.Generator().manual_seed(2))
    a, _ = plain(ids, return_state=False)
    b, _ = fast(ids, return_state=False)
    assert max_rel_err(b, a) < 1e-5
    with torch.no_grad():
        c, sc = plain(ids)
        d, sd = fast(ids)
        e, _ = fast.step(ids[:, 0], None)
    assert max_rel_err(d, c) < 1e-5 and max_rel_err(sd.ssm[0], sc.ssm[0]) < 1e-5
    assert max_rel_err(e, plain.step(ids[:, 0], None)[0]) < 1e-6


@pytest.mark.parametrize("method", ["rri", "delta", "state_norm", "window"])
def test_mitigations_give_the_same_results_with_and_without_kernels(method):
    plain, fast = pair()
    ids = torch.randint(0, 50, (2, 40), generator=torch.Generator().manual_seed(3))
    blocks = {"rri": lambda m: mit.rri(m, lambda_a=0.95, lambda_B=0.8),
              "delta": lambda m: mit.delta_scaling(m, 0.5),
              "state_norm": lambda m: mit.state_norm(m, torch.full((2, plain.config.nheads), 0.5), every=6),
              "window": lambda m: mit.sliding_window(m, 10)}[method]
    results = {}
    for name, m in (("plain", plain), ("fast", fast)):
        with torch.no_grad(), blocks(m):
            first, state = m(ids[:, :25])
            rest, state = m(ids[:, 25:], state)
            step, _ = m.step(ids[:, 0], state)
        results[name] = (torch.cat([first, rest], 1), step)
    assert max_rel_err(results["fast"][0], results["plain"][0]) < 1e-10
    assert max_rel_err(results["fast"][1], results["plain"][1]) < 1e-10
    assert all(isinstance(b.mixer.scan, kernels.FastScan) for b in fast.backbone.layers), "the block restored it"


@pytest.mark.parametrize("method", [None, "rri", "delta", "state_norm", "window"])
@pytest.mark.parametrize("return_state", [True, False])
def test_long_no_grad_calls_in_pieces_equal_one_call(method, return_state):
    """kernels.forward_in_pieces (an opt-in): a no-grad CPU call longer than a piece runs as pieces of whole chunks
    with the state carried; logits and the final state are those of the plain model in one call, alone
    and inside each mitigation. With autograd the call is not split (the graph is the plain one)."""
    plain, fast = pair()
    kernels.forward_in_pieces(kernels.accelerate(fast), 12)  # pieces of 8 tokens (chunk 8)
    ids = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(4))
    blocks = {None: lambda m: contextlib.nullcontext(),
              "rri": lambda m: mit.rri(m, lambda_a=0.95, lambda_B=0.8),
              "delta": lambda m: mit.delta_scaling(m, 0.5),
              "state_norm": lambda m: mit.state_norm(m, torch.full((2, plain.config.nheads), 0.5), every=6),
              "window": lambda m: mit.sliding_window(m, 10)}[method]
    calls = []
    fast.backbone.layers[0].mixer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[1]))
    results = {}
    for name, m in (("plain", plain), ("fast", fast)):
        with torch.no_grad(), blocks(m):
            logits, state = m(ids, return_state=return_state)
            pieces = list(calls)
            after, _ = m.step(ids[:, 0], state) if return_state else (None, None)
        results[name] = (logits, state, after)
    # it ran in pieces that cover the call: whole chunks (the last may be shorter), none longer than
    # the 12 tokens asked for (or one chunk, if that is shorter)
    q = plain.config.chunk_size
    assert len(pieces) > 1 and sum(pieces) == ids.shape[1], pieces
    assert all(n % q == 0 for n in pieces[:-1]) and max(pieces) <= max(q, 12), pieces
    assert max_rel_err(results["fast"][0], results["plain"][0]) < 1e-10
    if return_state:
        assert results["fast"][1].seqlen == 45
        assert max_rel_err(results["fast"][2], results["plain"][2]) < 1e-10, "the carried state differs"
    else:
        assert results["fast"][1] is None
    calls.clear()
    fast(ids)  # autograd on: one call
    assert calls == [45]
    kernels.restore(fast)
    assert "forward" not in fast.__dict__
    with pytest.raises(ValueError, match="tokens must be a positive int"):
        kernels.forward_in_pieces(fast, 0)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_a_copy_of_an_accelerated_model_runs_its_own_weights_in_pieces(how):
    """The installed forward belongs to its model: a copy (deepcopy, or pickle as torch.save would) whose
    weights then change gives the logits of its own weights on a call long enough to run in pieces."""
    plain, fast = pair()
    kernels.forward_in_pieces(kernels.accelerate(fast), 8)
    twin = copy.deepcopy(fast) if how == "deepcopy" else pickle.loads(pickle.dumps(fast))
    ids = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        for m in (twin, plain):
            m.lm_head.weight.mul_(-2.0)  # tied to the embedding: both change
        assert max_rel_err(twin(ids)[0], plain(ids)[0]) < 1e-10
        assert max_rel_err(fast(ids)[0], twin(ids)[0]) > 0.1, "the copy ran the original's weights"


def test_accelerate_installs_restores_and_refuses_inside_a_mitigation():
    plain, fast = pair()
    assert kernels.is_accelerated(fast) and not kernels.is_accelerated(plain)
    with mit.rri(plain, lambda_a=0.9):
        with pytest.raises(RuntimeError, match="before entering a mitigation"):
            kernels.accelerate(plain)
    kernels.restore(fast)
    assert all(isinstance(b.mixer.scan, DefaultScan) and b.mixer.conv is causal_conv_silu for b in fast.backbone.layers)
    with pytest.raises(TypeError, match="Mamba2LM"):
        kernels.accelerate(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="segment"):
        kernels.CpuTricks(segment=0)
    with pytest.raises(ValueError, match="factored_range"):
        kernels.CpuTricks(factored_range=100.0)


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_both_convs_equal_conv1d_and_pass_gradcheck(b, l, c, k, bias, seed):
    """minimamba.causal_conv_silu (autograd) and kernels.CausalConvSilu (hand-written backward) against
    nn.functional.conv1d on [past | x] in the (b, c, l) layout; gradients by finite differences."""
    gen = torch.Generator().manual_seed(seed)
    dd = torch.float64
    x, past = torch.randn(b, l, c, generator=gen, dtype=dd), torch.randn(b, k - 1, c, generator=gen, dtype=dd)
    w, bi = torch.randn(k, c, generator=gen, dtype=dd), torch.randn(c, generator=gen, dtype=dd) if bias else None
    args = tuple(t.requires_grad_(True) if t is not None else None for t in (x, past, w, bi))
    ref = F.silu(F.conv1d(torch.cat([past, x], 1).transpose(1, 2), w.T[:, None], bi, groups=c)).transpose(1, 2)
    for fn in (causal_conv_silu, kernels.CausalConvSilu.apply):
        out = fn(*args)
        assert max_rel_err(out, ref) < 1e-12, f"{fn}: conv vs conv1d max rel err {max_rel_err(out, ref):.3g}"
        assert torch.autograd.gradcheck(fn, args)


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 2), st.integers(1, 20), st.integers(1, 2), st.integers(1, 3), st.integers(1, 3),
       st.integers(1, 4), st.booleans(), st.booleans(), st.sampled_from([None, 0.5, 60.0]), st.integers(0, 2**31 - 1))
def test_quadratic_form_equals_the_recurrence_and_passes_gradcheck(b, l, g, r, p, n, per_token_A, with_D, rng, seed):
    """ssd_quadratic from a zero state: per-head blocks (None), the factored form (60 nats) and a range
    so small that most inputs fall back to the blocks (0.5)."""
    gen = torch.Generator().manual_seed(seed)
    h, dd = g * r, torch.float64
    args = [torch.randn(b, l, h, p, generator=gen, dtype=dd), torch.rand(b, l, h, generator=gen, dtype=dd) * 0.5 + 0.05,
            -torch.rand(*((b, l, h) if per_token_A else (h,)), generator=gen, dtype=dd) * 3,
            torch.randn(b, l, g, n, generator=gen, dtype=dd), torch.randn(b, l, g, n, generator=gen, dtype=dd),
            torch.randn(h, generator=gen, dtype=dd) if with_D else None]
    args = [a.requires_grad_(True) if a is not None else None for a in args]

    def fn(x, dt, A, B, C, D):
        return kernels.ssd_quadratic(x, dt, A, B, C, D=D, factored_range=rng)

    y0, _ = kernels.ssd_sequential(*args[:5], D=args[5])
    assert max_rel_err(fn(*args), y0) < 1e-12
    assert torch.autograd.gradcheck(fn, args)
