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


class OracleScan:
    """The recurrence one token at a time (kernels.ssd_sequential) as a mixer's scan."""

    def chunked(self, x, dt, A, B, C, D, state, chunk_size, return_state=True):
        import minimamba_kernels as kernels
        return kernels.ssd_sequential(x, dt, A, B, C, D=D, initial_state=state)

    def step(self, x, dt, A, B, C, D, state):
        raise AssertionError("not used")


def test_the_chunked_model_equals_the_recurrence(model, ids):
    """The whole model through minimamba.ssd (the default) against the same weights through the
    token-by-token recurrence, plugged into mixer.scan."""
    reference, ref_state = model(ids)
    other = tiny_model()
    other.load_state_dict(model.state_dict())
    for block in other.backbone.layers:
        block.mixer.scan = OracleScan()
    logits, state = other(ids)
    assert max_rel_err(reference, logits) < 1e-5
    assert max_rel_err(ref_state.ssm[-1], state.ssm[-1]) < 1e-5


def test_return_state_false_builds_no_state_and_changes_nothing(model, ids):
    for n in (5, 8, 45):  # inside one chunk (the quadratic form alone) and across chunks
        with_state, _ = model(ids[:, :n])
        logits, state = model(ids[:, :n], return_state=False)
        assert state is None and max_rel_err(logits, with_state) < 1e-6


def test_float64_model_matches_float32(ids):
    m32 = tiny_model()
    m64 = tiny_model().double()
    assert max_rel_err(m32(ids)[0], m64(ids)[0]) < 1e-4


def test_gradients_flow_through_the_carried_state(ids):
    """Training on a sequence in two pieces with the state carried (not detached) gives the gradients
    of one call over the whole sequence: the second piece's loss reaches the weights through the
    state too. (With a detached state the gradients differ: checked below, so this test can fail.)"""
    m = tiny_model()
    full, _ = m(ids)
    want = torch.autograd.grad(full[:, 20:].square().mean(), list(m.parameters()))
    _, state = m(ids[:, :20])
    logits, _ = m(ids[:, 20:], state)
    got = torch.autograd.grad(logits.square().mean(), list(m.parameters()))
    err = max(max_rel_err(g, w) for g, w in zip(got, want))
    assert err < 1e-4, f"carried-state gradients vs one call: max rel err {err:.3g}"
    _, state = m(ids[:, :20])
    logits, _ = m(ids[:, 20:], state.detach())
    cut = torch.autograd.grad(logits.square().mean(), list(m.parameters()))
    assert max(max_rel_err(c, w) for c, w in zip(cut, want)) > 1e-2, "the state carries no gradient here"
    detached = state.detach()
    assert not detached.ssm[0].requires_grad and not detached.conv[0].requires_grad


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
    (torch.zeros(2, 0, dtype=torch.long), ValueError, "at least one token"),
    (torch.zeros(1, 3), TypeError, "integer"),
    ([[1, 2]], TypeError, "integer token ids"),
    (torch.zeros(1, 3, dtype=torch.long, device="meta"), ValueError, r"model's device \(cpu\); got \(1, 3\) on meta"),
])
def test_bad_input_ids_get_clear_errors(model, bad, error, match):
    with pytest.raises(error, match=match):
        model(bad)


def test_bad_state_and_generate_arguments(model, ids):
    _, state = model(ids[:2])
    with pytest.raises(ValueError, match=r"conv part is \(2, "):
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
    (dict(A_init_range=(0, 16)), "A_init_range"),
    (dict(chunk_size=2.5), "chunk_size"),
])
def test_invalid_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Mamba2Config(**{**TINY, **kwargs})


def test_minimamba_py_works_copied_alone(tmp_path):
    """The README's promise: copy minimamba.py alone and it builds, runs, streams, steps and loads both
    checkpoint layouts (written here by checkpoints.py), with no sibling module importable."""
    import ast
    import os
    import shutil
    import subprocess
    import sys

    import minimamba
    from checkpoints import save_pretrained

    tree = ast.parse(open(minimamba.__file__).read())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= set(sys.stdlib_module_names) | {"torch", "__future__"}, imported
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=32, n_layer=1, vocab_size=50, d_state=8, headdim=8, chunk_size=8)).eval()
    ids = torch.randint(0, 50, (1, 20))
    save_pretrained(model, tmp_path / "hf", layout="hf")
    save_pretrained(model, tmp_path / "ss", layout="mamba_ssm")
    torch.save({"ids": ids, "logits": model(ids)[0].detach()}, tmp_path / "expected.pt")
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(minimamba.__file__, alone / "minimamba.py")
    code = ("import sys, os, torch\n"
            "for name in ('minimamba_kernels', 'checkpoints', 'mitigations', 'forgetting_curve'):\n"
            "    sys.modules[name] = None  # an installed project could still serve them: as if absent\n"
            "import minimamba\n"
            "assert os.path.dirname(os.path.abspath(minimamba.__file__)) == os.getcwd(), minimamba.__file__\n"
            "e = torch.load('../expected.pt', weights_only=True)\n"
            "for layout in ('hf', 'ss'):\n"
            "    m = minimamba.Mamba2LM.from_pretrained('../' + layout).eval()\n"
            "    logits, state = m(e['ids'])\n"
            "    assert torch.equal(logits, e['logits']), layout\n"
            "    first, s = m(e['ids'][:, :7])\n"
            "    rest, s = m(e['ids'][:, 7:], s)\n"
            "    assert torch.allclose(torch.cat([first, rest], 1), logits, atol=1e-5)\n"
            "    one, _ = m.step(e['ids'][:, -1], m(e['ids'][:, :-1])[1])\n"
            "    assert torch.allclose(one, logits[:, -1], atol=1e-5)\n"
            "print(tuple(logits.shape), m.generate(torch.zeros(1, 2, dtype=torch.long), 3).shape[1])\n")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=alone, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(1,", "20,", "64)", "5"]
