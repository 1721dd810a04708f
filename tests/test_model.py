"""Mamba2LM: streaming with the carried state, step decoding, causality, every scan gives the same
model, the official initialization, generation arguments, and errors for bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_err
from hypothesis import given, settings
from hypothesis import strategies as st

from minimamba import Mamba2Config, Mamba2LM, Mamba2State, sample

TINY = dict(d_model=32, n_layer=2, vocab_size=50, d_state=8, headdim=8, chunk_size=8, ngroups=2)


def tiny_model(seed=0, **overrides):
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(**{**TINY, **overrides})).eval()


@pytest.fixture(scope="module")
def model():
    return tiny_model()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, 50, (3, 45), generator=torch.Generator().manual_seed(1))


def test_shapes_and_vocab_padding(model, ids):
    logits, state = model(ids)
    assert logits.shape == (3, 45, 64) and logits.dtype == torch.float32  # 50 padded to 64
    cfg = model.config
    assert len(state.conv) == len(state.ssm) == cfg.n_layer and state.seqlen == 45
    assert state.conv[0].shape == (3, cfg.conv_dim, cfg.d_conv)
    assert state.ssm[0].shape == (3, cfg.nheads, cfg.headdim, cfg.d_state) and state.ssm[0].dtype == torch.float32


@settings(max_examples=15, deadline=None)
@given(st.lists(st.integers(1, 20), min_size=1, max_size=5))
def test_forward_in_pieces_equals_one_forward(model, ids, piece_lengths):
    full, _ = model(ids)
    state, outs, start = None, [], 0
    for n in piece_lengths:
        if start >= ids.shape[1]:
            break
        logits, state = model(ids[:, start:start + n], state)
        outs.append(logits)
        start += n
    pieces = torch.cat(outs, 1)
    err = max_rel_err(pieces, full[:, :start])
    assert err < 1e-4, f"pieces vs one call: max rel err {err:.3g}"


@pytest.mark.parametrize("segment", [8, 16, 20])
def test_segmented_inference_equals_one_call(model, ids, segment, monkeypatch):
    """forward() without autograd splits long inputs into segments (minimamba.INFERENCE_SEGMENT, rounded
    down to whole chunks of 8 here) with the state carried: same logits and state as one call, bit for
    bit; with autograd it makes one call."""
    import minimamba
    reference, ref_state = model(ids)  # autograd on: one call
    monkeypatch.setattr(minimamba, "INFERENCE_SEGMENT", segment)
    with torch.no_grad():
        logits, state = model(ids)
    assert torch.equal(logits, reference.detach()), f"max abs diff {(logits - reference).abs().max().item():.3g}"
    assert all(torch.equal(a, b) for a, b in zip(state.ssm + state.conv, ref_state.ssm + ref_state.conv))
    assert state.seqlen == ref_state.seqlen == ids.shape[1]


def test_prefill_then_steps_equals_forward(model, ids):
    full, _ = model(ids)
    logits, state = model(ids[:, :17])
    steps = [logits]
    for t in range(17, ids.shape[1]):
        step_logits, state = model.step(ids[:, t], state)
        steps.append(step_logits[:, None])
    err = max_rel_err(torch.cat(steps, 1), full)
    assert err < 1e-4, f"prefill + step vs forward: max rel err {err:.3g}"
    assert state.seqlen == ids.shape[1]


def test_steps_from_scratch_equal_forward(model, ids):
    full, _ = model(ids[:, :12])
    state, outs = None, []
    for t in range(12):
        logits, state = model.step(ids[:, t], state)
        outs.append(logits)
    assert max_rel_err(torch.stack(outs, 1), full) < 1e-4


def test_causality(model, ids):
    logits, _ = model(ids)
    changed = ids.clone()
    changed[:, 30] = (changed[:, 30] + 1) % 50
    logits2, _ = model(changed)
    assert torch.equal(logits[:, :30], logits2[:, :30]), "a later token changed earlier logits"
    assert not torch.allclose(logits[:, 30:], logits2[:, 30:])


@pytest.mark.parametrize("scan", ["chunked", "sequential"])
def test_every_scan_gives_the_same_model(model, ids, scan):
    reference, ref_state = model(ids)
    other = tiny_model(scan=scan)
    other.load_state_dict(model.state_dict())
    logits, state = other(ids)
    assert max_rel_err(logits, reference) < 1e-5
    assert max_rel_err(state.ssm[-1], ref_state.ssm[-1]) < 1e-5


def test_float64_model_matches_float32(ids):
    m32 = tiny_model()
    m64 = tiny_model().double()
    assert max_rel_err(m32(ids)[0], m64(ids)[0]) < 1e-4


def test_gradients_flow_through_the_carried_state(model, ids):
    m = tiny_model()
    m.train()
    _, state = m(ids[:, :20])
    logits, _ = m(ids[:, 20:], state)
    logits.sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in m.parameters())
    detached = state.detach()
    assert not detached.ssm[0].requires_grad and not detached.conv[0].requires_grad


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 9), st.integers(1, 3), st.integers(1, 4), st.booleans(), st.integers(0, 2**31 - 1))
def test_causal_conv_equals_conv1d_and_its_backward_passes_gradcheck(b, l, c, k, bias, seed):
    """The mixer's conv (minimamba._CausalConvSilu, a hand-written backward) against nn.functional.conv1d
    on [past | x] in the (b, c, l) layout, and its gradients by finite differences (float64)."""
    from minimamba import _CausalConvSilu
    gen = torch.Generator().manual_seed(seed)
    dd = torch.float64
    x, past = torch.randn(b, l, c, generator=gen, dtype=dd), torch.randn(b, k - 1, c, generator=gen, dtype=dd)
    w, bi = torch.randn(c, k, generator=gen, dtype=dd), torch.randn(c, generator=gen, dtype=dd) if bias else None
    args = tuple(t.requires_grad_(True) if t is not None else None for t in (x, past, w, bi))
    ref = F.silu(F.conv1d(torch.cat([past, x], 1).transpose(1, 2), w[:, None], bi, groups=c)).transpose(1, 2)
    out = _CausalConvSilu.apply(*args)
    assert max_rel_err(out, ref) < 1e-12, f"conv vs conv1d: max rel err {max_rel_err(out, ref):.3g}"
    assert torch.autograd.gradcheck(_CausalConvSilu.apply, args)


def test_model_gradients_equal_with_every_scan():
    """float64 parameter gradients of the whole model: scan="chunked" (hand-written backward) against
    scan="ssd" (autograd through the reference scan), with a carried state in between."""
    ids = torch.randint(0, 50, (2, 37), generator=torch.Generator().manual_seed(2))
    grads = {}
    for scan in ("ssd", "chunked"):
        m = tiny_model(scan=scan).double().train()
        _, state = m(ids[:, :13])
        logits, _ = m(ids[:, 13:], state)
        (logits * torch.linspace(-1, 1, logits.shape[-1], dtype=torch.float64)).sum().backward()
        grads[scan] = {k: p.grad for k, p in m.named_parameters()}
    for k, ref in grads["ssd"].items():
        err = max_rel_err(grads["chunked"][k], ref)
        # 1e-5, not float64's 1e-12: the gated norm and the residual run in float32 (.float()) even in
        # a float64 model; a wrong gradient is off by O(1)
        assert err < 1e-5, f"d{k}: chunked vs ssd max rel err {err:.3g}"


def test_official_initialization():
    cfg = Mamba2Config(d_model=64, n_layer=4, vocab_size=100, d_state=16, headdim=16)
    torch.manual_seed(0)
    m = Mamba2LM(cfg)
    names = set(m.state_dict())
    for i in range(cfg.n_layer):
        for key in ("norm.weight", "mixer.in_proj.weight", "mixer.conv1d.weight", "mixer.conv1d.bias",
                    "mixer.dt_bias", "mixer.A_log", "mixer.D", "mixer.norm.weight", "mixer.out_proj.weight"):
            assert f"backbone.layers.{i}.{key}" in names
    assert {"backbone.embedding.weight", "backbone.norm_f.weight", "lm_head.weight"} <= names
    assert m.lm_head.weight is m.backbone.embedding.weight  # tied
    mixer = m.backbone.layers[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_bias)
    assert (dt >= cfg.dt_min * 0.999).all() and (dt <= cfg.dt_max * 1.001).all()
    A = torch.exp(mixer.A_log)
    assert (A >= 1).all() and (A <= 16).all() and A.std() > 0
    assert torch.equal(mixer.D, torch.ones(cfg.nheads))
    assert abs(m.backbone.embedding.weight.std().item() - 0.02) < 0.002
    # out_proj: kaiming-uniform bound 1/sqrt(fan_in) (a = sqrt(5)), divided by sqrt(n_layer)
    bound = 1 / math.sqrt(cfg.d_inner) / math.sqrt(cfg.n_layer)
    w = mixer.out_proj.weight
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert all(getattr(p, "_no_weight_decay", False) for p in (mixer.dt_bias, mixer.A_log, mixer.D))


def test_generate_greedy_equals_argmax_loop(model, ids):
    prompt = ids[:2, :6]
    out = model.generate(prompt, 8, temperature=0)
    assert out.shape == (2, 14) and torch.equal(out[:, :6], prompt)
    seq = prompt
    for _ in range(8):
        logits, _ = model(seq)
        seq = torch.cat([seq, logits[:, -1, :50].argmax(-1, keepdim=True)], 1)
    assert torch.equal(out, seq)
    assert torch.equal(model.generate(prompt, 8, top_k=1), out)  # top_k=1 is greedy
    assert torch.equal(model.generate(prompt, 8, top_p=1e-6), out)  # a tiny nucleus is greedy
    assert model.generate(prompt, 0).shape == prompt.shape


def test_sampling_arguments_do_what_they_say():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert set(sample(logits, 1.0, top_k=2, generator=g).tolist()) == {0, 1}
    p = torch.softmax(logits[0], -1)  # 0.64, 0.24, 0.09, ...: nucleus 0.8 keeps {0, 1}, 0.9 keeps {0, 1, 2}
    assert set(sample(logits, 1.0, top_p=0.8, generator=g).tolist()) == {0, 1}
    assert set(sample(logits, 1.0, top_p=0.9, generator=g).tolist()) == {0, 1, 2}
    draws = sample(logits, 1.0, generator=g)
    freq0 = (draws == 0).float().mean().item()
    assert abs(freq0 - p[0].item()) < 0.05
    hot = (sample(logits, 100.0, generator=g) == 0).float().mean().item()  # high temperature: flatter
    assert hot < freq0 - 0.2
    a = sample(logits[:5], 1.0, generator=torch.Generator().manual_seed(3))
    b = sample(logits[:5], 1.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_generate_never_emits_padding_ids(model):
    torch.manual_seed(0)
    out = model.generate(torch.zeros(4, 1, dtype=torch.long), 30, temperature=5.0)
    assert out.max() < 50


@pytest.mark.parametrize("bad, error, match", [
    (torch.tensor([[0, 50]]), ValueError, r"\[0, 50\)"),
    (torch.tensor([[-1, 2]]), ValueError, r"\[0, 50\)"),
    (torch.tensor([1, 2, 3]), ValueError, r"\(b, l\)"),
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "empty"),
    (torch.zeros(1, 3), TypeError, "integer"),
    ([[1, 2]], TypeError, "LongTensor"),
])
def test_bad_input_ids_get_clear_errors(model, bad, error, match):
    with pytest.raises(error, match=match):
        model(bad)


def test_bad_state_and_generate_arguments(model, ids):
    _, state = model(ids[:2])
    with pytest.raises(ValueError, match="batch size 2"):
        model(ids, state)
    with pytest.raises(TypeError, match="Mamba2State"):
        model(ids, (1, 2))
    with pytest.raises(ValueError, match="layers"):
        model(ids, Mamba2State([None], [None]))
    with pytest.raises(ValueError, match=r"\(b,\)"):
        model.step(ids[:, :2], None)
    for kwargs, match in [({"temperature": -1}, "temperature"), ({"top_k": 0}, "top_k"),
                          ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=match):
            model.generate(ids[:, :3], 2, **kwargs)
    with pytest.raises(ValueError, match="max_new_tokens"):
        model.generate(ids[:, :3], -1)


@pytest.mark.parametrize("kwargs, match", [
    (dict(d_model=30, headdim=8), "headdim"),
    (dict(ngroups=3), "ngroups"),
    (dict(d_state=0), "d_state"),
    (dict(dt_min=0.5, dt_max=0.1), "dt_min"),
    (dict(scan="triton"), "scan"),
    (dict(A_init_range=(0, 16)), "A_init_range"),
    (dict(chunk_size=2.5), "chunk_size"),
])
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**{**TINY, **kwargs})


def test_minimamba_py_works_copied_alone(tmp_path):
    """The README's promise: copy minimamba.py alone and it works (no kernels.py beside it)."""
    import os
    import shutil
    import subprocess
    import sys

    import minimamba

    shutil.copy(minimamba.__file__, tmp_path / "minimamba.py")
    # an installed project (pip install -e .) could still serve kernels.py: block it, as if absent
    code = ("import sys, os, torch\n"
            "sys.modules['kernels'] = None\n"
            "import minimamba\n"
            "assert os.path.dirname(os.path.abspath(minimamba.__file__)) == os.getcwd(), minimamba.__file__\n"
            "assert minimamba._kernels() is None\n"
            "m = minimamba.Mamba2LM(minimamba.Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8,"
            " headdim=8, chunk_size=8))\n"
            "logits, state = m(torch.randint(0, 50, (1, 20)))\n"
            "print(tuple(logits.shape), m.generate(torch.zeros(1, 2, dtype=torch.long), 3).shape[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "20,", "64)", "5"]
