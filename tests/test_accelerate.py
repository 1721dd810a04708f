"""What kernels.accelerate(model) does and does not do: it installs the fast scan and conv and nothing
else (no process-wide setting, model.forward untouched), it refuses arguments of the wrong type, and
its compiled scan never crashes when a run meets more input variants than torch compiles per function."""
import ctypes
import warnings

import pytest
import torch
import torch._dynamo

import minimamba_kernels as kernels
from minimamba import Mamba2Config, Mamba2LM


def tiny_model(seed: int = 0) -> Mamba2LM:
    torch.manual_seed(seed)
    return Mamba2LM(Mamba2Config(d_model=16, n_layer=1, vocab_size=32, d_state=4, headdim=8, chunk_size=4))


def test_accelerate_changes_nothing_process_wide_and_leaves_forward_alone(monkeypatch):
    """No ctypes call into libc (the allocator setting is the explicit opt-in keep_freed_memory), and no
    instance attribute `forward` (the pieces are the explicit opt-in forward_in_pieces)."""
    loaded = []
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: loaded.append(name) or real_cdll(name, *a, **k))
    model = kernels.accelerate(tiny_model())
    assert loaded == [], f"accelerate() loaded {loaded} (a process-wide setting)"
    assert "forward" not in model.__dict__
    assert kernels.is_accelerated(model)
    kernels.forward_in_pieces(model, 8)
    assert isinstance(model.__dict__["forward"], kernels.ForwardInPieces)
    kernels.forward_in_pieces(model, None)
    assert "forward" not in model.__dict__


@pytest.mark.parametrize("kwargs, match", [
    (dict(compiled="false"), "compiled must be True, False or None"),
    (dict(compiled=1), "compiled must be True, False or None"),
    (dict(cpu_tricks="fast"), "cpu_tricks must be a kernels.CpuTricks or None"),
    (dict(cpu_tricks=dict(segment=8)), "cpu_tricks must be a kernels.CpuTricks or None"),
])
def test_accelerate_refuses_arguments_of_the_wrong_type(kwargs, match):
    with pytest.raises(TypeError, match=match):
        kernels.accelerate(tiny_model(), **kwargs)


def test_cpu_tricks_and_pieces_refuse_bad_values():
    with pytest.raises(TypeError, match="factored_backward"):
        kernels.CpuTricks(factored_backward="no")
    for bad in (0, -3, 2.5, True, "64"):
        with pytest.raises(ValueError, match="tokens must be a positive int"):
            kernels.forward_in_pieces(tiny_model(), bad)


def _variants(model):
    """Input variants that each need their own compiled graph: length buckets x grad mode x state."""
    gen = torch.Generator().manual_seed(1)
    ids = {l: torch.randint(0, 32, (1, l), generator=gen) for l in (3, 9, 20)}
    with torch.no_grad():
        yield "l=3, no grad", model(ids[3])[0]
        yield "l=9, no grad", model(ids[9])[0]
        _, state = model(ids[3])
        yield "l=20, no grad, with a state", model(ids[20], state)[0]
    logits, _ = model(ids[20])
    logits.sum().backward()
    yield "l=20, grad", logits.detach()


def test_the_compiled_scan_survives_more_variants_than_the_recompile_limit():
    """CPU inductor, with the limit lowered to 2 graphs so that the test stays fast: four variants; past the
    limit, calls run the eager scan with one RuntimeWarning, and every output equals the plain model's."""
    torch._dynamo.reset()
    plain, fast = tiny_model(), kernels.accelerate(tiny_model(), compiled=True)
    assert fast.backbone.layers[0].mixer.scan.compiled
    kernels._warned_eager = False
    with torch._dynamo.config.patch(recompile_limit=2), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        outputs = list(_variants(fast))
    expected = list(_variants(plain))
    for (name, got), (_, want) in zip(outputs, expected):
        err = (got - want).abs().max().item()
        assert err < 1e-4, f"{name}: compiled/eager vs plain max abs diff {err:.3g}"
    recompile_warnings = [w for w in caught if "recompile limit" in str(w.message)]
    assert len(recompile_warnings) == 1, [str(w.message) for w in caught]
    torch._dynamo.reset()


@pytest.mark.slow
def test_the_compiled_scan_survives_torch_default_limit():
    """The real case, at torch's own limit (8): 5 lengths x float32/bfloat16 x with/without a state."""
    torch._dynamo.reset()
    kernels._warned_eager = False
    gen = torch.Generator().manual_seed(2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for dtype in (torch.float32, torch.bfloat16):
            for l in (3, 9, 20, 40, 70):
                for with_state in (False, True):
                    x = torch.randn(1, l, 2, 4, generator=gen).to(dtype)
                    dt = torch.rand(1, l, 2, generator=gen) * 0.5 + 0.1
                    A = -torch.rand(2, generator=gen)
                    B, C = (torch.randn(1, l, 1, 4, generator=gen).to(dtype) for _ in range(2))
                    s0 = torch.randn(1, 2, 4, 4, generator=gen) if with_state else None
                    y, _ = kernels.ssd_chunked_compiled(x, dt, A, B, C, chunk_size=4, initial_state=s0)
                    y0, _ = kernels.ssd_sequential(x.double(), dt.double(), A.double(), B.double(), C.double(),
                                                   initial_state=None if s0 is None else s0.double())
                    tol = 5e-2 if dtype == torch.bfloat16 else 1e-4
                    assert (y.double() - y0).abs().max().item() < tol * max(1.0, y0.abs().max().item())
    assert sum("recompile limit" in str(w.message) for w in caught) == 1
    torch._dynamo.reset()
