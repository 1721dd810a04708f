"""Measure the worst relative errors behind minimamba's "two paths, one answer" claims.

The tests assert tolerances; this script prints the actual worst-case figures over many random
draws, so the README and closing notes can quote them.

    python -m experiments.check_equivalence            # ~1 minute on 2 CPU cores
    python -m experiments.check_equivalence --draws 200

The claims themselves are asserted by tests/test_scan.py (the scans), tests/test_model.py (pieces and
step) and tests/test_checkpoints.py (transformers' logits); this script only measures how far inside
their tolerances the paths agree. It needs transformers (the
test extra: pip install -e ".[test]").

Error measure: max |a - b| / max |b| over a whole output tensor, worst over all draws.
"""

from __future__ import annotations

import argparse
import tempfile

import torch

import minimamba_kernels as kernels
from minimamba import Mamba2Config, Mamba2LM, ssd, ssd_step

from experiments.common import add_flag


def rel(a, b):
    return ((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30)).item()


def random_scan_inputs(gen, dtype):
    def ri(lo, hi):
        return int(torch.randint(lo, hi + 1, (1,), generator=gen))

    b, l, g, p, n = ri(1, 2), ri(1, 300), ri(1, 3), ri(1, 16), ri(1, 32)
    h = g * ri(1, 4)
    x = torch.randn(b, l, h, p, generator=gen, dtype=dtype)
    dt = torch.rand(b, l, h, generator=gen, dtype=dtype) * 0.5
    A = -torch.rand(h, generator=gen, dtype=dtype) * 4
    B, C = (torch.randn(b, l, g, n, generator=gen, dtype=dtype) for _ in range(2))
    S0 = torch.randn(b, h, p, n, generator=gen, dtype=dtype)
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=torch.randn(h, generator=gen, dtype=dtype), initial_state=S0)


def scans(draws):
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        worst = {"ssd": 0.0, "ssd_chunked": 0.0, "ssd_step": 0.0, "chunk-size independence": 0.0}
        for _ in range(draws):
            kw = random_scan_inputs(gen, dtype)
            q = int(torch.randint(1, 65, (1,), generator=gen))
            y0, _ = kernels.ssd_sequential(**kw)
            worst["ssd"] = max(worst["ssd"], rel(ssd(**kw, chunk_size=q)[0], y0))
            worst["ssd_chunked"] = max(worst["ssd_chunked"], rel(kernels.ssd_chunked(**kw, chunk_size=q)[0], y0))
            worst["chunk-size independence"] = max(worst["chunk-size independence"],
                                                   rel(ssd(**kw, chunk_size=q)[0], ssd(**kw, chunk_size=256)[0]))
            state, ys = kw["initial_state"], []
            for t in range(kw["x"].shape[1]):
                y, state = ssd_step(kw["x"][:, t], kw["dt"][:, t], kw["A"], kw["B"][:, t], kw["C"][:, t],
                                    D=kw["D"], state=state)
                ys.append(y)
            worst["ssd_step"] = max(worst["ssd_step"], rel(torch.stack(ys, 1), y0))
        for name, err in worst.items():
            against = "ssd at q=256" if name.startswith("chunk") else "ssd_sequential"
            print(f"  scan {name:<24} vs {against:<15} {str(dtype)[6:]:>8}: worst rel err {err:.2e}")


def model_paths(draws):
    gen = torch.Generator().manual_seed(1)
    torch.manual_seed(0)
    model = Mamba2LM(Mamba2Config(d_model=64, n_layer=3, vocab_size=100, d_state=16, headdim=16,
                                  chunk_size=16, ngroups=2)).eval()
    worst_pieces = worst_step = 0.0
    with torch.no_grad():
        for _ in range(draws // 10 + 1):
            ids = torch.randint(0, 100, (2, 120), generator=gen)
            full, _ = model(ids)
            cut = int(torch.randint(1, 119, (1,), generator=gen))
            a, state = model(ids[:, :cut])
            b, _ = model(ids[:, cut:], state)
            worst_pieces = max(worst_pieces, rel(torch.cat([a, b], 1), full))
            logits, state = model(ids[:, :cut])
            outs = [logits]
            for t in range(cut, 120):
                step_logits, state = model.step(ids[:, t], state)
                outs.append(step_logits[:, None])
            worst_step = max(worst_step, rel(torch.cat(outs, 1), full))
    print(f"  model forward in two pieces vs one forward   float32: worst rel err {worst_pieces:.2e}")
    print(f"  model prefill + step vs forward              float32: worst rel err {worst_step:.2e}")


def transformers_logits():
    import transformers  # here, not at the top: --help and the scan checks need no transformers

    worst = 0.0
    for n_groups in (1, 2):
        torch.manual_seed(0)
        cfg = transformers.Mamba2Config(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_heads=8,
                                        head_dim=16, state_size=16, n_groups=n_groups, chunk_size=16,
                                        tie_word_embeddings=True)
        hf = transformers.Mamba2ForCausalLM(cfg).eval()
        with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
            hf.save_pretrained(tmp)
            ours = Mamba2LM.from_pretrained(tmp).eval()
            ids = torch.randint(0, 96, (2, 200))
            worst = max(worst, rel(ours(ids)[0], hf(ids).logits))
    print(f"  Mamba2LM vs transformers Mamba2ForCausalLM   float32: worst rel err {worst:.2e}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_flag(parser, "draws", int, 50, "random inputs per scan comparison (the model comparisons use draws / 10 + 1)")
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    scans(args.draws)
    model_paths(args.draws)
    transformers_logits()


if __name__ == "__main__":
    main()
