"""GPU readiness (marker `gpu`, skipped without CUDA; run with `python -m pytest -m gpu` or through
`python -m experiments.gpu_check`): the compiled chunked scan against the float64 oracle in fp32 and
bf16, one compiled graph for the lengths of a bucket, the whole model equal with and without
kernels.accelerate on CUDA, and bf16-autocast training steps that stay finite."""

import copy

import pytest
import torch
from conftest import max_rel_err

import minimamba_kernels as kernels
from minimamba import Mamba2Config, Mamba2LM

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

# Error bounds against the float64 oracle, relative to max |oracle|: fp32 with TF32 matmuls off differs
# from float64 by rounding only; bf16 inputs carry 8 mantissa bits (rel. 4e-3 each), the scan sums ~q terms.
TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


def scan_inputs(l, dtype, h=8, p=16, g=1, n=32, seed=0):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(2, l, h, p, device="cuda", generator=gen)
    dt = torch.rand(2, l, h, device="cuda", generator=gen) * 0.1 + 1e-3
    A = -torch.rand(h, device="cuda", generator=gen) * 8 - 0.5
    B, C = (torch.randn(2, l, g, n, device="cuda", generator=gen) for _ in range(2))
    S0 = torch.randn(2, h, p, n, device="cuda", generator=gen)
    return dict(x=x.to(dtype), dt=dt, A=A, B=B.to(dtype), C=C.to(dtype), D=torch.ones(h, device="cuda"),
                initial_state=S0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_compiled_chunked_scan_equals_the_float64_oracle(dtype):
    torch.backends.cuda.matmul.allow_tf32 = False
    kw = scan_inputs(300, dtype)
    exact = kernels.ssd_chunked(**{k: v.double() for k, v in kw.items()}, chunk_size=64)
    y, s = kernels.ssd_chunked_compiled(**kw, chunk_size=64)
    assert y.dtype == dtype
    ey, es = max_rel_err(y, exact[0]), max_rel_err(s, exact[1])
    assert ey < TOL[dtype] and es < TOL[dtype], f"{dtype}: y err {ey:.3g}, state err {es:.3g}"


def test_one_compiled_graph_serves_the_lengths_of_a_bucket():
    import torch._dynamo

    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    fn = torch.compile(kernels.ssd_chunked, fullgraph=True, dynamic=True)
    for l in (330, 400, 450, 511):  # 6..8 chunks of 64: one power-of-two bucket
        fn(**scan_inputs(l, torch.float32), chunk_size=64)
    assert counters["stats"]["unique_graphs"] <= 1, dict(counters["stats"])


def test_the_accelerated_model_equals_the_plain_one_on_cuda():
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.manual_seed(0)
    plain = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=32, headdim=16, chunk_size=64)).cuda()
    fast = kernels.accelerate(copy.deepcopy(plain))  # compiled on CUDA
    assert kernels.is_accelerated(fast) and fast.backbone.layers[0].mixer.scan.compiled
    ids = torch.randint(0, 256, (2, 300), device="cuda")
    a, sa = plain(ids)
    b, sb = fast(ids)
    assert max_rel_err(b, a) < 1e-4 and max_rel_err(sb.ssm[-1], sa.ssm[-1]) < 1e-4
    a.square().mean().backward()
    b.square().mean().backward()
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert max_rel_err(q.grad, p.grad) < 1e-3, name


@pytest.mark.parametrize("accelerated", [False, True])
def test_bf16_autocast_training_steps_stay_finite(accelerated):
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=64, n_layer=2, vocab_size=256, d_state=32, headdim=16, chunk_size=64)).cuda()
    if accelerated:
        kernels.accelerate(model)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (8, 129), device="cuda")
    losses = []
    for _ in range(5):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits, _ = model(ids[:, :-1], return_state=False)
        loss = torch.nn.functional.cross_entropy(logits[..., :256].float().reshape(-1, 256), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
