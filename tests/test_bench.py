"""experiments/bench.py: the flop count matches what ssd_chunked actually computes (torch's
FlopCounterMode), the target summary computes ratios from the rows and flags misses, the table
prints failures, and one real worker subprocess measures time and peak memory."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

import minimamba_kernels as kernels
from experiments import bench


@settings(max_examples=15, deadline=None)
@given(st.integers(1, 2), st.integers(1, 70), st.integers(1, 3), st.integers(1, 3), st.integers(1, 5),
       st.integers(1, 6), st.integers(1, 16))
def test_scan_flops_matches_flop_counter(b, l, g, r, p, n, q):
    h = g * r
    x, dt, A = torch.randn(b, l, h, p), torch.rand(b, l, h), -torch.rand(h)
    B, C = torch.randn(b, l, g, n), torch.randn(b, l, g, n)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        kernels.ssd_chunked(x, dt, A, B, C, chunk_size=q)
    counted = counter.get_total_flops()
    expected = bench.scan_flops(b, l, h, p, n, g, q)
    assert counted == expected, f"FlopCounterMode {counted} != scan_flops {expected} (b={b} l={l} h={h} q={q})"


def _row(kind, impl, mode, l, seconds, peak_mb=100.0, **kw):
    return dict(kind=kind, impl=impl, mode=mode, l=l, seconds=seconds, peak_mb=peak_mb, ok=True,
                tokens_per_s=l / seconds, **kw)


def test_summary_ratios_and_misses():
    rows = [
        dict(kind="matmul", ok=True, seconds=1.0, flop_per_s=100e9, peak_mb=1.0),
        _row("scan", "chunked", "fwd", 4096, 0.1, flops=4e9, flop_per_s=40e9),
        _row("scan", "chunked", "fwd", 16384, 0.5, flops=16e9, flop_per_s=32e9),
        _row("model", "accelerated", "fwd", 4096, 1.0, peak_mb=100.0),
        _row("model", "transformers", "fwd", 4096, 4.0, peak_mb=150.0),
        _row("model", "accelerated", "fwd", 16384, 5.0),
        dict(kind="decode", impl="accelerated", context=128, ms_per_token=2.0, ok=True),
        dict(kind="decode", impl="accelerated", context=4096, ms_per_token=2.2, ok=True),
        dict(kind="toy_train", impl="accelerated", t_train=16, headdim=16, seconds=0.02, ok=True),
        dict(kind="toy_train", impl="minimamba", t_train=16, headdim=16, seconds=0.03, ok=True),
        dict(kind="toy_train", impl="transformers", t_train=16, headdim=16, seconds=0.09, ok=True),
        dict(kind="toy_train", impl="accelerated", t_train=16, shape={"headdim": 32}, seconds=0.03, ok=True),
        dict(kind="toy_train", impl="transformers", t_train=16, shape={"headdim": 32}, seconds=0.09, ok=True),
    ]
    s = {t["target"]: t for t in bench.summarize(rows)}
    frac = s["ssd_chunked FLOP/s / matmul FLOP/s (l=4096)"]
    assert frac["value"] == pytest.approx(0.4) and frac["met"] is True
    fwd = s["Mamba2LM accelerated fwd speed-up vs transformers (l=4096)"]
    assert fwd["value"] == pytest.approx(4.0) and fwd["met"] is True
    mem = s["Mamba2LM accelerated fwd peak memory / transformers' (l=4096)"]
    assert mem["value"] == pytest.approx(100 / 150) and mem["met"] is False
    assert s["Mamba2LM accelerated fwdbwd speed-up vs transformers (l=4096)"]["met"] is None  # not measured
    toy = s["toy training (accelerated) tokens/s vs transformers (T_train=16, headdim 16)"]
    assert toy["value"] == pytest.approx(4.5) and toy["met"] is True
    assert s["toy training (minimamba) tokens/s vs transformers (T_train=16, headdim 16)"]["met"] is False
    toy32 = s["toy training (accelerated) tokens/s vs transformers (T_train=16, headdim 32)"]  # headdim in shape only
    assert toy32["value"] == pytest.approx(3.0) and toy32["met"] is False
    assert s["toy training (minimamba) tokens/s vs transformers (T_train=16, headdim 32)"]["met"] is None
    assert s["scan chunked time(16384) / time(4096)"]["value"] == pytest.approx(5.0)
    assert s["scan chunked time(16384) / time(4096)"]["met"] is False
    assert s["decode accelerated: ms/token at ctx 4096 / at ctx 128"]["value"] == pytest.approx(1.1)
    text = bench.format_summary(bench.summarize(rows))
    assert "NOT MET" in text and "not measured" in text


def test_table_shows_failures_and_values():
    rows = [_row("model", "transformers", "fwd", 4096, 2.0),
            dict(kind="scan", impl="compiled", mode="fwd", l=1024, ok=False, error="RuntimeError: boom")]
    text = bench.format_table(rows)
    assert "FAILED" in text and "boom" in text and "2000.0ms" in text


def test_decode_worker_gives_one_row_per_context():
    spec = {"seed": 0, "kind": "decode", "impl": "accelerated", "contexts": [8, 40], "tokens": 2, "rounds": 1,
            "shape": {"d_model": 32, "n_layer": 1, "d_state": 8, "headdim": 8, "chunk_size": 16, "vocab_size": 64}}
    rows = bench.measure_decode(spec)
    assert [r["context"] for r in rows] == [8, 40] and all(r["ms_per_token"] > 0 for r in rows)


@pytest.mark.transformers
def test_toy_training_worker_times_every_impl_on_the_same_weights():
    spec = {"seed": 0, "t_train": 8, "impls": list(bench.TOY_IMPLS), "rounds": 2,
            "shape": {"d_model": 16, "n_layer": 1, "d_state": 8, "headdim": 8, "vocab_size": 256, "tokens_per_step": 32}}
    rows = bench.measure_toy_train(spec)
    assert [r["impl"] for r in rows] == list(bench.TOY_IMPLS)
    assert all(r["seconds"] > 0 and len(r["all_seconds"]) == 2 and r["tokens_per_s"] > 0 for r in rows)


def test_worker_measures_time_and_memory_in_a_subprocess():
    spec = {"seed": 0, "kind": "scan", "impl": "chunked", "mode": "fwd", "l": 256, "threads": 1,
            "shape": {"nheads": 4, "headdim": 8, "d_state": 16, "ngroups": 1, "chunk_size": 32, "batch": 1}}
    (row,) = bench.run_worker(spec, threads=1)
    assert row["ok"], row.get("error")
    assert row["seconds"] > 0 and row["peak_mb"] >= 0 and row["torch_threads"] == 1
    assert row["flops"] == bench.scan_flops(1, 256, 4, 8, 16, 1, 32)


def test_plan_quick_is_small_and_respects_limits():
    cfg = bench.BenchConfig.quick()
    specs = bench.plan(cfg)
    assert {s["l"] for s in specs if s.get("impl") == "sequential"} == set(cfg.sequential_lengths)
    hf = [s for s in specs if s.get("impl") == "transformers"]
    assert all(s.get("l", 0) <= cfg.hf_max_len and max(s.get("contexts", [0])) <= cfg.hf_max_len for s in hf)
    assert [s["kind"] for s in hf].count("decode") == 1  # all contexts interleaved in one worker
    assert not any(s.get("impl") == "compiled" for s in specs)
    with pytest.raises(ValueError, match="decode_tokens"):
        bench.BenchConfig(decode_tokens=1)


# The fast path's gradients (the benchmark's forward+backward rows time them): kernels.ssd_chunked
# has separate autograd and no-grad code paths (the latter builds its buffers in place), so both are
# checked here against the readable reference minimamba.ssd, in float64.


@settings(max_examples=20, deadline=None)
@given(st.integers(1, 40), st.integers(1, 2), st.integers(1, 2), st.integers(1, 9), st.booleans(), st.booleans(),
       st.integers(0, 2**31 - 1))
def test_ssd_chunked_gradients_and_no_grad_path_match_reference(l, g, r, q, per_token_A, with_state, seed):
    from minimamba import ssd
    gen = torch.Generator().manual_seed(seed)
    b, h, p, n = 2, g * r, 3, 4
    dd = torch.float64

    def leaf(t):
        return t.to(dd).requires_grad_(True)

    inputs = dict(x=leaf(torch.randn(b, l, h, p, generator=gen)),
                  dt=leaf(torch.rand(b, l, h, generator=gen) * 0.5 + 0.01),
                  A=leaf(-torch.rand(*((b, l, h) if per_token_A else (h,)), generator=gen) * 4),
                  B=leaf(torch.randn(b, l, g, n, generator=gen)), C=leaf(torch.randn(b, l, g, n, generator=gen)),
                  D=leaf(torch.randn(h, generator=gen)),
                  initial_state=leaf(torch.randn(b, h, p, n, generator=gen)) if with_state else None)
    w_y, w_s = torch.randn(b, l, h, p, generator=gen, dtype=dd), torch.randn(b, h, p, n, generator=gen, dtype=dd)
    grads = {}
    for name, fn in (("ssd", ssd), ("chunked", kernels.ssd_chunked)):
        y, s = fn(**inputs, chunk_size=q)
        keys = [k for k, v in inputs.items() if v is not None]
        grads[name] = dict(zip(keys, torch.autograd.grad((y * w_y).sum() + (s * w_s).sum(), [inputs[k] for k in keys])))
        grads[name]["y"], grads[name]["s"] = y.detach(), s.detach()
    with torch.no_grad():
        y_ng, s_ng = kernels.ssd_chunked(**inputs, chunk_size=q)
    grads["no_grad"] = {"y": y_ng, "s": s_ng}
    for key, ref in grads["ssd"].items():
        for other in ("chunked", "no_grad"):
            if key not in grads[other]:
                continue
            diff = (grads[other][key] - ref).abs()
            scale = ref.abs().max()
            assert diff.max() <= 1e-9 * scale + 1e-12, \
                f"{other} vs ssd, {key}: max abs diff {diff.max().item():.3g} (max |ref| {scale.item():.3g}), mean {diff.mean().item():.3g}"


def test_committed_bench_results_replot_into_the_readme_figure(tmp_path):
    """experiments/figures.py publishes bench.py's results.json as it is and redraws bench_cpu.png from it."""
    import json
    from experiments import figures
    rows = [_row("model", "accelerated", "fwd", l, l ** 1.1 / 4e4) for l in (1024, 4096)] + \
           [_row("scan", "chunked", "fwd", l, l ** 1.2 / 1e5) for l in (1024, 4096)] + \
           [dict(kind="decode", impl="accelerated", context=c, ms_per_token=c / 1e3, ok=True) for c in (128, 4096)]
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"meta": {"command": "bench.py --quick", "wall_s": 12.0,
                                                           "config": {"quick": True}}, "rows": rows}))
    done = figures.main(["--publish", str(run), "--experiment", "bench", "--results_dir", str(tmp_path / "res"),
                         "--figures_dir", str(tmp_path / "figs")])
    assert done == {"bench": "replotted"} and (tmp_path / "figs" / "bench_cpu.png").stat().st_size > 10_000
    assert json.loads((tmp_path / "res" / "bench" / "results.json").read_text())["rows"] == rows
    manifest = json.loads((tmp_path / "res" / "bench" / "manifest.json").read_text())
    assert manifest["invocations"][0]["command"] == "bench.py --quick" and manifest["wall_s_total"] == 12.0


def test_gpu_check_writes_its_json_whatever_fails(tmp_path, monkeypatch):
    """On a (faked) GPU machine where the test subprocess times out and the bench worker raises, gpu_check
    still writes gpu_check.json and .md naming each outcome, lists the peers with their status, and exits 1."""
    import json
    import subprocess

    from experiments import gpu_check

    real_run = subprocess.run

    def timed_out(cmd, *args, **kwargs):  # the pytest subprocess times out; others (uname, git) run
        if "pytest" not in cmd:
            return real_run(cmd, *args, **kwargs)
        raise subprocess.TimeoutExpired(cmd, kwargs.get("timeout"), output=b"partial output")

    def broken_worker(*args, **kwargs):
        raise RuntimeError("worker exploded")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda i=0: "a fake GPU")
    monkeypatch.setattr(gpu_check.subprocess, "run", timed_out)
    monkeypatch.setattr(bench, "run_worker", broken_worker)
    assert gpu_check.main(["--out_dir", str(tmp_path)]) == 1
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["tests"]["returncode"] is None and "timed out" in result["tests"]["summary"][0]
    assert result["tests"]["output"] == "partial output"
    assert result["errors"] == {"bench_rows": "RuntimeError: worker exploded"}
    assert [p["impl"] for p in result["peers"]] == ["fla", "mamba_ssm"]
    assert all(p["status"] == "importable" or p["status"].startswith("missing:") for p in result["peers"])
    assert "fla-core" in result["peers"][0]["wheel"]
    table = (tmp_path / "gpu_check.md").read_text()
    assert "timed out" in table and "failed step bench_rows" in table and "fla-core" in table
