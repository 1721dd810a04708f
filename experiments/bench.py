"""bench.py: speed and memory of minimamba's scans and model, side by side with transformers' Mamba2.

What it measures, in ONE run (so ratios share the machine's state at that moment):
    0. toy training: a whole optimizer step of the state-collapse demo's model (ToyShape, at headdim 16
       and 32) at T_train 16 and 64, ours and transformers' on the same weights and batches,
       alternating in one process (measure_toy_train);
    1. the machine's own fp32 matmul rate (FLOP/s of a large square matmul): the physical limit,
       since the SSD scan is mostly matmuls;
    2. scans on random inputs: kernels.ssd_sequential (oracle), minimamba.ssd (readable reference),
       kernels.ssd_chunked (eager fast path) and, with --compiled, kernels.ssd_chunked_compiled;
       forward and forward+backward; tokens/s, peak memory, and achieved FLOP/s of ssd_chunked
       from an explicit count of its matmul flops (scan_flops, checked against torch's
       FlopCounterMode in tests/test_bench.py);
    3. whole models: Mamba2LM (plain, and with kernels.accelerate) against transformers'
       Mamba2ForCausalLM loaded from the SAME weights (save_pretrained in the Hugging Face layout,
       then transformers.Mamba2ForCausalLM.from_pretrained), forward and forward+backward;
    4. decoding: ms per new token with Mamba2LM.step after a prefill of growing context length,
       against transformers' cached generation (generate() with its Mamba2 cache);
    5. GPU (only when CUDA is available): compiled ssd_chunked in bf16 and fp32 against
       flash-linear-attention's chunk_simple_gla and mamba_ssm's mamba_chunk_scan_combined when
       importable, their error against an fp64 reference, and the number of compiled graphs across
       lengths (torch._dynamo counters).

How peak memory is measured (honestly, on CPU): every measurement runs in a fresh subprocess
(`bench.py --worker SPEC`). The worker builds its inputs/model, records its resident set size
(RSS, /proc/self/statm), runs the measured call, and reads the process's high-water mark
(resource.getrusage(RUSAGE_SELF).ru_maxrss). peak_mb = high-water mark - RSS before the call: the
extra memory the call needed at its peak (activations, temporaries, autograd buffers), excluding
the Python interpreter, torch, the weights and the inputs. A fresh process per measurement also
keeps one measurement's allocator state from leaking into the next. On CUDA, torch's
max_memory_allocated is used instead.

Timing: one warm-up call, then timed calls until MIN_TIME_S has passed (at least MIN_REPS, at most
MAX_REPS); the table shows the fastest (the least disturbed by other processes on a shared
machine). MIN_REPS keeps the slow rows (a 2-3 s training step) from resting on one disturbed call. Torch threads: torch's default unless --threads is given; the count is recorded.

Commands (CPU first):
    python experiments/bench.py --quick            # ~4-8 min on 2 CPU cores: the table + JSON + plot
    python experiments/bench.py --quick --threads 1   # steadier on a machine shared with other jobs
    python experiments/bench.py --quick --threads 1 --glibc_no_mmap   # malloc keeps freed memory
    python experiments/bench.py                    # lengths 1K..64K, + compiled scans (~30+ min)
    python experiments/bench.py --gpu_only --out_dir runs/bench-gpu   # the GPU section alone (a few min)
On a CPU machine shared with other busy processes, torch's default of one thread per core can
stall every parallel op while a sibling thread waits for its core (the README shows such a run);
--threads 1 avoids that.
Outputs (one run folder, runs/bench-<UTC timestamp>/ or --out_dir): results.json (every measurement,
written after each one, atomically), table.txt, bench.png, config.json (resolved settings, versions,
hardware). --figures_dir DIR also writes the plot there; `python -m experiments.figures` redraws
figures/bench_cpu.png from the committed experiments/results/bench/results.json.

Reading order: BenchConfig -> scan_flops -> the worker (measure_*) -> run_all -> summarize/format_table.
Glossary: as minimamba (b batch, l length, h heads, p headdim, n d_state, g groups, q chunk, c chunks).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from experiments.common import (ProgressBar, add_flag, atomic_write_json, atomic_write_text,  # noqa: E402
                                git_commit, run_metadata)

# ---------------------------------------------------------------------------------------------------
# 1. Settings: every default in one place
# ---------------------------------------------------------------------------------------------------

MIN_TIME_S = 1.0  # keep repeating a timed call until this much time has passed ...
MIN_REPS = 3  # ... and at least this many timed calls ...
MAX_REPS = 5  # ... but at most this many
TOY_IMPLS = ("minimamba", "accelerated", "transformers")  # the toy-training rows, alternating in one worker
MODEL_IMPLS = ("minimamba", "accelerated", "transformers")  # the whole-model rows (one worker each)
MATMUL_SIZE = 2048  # the square fp32 matmul that measures the machine's FLOP/s
DECODE_ROUNDS = 3  # decoding: rounds over all contexts (interleaved), `tokens` new tokens each
WORKER_TIMEOUT_S = 1800  # a single measurement that takes longer is recorded as failed
# --glibc_no_mmap: glibc's malloc serves big blocks by mmap and returns them to the OS on free, so
# every large temporary is page-faulted in again; these tunables keep freed memory for reuse. Applied
# to every worker alike (ours and transformers'), off by default.
GLIBC_NO_MMAP = {"GLIBC_TUNABLES": "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=4294967296"}
KB = 1024  # ru_maxrss is in kilobytes on Linux
MB = 1024 * 1024


@dataclass(frozen=True)
class ModelShape:
    """The small model of the speed targets: d_model 256, 4 layers, d_state 64, headdim 32, chunk 64."""

    d_model: int = 256  # d
    n_layer: int = 4
    d_state: int = 64  # n
    headdim: int = 32  # p
    chunk_size: int = 64  # q
    vocab_size: int = 256  # bytes
    batch: int = 1  # b


@dataclass(frozen=True)
class ScanShape:
    """The scan of the FLOP/s target: h 24, p 64, n 128 (Mamba-2 130m's layer: d_model 768, expand 2)."""

    nheads: int = 24  # h
    headdim: int = 64  # p
    d_state: int = 128  # n
    ngroups: int = 1  # g
    chunk_size: int = 128  # q: the fastest of 64/128/256 on our CPU (the count below uses this q)
    batch: int = 1  # b


@dataclass(frozen=True)
class ToyShape:
    """The state-collapse demo's toy model (experiments/state_collapse.py --quick): d_model 64, 2 layers,
    d_state 256, headdim 16 (8 heads per layer), chunk min(64, T), 512 tokens per training step. The
    benchmark also times it at headdim 32 (4 heads), the demo's shape when the 4x goal was set."""

    d_model: int = 64  # d
    n_layer: int = 2
    d_state: int = 256  # n
    headdim: int = 16  # p
    vocab_size: int = 256  # bytes
    tokens_per_step: int = 512  # rows per step = tokens_per_step / T


@dataclass(frozen=True)
class BenchConfig:
    """What one run measures. quick() is the CPU-sized default of --quick."""

    model: ModelShape = ModelShape()
    scan: ScanShape = ScanShape()
    scan_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)  # l for the scans (forward)
    sequential_lengths: tuple[int, ...] = (256,)  # the oracle is an O(l) Python loop (~30 s at 1K, h=24)
    scan_train_lengths: tuple[int, ...] = (4096,)  # l for the scans' forward+backward
    model_lengths: tuple[int, ...] = (1024, 4096, 16384, 65536)  # l for Mamba2LM forward
    hf_max_len: int = 16384  # transformers materializes O(l * q * h * n) tensors: stop here
    train_lengths: tuple[int, ...] = (4096,)  # l for forward+backward of the models
    decode_contexts: tuple[int, ...] = (128, 1024, 4096, 16384)  # prefill lengths before decoding
    decode_tokens: int = 32  # new tokens timed per context
    toy: ToyShape = ToyShape()
    toy_train_lengths: tuple[int, ...] = (16, 64)  # T_train of the toy training steps
    toy_headdims: tuple[int, ...] = (16, 32)  # the demo's headdim, and the 4-head shape the goal was set on
    toy_rounds: int = 30  # training steps per implementation, alternating (the median is shown)
    compiled: bool = True  # include kernels.ssd_chunked_compiled (compiling costs minutes on CPU)
    gpu_lengths: tuple[int, ...] = (8192, 16384, 32768, 65536)
    gpu_chunk_size: int = 256  # the official chunk size, used by the Triton kernels too
    seed: int = 0

    def __post_init__(self):
        for name in ("scan_lengths", "sequential_lengths", "model_lengths", "decode_contexts", "train_lengths", "gpu_lengths"):
            vals = getattr(self, name)
            if not vals or any((not isinstance(v, int)) or v < 1 for v in vals):
                raise ValueError(f"{name} must be a non-empty tuple of positive ints, got {vals!r}")
        if self.decode_tokens < 2:
            raise ValueError(f"decode_tokens must be >= 2 (a median of per-token times), got {self.decode_tokens}")

    @staticmethod
    def quick() -> "BenchConfig":
        return BenchConfig(scan_lengths=(1024, 4096, 16384), model_lengths=(1024, 4096, 16384),
                           hf_max_len=4096, decode_contexts=(128, 1024, 4096, 16384), decode_tokens=16,
                           compiled=False)


# ---------------------------------------------------------------------------------------------------
# 2. The flop count of ssd_chunked (matmuls only; elementwise work is not counted)
# ---------------------------------------------------------------------------------------------------


def scan_flops(b: int, l: int, h: int, p: int, n: int, g: int, q: int) -> int:
    """Multiply-add flops (2 per MAC) of the matmuls kernels.ssd_chunked performs, for a length
    padded to c = ceil(l / q) chunks. Full (q, q) blocks are counted, as they are computed:
        C B^T per group                2 q^2 n   per chunk and group     (step 1)
        (C B^T o L) X per head         2 q^2 p   per chunk and head      (step 1)
        chunk states X^T B per head    2 q p n   per chunk and head      (step 2)
        C S^T per head                 2 q n p   per chunk and head      (step 4)
    Per token and head that is about 2 (q p + 2 p n) (+ 2 q n / r for C B^T): linear in l.
    """
    c = -(-l // q)
    return 2 * b * c * (g * q * q * n + h * (q * q * p + 2 * q * p * n))


# ---------------------------------------------------------------------------------------------------
# 3. The worker: one measurement in a fresh process
# ---------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    """Current resident set size of this process, from /proc/self/statm (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * KB


def _time_calls(fn, sync=lambda: None):
    """One warm-up call, then timed calls until MIN_TIME_S (MIN_REPS..MAX_REPS of them). Returns seconds (min, all)."""
    fn()
    sync()
    times, start = [], time.perf_counter()
    while len(times) < MIN_REPS or (time.perf_counter() - start < MIN_TIME_S and len(times) < MAX_REPS):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return min(times), times


def _measure(fn, device: str):
    """Time fn and measure the extra memory its call needs at peak (see the module docstring)."""
    import torch
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        best, times = _time_calls(fn, torch.cuda.synchronize)
        peak = torch.cuda.max_memory_allocated() - base
    else:
        base = _rss_bytes()
        best, times = _time_calls(fn)
        peak = max(0, _peak_rss_bytes() - base)
    return {"seconds": best, "all_seconds": times, "peak_mb": peak / MB}


def _scan_inputs(shape: ScanShape, l: int, dtype, device, seed: int, requires_grad: bool = False):
    import torch
    gen = torch.Generator().manual_seed(seed)
    b, h, p, n, g = shape.batch, shape.nheads, shape.headdim, shape.d_state, shape.ngroups
    x = torch.randn(b, l, h, p, generator=gen)
    # dt ~ the official init range [1e-3, 1e-1] after softplus; A in [-16, -1] as A_log's init
    dt = torch.exp(torch.empty(b, l, h).uniform_(math.log(1e-3), math.log(1e-1), generator=gen))
    A = -torch.empty(h).uniform_(1, 16, generator=gen)
    B, C = torch.randn(b, l, g, n, generator=gen), torch.randn(b, l, g, n, generator=gen)
    D = torch.ones(h)
    out = dict(x=x.to(dtype), dt=dt, A=A, B=B.to(dtype), C=C.to(dtype), D=D)
    out = {k: v.to(device).requires_grad_(requires_grad and v.is_floating_point()) for k, v in out.items()}
    return out


def _scan_fn(impl: str):
    import minimamba_kernels as kernels
    import minimamba
    return {"sequential": kernels.ssd_sequential_chunked, "ssd": minimamba.ssd, "chunked": kernels.ssd_chunked,
            "compiled": kernels.ssd_chunked_compiled}[impl]


def measure_matmul(spec) -> dict:
    import torch
    a, b = torch.randn(MATMUL_SIZE, MATMUL_SIZE), torch.randn(MATMUL_SIZE, MATMUL_SIZE)
    res = _measure(lambda: a @ b, "cpu")
    res["flops"] = 2 * MATMUL_SIZE ** 3
    res["flop_per_s"] = res["flops"] / res["seconds"]
    return res


def measure_scan(spec) -> dict:
    """spec: impl, mode ('fwd' | 'fwdbwd'), l, shape (ScanShape fields), device, dtype."""
    import torch
    shape = ScanShape(**spec["shape"])
    dtype, device, l = getattr(torch, spec.get("dtype", "float32")), spec.get("device", "cpu"), spec["l"]
    train = spec["mode"] == "fwdbwd"
    inp = _scan_inputs(shape, l, dtype, device, spec["seed"], requires_grad=train)
    fn = _scan_fn(spec["impl"])
    q = shape.chunk_size
    compile_s = None
    if spec["impl"] == "compiled":  # compile outside the measurement, and report how long it took
        t0 = time.perf_counter()
        with torch.set_grad_enabled(train):
            fn(**inp, chunk_size=q)
        compile_s = time.perf_counter() - t0

    def call():
        if train:
            for v in inp.values():
                v.grad = None
            y, s = fn(**inp, chunk_size=q)
            (y.float().sum() + s.sum()).backward()
        else:
            with torch.no_grad():
                fn(**inp, chunk_size=q)

    res = _measure(call, device)
    flops = scan_flops(shape.batch, l, shape.nheads, shape.headdim, shape.d_state, shape.ngroups, q)
    res.update(tokens_per_s=shape.batch * l / res["seconds"], compile_s=compile_s)
    if not train:
        res.update(flops=flops, flop_per_s=flops / res["seconds"])
    return res


def _model_config(ms: ModelShape):
    from minimamba import Mamba2Config
    return Mamba2Config(d_model=ms.d_model, n_layer=ms.n_layer, vocab_size=ms.vocab_size, d_state=ms.d_state,
                        headdim=ms.headdim, chunk_size=ms.chunk_size)


def _build_model(spec):
    """Mamba2LM (seeded) or transformers' Mamba2ForCausalLM holding the very same weights."""
    import torch
    from minimamba import Mamba2LM
    ms = ModelShape(**spec["shape"])
    torch.manual_seed(spec["seed"])
    ours = Mamba2LM(_model_config(ms))
    if spec["impl"] == "accelerated":
        import minimamba_kernels as kernels
        return kernels.accelerate(ours), ms
    if spec["impl"] != "transformers":
        return ours, ms
    import transformers
    from checkpoints import save_pretrained
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d, layout="hf")
        hf = transformers.Mamba2ForCausalLM.from_pretrained(d)
    del ours
    return hf, ms


def _logits(model, ids):
    out = model(ids)
    return out.logits if hasattr(out, "logits") else out[0]


def measure_model(spec) -> dict:
    """spec: impl ('minimamba' = the plain model, 'accelerated' = kernels.accelerate, or 'transformers'),
    mode, l, shape."""
    import torch
    model, ms = _build_model(spec)
    gen = torch.Generator().manual_seed(spec["seed"])
    ids = torch.randint(0, ms.vocab_size, (ms.batch, spec["l"]), generator=gen)
    train = spec["mode"] == "fwdbwd"
    model.train(train)

    def call():
        if train:
            model.zero_grad(set_to_none=True)
            _logits(model, ids).float().sum().backward()
        else:
            with torch.no_grad():
                _logits(model, ids)

    res = _measure(call, "cpu")
    res["tokens_per_s"] = ms.batch * spec["l"] / res["seconds"]
    return res


def measure_decode(spec) -> list[dict]:
    """ms per new token after prefills of growing `contexts`, one row per context.

    All contexts run in ONE process, interleaved: round after round, each context decodes
    `tokens` new tokens, so a burst of load on a shared machine hits every context alike. The
    figure is the median time between consecutive new tokens (the prefill is excluded).
    Mamba2LM: forward() on the context once, then rounds of step() calls, each timed.
    transformers: each round calls generate() (greedy, with its Mamba2 cache); a StoppingCriteria,
    called once per new token, records the time of each step.
    """
    import statistics

    import torch
    model, ms = _build_model(spec)
    model.eval()
    gen = torch.Generator().manual_seed(spec["seed"])
    T, rounds = spec["tokens"], spec.get("rounds", DECODE_ROUNDS)
    ids = {ctx: torch.randint(0, ms.vocab_size, (ms.batch, ctx), generator=gen) for ctx in spec["contexts"]}
    gaps: dict[int, list[float]] = {ctx: [] for ctx in ids}
    with torch.no_grad():
        if spec["impl"] == "transformers":
            import transformers
            model.generation_config.eos_token_id = None
            model.generation_config.pad_token_id = 0

            class Stamp(transformers.StoppingCriteria):
                def __init__(self):
                    self.stamps: list[float] = []

                def __call__(self, input_ids, scores, **kwargs):
                    self.stamps.append(time.perf_counter())
                    return torch.zeros(input_ids.shape[0], dtype=torch.bool)

            for _ in range(rounds):
                for ctx, x in ids.items():
                    stamp = Stamp()
                    out = model.generate(x, max_new_tokens=T + 1, min_new_tokens=T + 1, do_sample=False,
                                         use_cache=True, stopping_criteria=transformers.StoppingCriteriaList([stamp]))
                    if out.shape[1] != ctx + T + 1 or len(stamp.stamps) != T + 1:
                        raise RuntimeError(f"generate made {out.shape[1] - ctx} tokens in {len(stamp.stamps)} steps")
                    gaps[ctx] += [b - a for a, b in zip(stamp.stamps, stamp.stamps[1:])]
        else:
            states = {ctx: model(x)[1] for ctx, x in ids.items()}
            for _ in range(rounds):
                for ctx, x in ids.items():
                    state, tok = states[ctx], x[:, -1]
                    for _ in range(T):
                        t0 = time.perf_counter()
                        logits, state = model.step(tok, state)
                        gaps[ctx].append(time.perf_counter() - t0)
                        tok = logits[:, : ms.vocab_size].argmax(-1)
    rows = []
    for ctx, g in gaps.items():
        per_token = statistics.median(g)
        rows.append({"context": ctx, "ms_per_token": 1e3 * per_token, "tokens_per_s": ms.batch / per_token})
    return rows


def measure_gpu(spec) -> dict:
    """One GPU scan measurement: impl in compiled | fla | mamba_ssm, dtype bf16/fp32, length l.
    Error: max |y - y_ref| / max |y_ref| against ssd_chunked in float64 (on the GPU)."""
    import torch
    import minimamba_kernels as kernels
    shape = ScanShape(**spec["shape"])
    dtype, l, q = getattr(torch, spec["dtype"]), spec["l"], shape.chunk_size
    inp = _scan_inputs(shape, l, dtype, "cuda", spec["seed"])
    ref, _ = kernels.ssd_chunked(**{k: v.double() for k, v in inp.items()}, chunk_size=q)
    if spec["impl"] == "compiled":
        import torch._dynamo
        fn = lambda: kernels.ssd_chunked_compiled(**inp, chunk_size=q)[0]  # noqa: E731
    elif spec["impl"] == "fla":
        from fla.ops.simple_gla import chunk_simple_gla
        # the same scan in linear-attention form: q = C, k = B, v = x dt, g = log decay = dt A
        r = shape.nheads // shape.ngroups
        Cq = inp["C"].repeat_interleave(r, dim=2)
        Bk = inp["B"].repeat_interleave(r, dim=2)
        v = inp["x"] * inp["dt"][..., None].to(dtype)
        glog = (inp["dt"] * inp["A"]).float()

        def fn():
            o, _ = chunk_simple_gla(Cq, Bk, v, g=glog, scale=1.0, output_final_state=True)
            return o + inp["D"][:, None].to(dtype) * inp["x"]
    elif spec["impl"] == "mamba_ssm":
        from mamba_ssm.ops.triton.ssd_combined import mamba_chunk_scan_combined
        fn = lambda: mamba_chunk_scan_combined(inp["x"], inp["dt"], inp["A"], inp["B"], inp["C"],  # noqa: E731
                                               chunk_size=q, D=inp["D"])
    else:
        raise ValueError(f"unknown GPU impl {spec['impl']!r}")
    with torch.no_grad():
        y = fn()
        err = ((y.double() - ref).abs().max() / ref.abs().max()).item()
        res = _measure(fn, "cuda")
    res.update(tokens_per_s=shape.batch * l / res["seconds"], max_rel_err=err)
    if spec["impl"] == "compiled":
        stats = torch._dynamo.utils.counters["stats"]
        res["dynamo_unique_graphs_so_far"] = int(stats.get("unique_graphs", 0))
    return res


def _toy_model(impl: str, toy: ToyShape, t_train: int, seed: int):
    """The demo's toy model for one T_train (chunk min(64, T), as the demo trains it), seeded; impl
    "minimamba" (the plain model), "accelerated" (kernels.accelerate) or "transformers" (its
    Mamba2ForCausalLM holding the very same weights)."""
    import inspect

    import torch
    from minimamba import Mamba2Config, Mamba2LM
    torch.manual_seed(seed)
    cfg = Mamba2Config(d_model=toy.d_model, n_layer=toy.n_layer, vocab_size=toy.vocab_size, d_state=toy.d_state,
                       headdim=toy.headdim, chunk_size=min(64, t_train))
    ours = Mamba2LM(cfg)
    if impl == "accelerated":
        import minimamba_kernels as kernels
        return kernels.accelerate(ours)
    if impl != "transformers":
        return ours
    import transformers
    from checkpoints import save_pretrained
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:
        save_pretrained(ours, d, layout="hf")
        return transformers.Mamba2ForCausalLM.from_pretrained(d)


def measure_toy_train(spec) -> list[dict]:
    """Training tokens/s of the state-collapse demo's toy model, one row per impl: every impl holds the
    same initial weights and runs the same batches (random bytes, rows of T + 1), AdamW steps
    alternating between the impls round after round in ONE process, so a burst of load on a shared
    machine hits all alike. A step is forward, the byte cross-entropy, backward and optimizer.step;
    the figure is the median step time over `rounds` (after one warm-up step each)."""
    import inspect
    import statistics

    import torch
    import torch.nn.functional as F
    toy, T, impls = ToyShape(**spec["shape"]), spec["t_train"], spec["impls"]
    rows_per_step = toy.tokens_per_step // T
    models = {impl: _toy_model(impl, toy, T, spec["seed"]) for impl in impls}
    # fused AdamW, as experiments/train.py steps it (one kernel over all parameters); the same for every impl
    opts = {impl: torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True) for impl, m in models.items()}
    gen = torch.Generator().manual_seed(spec["seed"])
    batches = [torch.randint(0, toy.vocab_size, (rows_per_step, T + 1), generator=gen) for _ in range(4)]

    def step(impl, batch):
        model, opt = models[impl], opts[impl]
        x, y = batch[:, :-1], batch[:, 1:]
        if impl == "transformers":
            logits = model(x).logits
        elif "return_state" in inspect.signature(model.forward).parameters:
            logits, _ = model(x, return_state=False)  # plain training: nobody reads the final state
        else:
            logits, _ = model(x)
        loss = F.cross_entropy(logits[..., :toy.vocab_size].reshape(-1, toy.vocab_size), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for impl in impls:
        step(impl, batches[0])  # warm-up
    times: dict[str, list[float]] = {impl: [] for impl in impls}
    for r in range(spec["rounds"]):
        for impl in impls:
            t0 = time.perf_counter()
            step(impl, batches[r % len(batches)])
            times[impl].append(time.perf_counter() - t0)
    out = []
    for impl in impls:
        sec = statistics.median(times[impl])
        out.append({"impl": impl, "seconds": sec, "all_seconds": times[impl],
                    "tokens_per_s": rows_per_step * T / sec})
    return out


MEASURES = {"toy_train": measure_toy_train, "matmul": measure_matmul, "scan": measure_scan, "model": measure_model, "decode": measure_decode}


def worker_main(spec_json: str) -> None:
    """Entry point of the subprocess: run one measurement (or a list, for the GPU section) and
    print one JSON line per result."""
    import torch
    specs = json.loads(spec_json)
    specs = specs if isinstance(specs, list) else [specs]
    if specs[0].get("threads"):
        torch.set_num_threads(specs[0]["threads"])
    for spec in specs:
        try:
            fn = measure_gpu if spec["kind"] == "gpu" else MEASURES[spec["kind"]]
            results = fn(spec)
            results = [{**r, "ok": True} for r in (results if isinstance(results, list) else [results])]
        except Exception as e:  # recorded in the results, not hidden: the table shows the error
            results = [{"ok": False, "error": f"{type(e).__name__}: {e}"[:500]}]
        for res in results:
            res["torch_threads"] = torch.get_num_threads()
            row = {k: v for k, v in spec.items() if k not in ("contexts", "impls")}
            print("RESULT " + json.dumps({**row, **res}), flush=True)


# ---------------------------------------------------------------------------------------------------
# 4. The driver: build the list of measurements, run each in a subprocess, save after each
# ---------------------------------------------------------------------------------------------------


def plan(cfg: BenchConfig, cpu: bool = True) -> list[dict]:
    """Every measurement of a run, in order (each is one worker subprocess)."""
    sh, ms = dataclasses.asdict(cfg.scan), dataclasses.asdict(cfg.model)
    base = {"seed": cfg.seed}
    specs: list[dict] = []
    if cpu:
        for p in cfg.toy_headdims:
            for t in cfg.toy_train_lengths:
                specs.append({**base, "kind": "toy_train", "t_train": t, "headdim": p, "impls": list(TOY_IMPLS),
                              "rounds": cfg.toy_rounds, "shape": dataclasses.asdict(dataclasses.replace(cfg.toy, headdim=p))})
        specs.append({**base, "kind": "matmul"})
        for l in cfg.sequential_lengths:
            specs.append({**base, "kind": "scan", "impl": "sequential", "mode": "fwd", "l": l, "shape": sh})
        scan_impls = ["ssd", "chunked"] + (["compiled"] if cfg.compiled else [])
        for l in cfg.scan_lengths:
            for impl in scan_impls:
                specs.append({**base, "kind": "scan", "impl": impl, "mode": "fwd", "l": l, "shape": sh})
        for l in cfg.scan_train_lengths:
            for impl in ["ssd", "chunked"]:
                specs.append({**base, "kind": "scan", "impl": impl, "mode": "fwdbwd", "l": l, "shape": sh})
        for l in cfg.model_lengths:
            for impl in MODEL_IMPLS:
                if impl == "transformers" and l > cfg.hf_max_len:
                    continue
                specs.append({**base, "kind": "model", "impl": impl, "mode": "fwd", "l": l, "shape": ms})
        for l in cfg.train_lengths:
            for impl in MODEL_IMPLS:
                specs.append({**base, "kind": "model", "impl": impl, "mode": "fwdbwd", "l": l, "shape": ms})
        for impl in ["accelerated", "transformers"]:
            ctxs = [c for c in cfg.decode_contexts if impl != "transformers" or c <= cfg.hf_max_len]
            specs.append({**base, "kind": "decode", "impl": impl, "contexts": ctxs, "tokens": cfg.decode_tokens,
                          "shape": ms})
    return specs


# The GPU peers: (row name, module the bench imports, the wheel that provides it). flash-linear-attention's
# fla.ops moved to the fla-core wheel when the package split (flash-linear-attention itself no longer has it).
GPU_PEERS = (("fla", "fla.ops.simple_gla", "fla-core (needs einops; triton comes with CUDA torch)"),
             ("mamba_ssm", "mamba_ssm.ops.triton.ssd_combined", "mamba-ssm (a CUDA build matching torch)"))


def gpu_peers() -> list[dict]:
    """Each GPU peer with its status: "importable", or why not (the import error), and its wheel."""
    peers = []
    for name, module, wheel in GPU_PEERS:
        try:
            __import__(module)
            status = "importable"
        except Exception as e:  # ImportError, or a peer that breaks on import (a CUDA/triton mismatch)
            status = f"missing: {type(e).__name__}: {e}"[:300]
        peers.append({"impl": name, "module": module, "wheel": wheel, "status": status})
    return peers


def gpu_plan(cfg: BenchConfig, peers: list[dict] | None = None) -> list[dict]:
    """The GPU section as ONE worker (one process keeps the compiled graphs, so the dynamo counters
    show how many graphs the lengths needed): our compiled scan and every importable peer."""
    sh = dataclasses.asdict(dataclasses.replace(cfg.scan, chunk_size=cfg.gpu_chunk_size))
    peers = gpu_peers() if peers is None else peers
    impls = ["compiled"] + [p["impl"] for p in peers if p["status"] == "importable"]
    return [{"seed": cfg.seed, "kind": "gpu", "impl": impl, "dtype": dt, "l": l, "shape": sh}
            for dt in ("bfloat16", "float32") for impl in impls for l in cfg.gpu_lengths]


def run_worker(specs, threads: int | None, glibc_no_mmap: bool = False) -> list[dict]:
    """Run specs (one dict or a list) in a fresh Python process; returns its result dicts."""
    if threads:
        specs = [{**s, "threads": threads} for s in (specs if isinstance(specs, list) else [specs])]
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(specs)]
    env = {**os.environ, **(GLIBC_NO_MMAP if glibc_no_mmap else {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=WORKER_TIMEOUT_S, cwd=ROOT, env=env)
    except subprocess.TimeoutExpired:
        items = specs if isinstance(specs, list) else [specs]
        return [{**s, "ok": False, "error": f"timed out after {WORKER_TIMEOUT_S} s"} for s in items]
    rows = [json.loads(line[len("RESULT "):]) for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not rows:
        items = specs if isinstance(specs, list) else [specs]
        err = (proc.stderr or "").strip().splitlines()[-3:]
        return [{**s, "ok": False, "error": f"worker exited {proc.returncode}: {' | '.join(err)}"[:500]} for s in items]
    return rows


# ---------------------------------------------------------------------------------------------------
# 5. Summaries: the table, the targets, the plot
# ---------------------------------------------------------------------------------------------------


def _label(r: dict) -> str:
    if r["kind"] == "matmul":
        return f"matmul {MATMUL_SIZE}^3 fp32"
    if r["kind"] == "scan":
        return f"scan {r['impl']}"
    if r["kind"] == "gpu":
        return f"gpu {r['impl']} {r['dtype']}"
    if r["kind"] == "toy_train":
        return f"toy train {r['impl']} p{_toy_headdim(r)}"
    name = "transformers Mamba2" if r["impl"] == "transformers" else f"Mamba2LM {r['impl']}"
    return f"{'decode' if r['kind'] == 'decode' else 'model'} {name}"


def format_table(rows: list[dict]) -> str:
    """A fixed-width text table of every measurement (what --quick prints)."""
    head = f"{'what':34s} {'mode':7s} {'l/ctx':>7s} {'time':>10s} {'tokens/s':>10s} {'peak MB':>8s} {'GFLOP/s':>8s}  note"
    lines = [head, "-" * len(head)]
    for r in rows:
        l = r.get("l", r.get("context", r.get("t_train", "")))
        mode = r.get("mode", r.get("dtype", {"decode": "step", "toy_train": "T"}.get(r["kind"], "")))
        if not r.get("ok"):
            lines.append(f"{_label(r):34s} {mode:7s} {l!s:>7s} {'FAILED':>10s}  {r.get('error', '')[:80]}")
            continue
        if r["kind"] == "decode":
            t = f"{r['ms_per_token']:.2f}ms/t"
        else:
            t = f"{r['seconds'] * 1e3:.1f}ms"
        tps = f"{r['tokens_per_s']:.4g}" if "tokens_per_s" in r else ""
        peak = f"{r['peak_mb']:.0f}" if "peak_mb" in r else ""
        gf = f"{r['flop_per_s'] / 1e9:.1f}" if "flop_per_s" in r else ""
        note = []
        if r.get("compile_s"):
            note.append(f"compile {r['compile_s']:.0f}s")
        if "flops" in r and r["kind"] == "scan":
            note.append(f"{r['flops'] / 1e9:.2f} GFLOP counted")
        if "max_rel_err" in r:
            note.append(f"err {r['max_rel_err']:.1e}")
        lines.append(f"{_label(r):34s} {mode:7s} {l!s:>7s} {t:>10s} {tps:>10s} {peak:>8s} {gf:>8s}  {' '.join(note)}")
    return "\n".join(lines)


def _toy_headdim(r: dict):
    """A toy-training row's headdim (rows of results.json files from before toy_headdims carry it only
    inside their shape)."""
    return r.get("headdim", r.get("shape", {}).get("headdim"))


def _find(rows, **kw):
    for r in rows:
        if r.get("ok") and all(r.get(k) == v for k, v in kw.items()):
            return r
    return None


def summarize(rows: list[dict], target_len: int = 4096, long_len: int = 16384) -> list[dict]:
    """The speed targets, each with its measured figure and whether it is met (None = not measured)."""
    out = []

    def add(name, value, goal, met):
        out.append({"target": name, "value": value, "goal": goal, "met": met})

    toy = [r for r in rows if r.get("ok") and r["kind"] == "toy_train"]
    for p, t in sorted({(_toy_headdim(r), r["t_train"]) for r in toy}, key=lambda pt: (pt[0] or 0, pt[1])):
        shape_rows = [r for r in toy if _toy_headdim(r) == p]
        hf = _find(shape_rows, impl="transformers", t_train=t)
        for impl in [i for i in TOY_IMPLS if i != "transformers"]:
            ours = _find(shape_rows, impl=impl, t_train=t)
            v = hf["seconds"] / ours["seconds"] if (ours and hf) else None
            add(f"toy training ({impl}) tokens/s vs transformers (T_train={t}, headdim {p})", v, ">= 4",
                None if v is None else v >= 4)
    mm = _find(rows, kind="matmul")
    ck = _find(rows, kind="scan", impl="chunked", mode="fwd", l=target_len)
    frac = ck["flop_per_s"] / mm["flop_per_s"] if (mm and ck) else None
    add(f"ssd_chunked FLOP/s / matmul FLOP/s (l={target_len})", frac, ">= 0.30", None if frac is None else frac >= 0.30)
    for impl in ("accelerated", "minimamba"):
        for mode, goal in (("fwd", 3.0), ("fwdbwd", 2.0)):
            ours = _find(rows, kind="model", impl=impl, mode=mode, l=target_len)
            hf = _find(rows, kind="model", impl="transformers", mode=mode, l=target_len)
            v = hf["seconds"] / ours["seconds"] if (ours and hf) else None
            add(f"Mamba2LM {impl} {mode} speed-up vs transformers (l={target_len})", v, f">= {goal:g}",
                None if v is None else v >= goal)
            m = ours["peak_mb"] / hf["peak_mb"] if (ours and hf and hf["peak_mb"] > 0) else None
            add(f"Mamba2LM {impl} {mode} peak memory / transformers' (l={target_len})", m, "<= 0.5",
                None if m is None else m <= 0.5)
    for what, kw in (("scan chunked", dict(kind="scan", impl="chunked", mode="fwd")),
                     ("Mamba2LM accelerated", dict(kind="model", impl="accelerated", mode="fwd"))):
        a, b = _find(rows, **kw, l=target_len), _find(rows, **kw, l=long_len)
        v = b["seconds"] / a["seconds"] if (a and b) else None
        add(f"{what} time({long_len}) / time({target_len})", v, "<= 4.5", None if v is None else v <= 4.5)
    for impl in ("accelerated", "transformers"):
        dec = sorted((r for r in rows if r.get("ok") and r["kind"] == "decode" and r["impl"] == impl),
                     key=lambda r: r["context"])
        if len(dec) >= 2 and dec[0]["ms_per_token"] > 0:
            v = dec[-1]["ms_per_token"] / dec[0]["ms_per_token"]
            add(f"decode {impl}: ms/token at ctx {dec[-1]['context']} / at ctx {dec[0]['context']}", v,
                "~1 (flat; <= 1.5)", v <= 1.5)
    return out


def format_summary(summary: list[dict]) -> str:
    lines = []
    for s in summary:
        v = "not measured" if s["value"] is None else f"{s['value']:.3g}"
        met = {True: "MET", False: "NOT MET", None: "-"}[s["met"]]
        lines.append(f"{s['target']:70s} {v:>12s}  goal {s['goal']:18s} {met}")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    """Three panels: model forward tokens/s vs length, scan tokens/s vs length, decode ms/token vs context."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    groups = [
        (axes[0], "model", "fwd", "l", "tokens_per_s", "Mamba2LM vs transformers: forward", "tokens/s"),
        (axes[1], "scan", "fwd", "l", "tokens_per_s", "scans: forward (h=24, p=64, n=128)", "tokens/s"),
        (axes[2], "decode", None, "context", "ms_per_token", "decoding one token after a prefill", "ms / token"),
    ]
    for ax, kind, mode, xkey, ykey, title, ylabel in groups:
        impls = sorted({r["impl"] for r in rows if r["kind"] == kind})
        for impl in impls:
            pts = sorted((r[xkey], r[ykey]) for r in rows if r.get("ok") and r["kind"] == kind and r["impl"] == impl
                         and (mode is None or r.get("mode") == mode))
            if pts:
                ax.plot(*zip(*pts), marker="o", label=_label({"kind": kind, "impl": impl}))
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("context length" if kind == "decode" else "sequence length l")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)
    plt.close(fig)


def _cpu_model() -> str:
    try:
        for line in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines():
            if line.startswith("Model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def run_all(cfg: BenchConfig, out: Path, threads: int | None, gpu: bool, cpu: bool,
            figures_dir: Path | None, glibc_no_mmap: bool = False) -> list[dict]:
    import torch
    out.mkdir(parents=True, exist_ok=True)
    meta = {**run_metadata(), "commit": git_commit(), "cpu_model": _cpu_model(), "torch_threads_requested": threads or "default",
            "glibc_no_mmap": glibc_no_mmap,
            "command": " ".join([Path(sys.executable).name] + sys.argv), "config": dataclasses.asdict(cfg)}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        meta["transformers"] = "not installed"
    atomic_write_json(out / "config.json", meta)
    specs = plan(cfg, cpu=cpu)
    rows: list[dict] = []
    t_start = time.perf_counter()
    bar = ProgressBar(total=len(specs) + (1 if gpu else 0), desc="bench")
    for spec in specs:
        rows.extend(run_worker(spec, threads, glibc_no_mmap))
        atomic_write_json(out / "results.json", {"meta": meta, "rows": rows})
        bar.update(1, last=_label(rows[-1]))
    if gpu:
        if torch.cuda.is_available():
            rows.extend(run_worker(gpu_plan(cfg), threads, glibc_no_mmap))
        else:
            print("GPU section skipped: torch.cuda.is_available() is False", file=sys.stderr)
        bar.update(1)
    bar.close()
    wall = time.perf_counter() - t_start
    summary = summarize(rows)
    meta["wall_s"] = wall
    atomic_write_json(out / "results.json", {"meta": meta, "rows": rows, "summary": summary})
    text = (f"{meta['command']}\n{meta['time_utc']}  {meta['cpu_model']}  torch {meta['torch']}  "
            f"transformers {meta['transformers']}  threads {rows[0].get('torch_threads', '?') if rows else '?'}  "
            f"wall {wall:.0f} s\n\n{format_table(rows)}\n\nTargets\n{format_summary(summary)}\n")
    atomic_write_text(out / "table.txt", text)
    print(text)
    if rows:
        plot(rows, out / "bench.png")
        if figures_dir is not None:
            plot(rows, Path(figures_dir) / ("bench_gpu.png" if not cpu else "bench_cpu.png"))
    print(f"wrote {out}/results.json, table.txt, bench.png", file=sys.stderr)
    return rows


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_flag(ap, "quick", bool, False, "CPU-sized run (lengths up to 16K, no compile)")
    add_flag(ap, "out_dir", str, "", "run folder; empty = runs/bench-<UTC timestamp>")
    add_flag(ap, "threads", int, 0, "torch threads in each worker; 0 = torch's default")
    add_flag(ap, "gpu_only", bool, False, "only the GPU section")
    add_flag(ap, "no_gpu", bool, False, "skip the GPU section even if CUDA is available")
    add_flag(ap, "figures_dir", str, "", "also write the plot into this folder (empty = nowhere else)")
    add_flag(ap, "glibc_no_mmap", bool, False, "workers keep freed memory (see GLIBC_NO_MMAP)")
    add_flag(ap, "worker", str, "", "internal: run this JSON measurement spec in this process and print its rows "
             "(the parent starts one subprocess per measurement)")
    return ap


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    cfg = BenchConfig.quick() if args.quick else BenchConfig()
    out = Path(args.out_dir) if args.out_dir else ROOT / "runs" / time.strftime("bench-%Y%m%d-%H%M%S", time.gmtime())
    import torch
    run_all(cfg, out, args.threads or None, gpu=not args.no_gpu and (args.gpu_only or torch.cuda.is_available()),
            cpu=not args.gpu_only, figures_dir=Path(args.figures_dir) if args.figures_dir else None,
            glibc_no_mmap=args.glibc_no_mmap)


if __name__ == "__main__":
    main()
