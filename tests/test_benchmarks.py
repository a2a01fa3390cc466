"""benchmarks/ablation.py turns fast paths off by replacing library functions for the length of a row.
Timings stay out of the tests; what is checked is that each switch does turn its path off (the
function it names is still there and is what the models call) and leaves everything as it was."""
import importlib.util
import os

import numpy as np
import pytest

from minivl import activations, attention_blocks, norms, rope, threads
from minivl.models import common, decode_step, intern_vit
from minivl.tiny.llm import write_tiny_llm

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_ablation():
    spec = importlib.util.spec_from_file_location("ablation", os.path.join(ROOT, "benchmarks", "ablation.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_switch_turns_its_path_off_and_restores_it(monkeypatch):
    ablation = load_ablation()
    before_names = (
        (attention_blocks, "_fast_kernel_applies"), (attention_blocks, "causal_attention_blocks"),
        (intern_vit, "attention_blocks"), (common, "pack_parameters"), (decode_step, "decode_plan"),
        (norms, "rms_norm_fast"), (norms, "layer_norm_fast"), (rope, "apply_rope_fast"), (threads, "parallel"), (attention_blocks, "parallel"),
        (activations, "parallel"))
    before = {(module.__name__, name): getattr(module, name) for module, name in before_names}
    monkeypatch.delenv("MINIVL_NUM_THREADS", raising=False)
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 2, 300, 16), dtype=np.float32) for _ in range(3))
    calls = []
    kernel = attention_blocks._late_normalized_attention
    monkeypatch.setattr(attention_blocks, "_late_normalized_attention",
                        lambda *a, **kw: calls.append(1) or kernel(*a, **kw))
    for name, switch in ablation.switches().items():
        calls.clear()
        with switch():
            attention_blocks.attention_blocks(q, k, v, scale_mode="scale_q", softmax_dtype=None)
            threads_env = os.environ.get("MINIVL_NUM_THREADS")
            vit_attention = intern_vit.attention_blocks
            decode_plan = decode_step.decode_plan
            plain = (norms.rms_norm_fast is norms.rms_norm and norms.layer_norm_fast is norms.layer_norm
                     and rope.apply_rope_fast is rope.apply_rope)
            pool_only = {threads.parallel, attention_blocks.parallel, activations.parallel} == {ablation.pool_only}
        assert plain == (name == "plain norms and apply_rope"), name
        assert pool_only == (name == "caller waits on the pool"), name
        assert bool(calls) == (name not in ("no float32 attention kernel",)), name
        flat_step = decode_plan is before[("minivl.models.decode_step", "decode_plan")]
        assert flat_step == (name != "no flat decode step"), name
        if name.startswith("no query blocks"):
            assert vit_attention is not before[("minivl.models.intern_vit", "attention_blocks")]
        assert threads_env == ("1" if name.startswith("one thread") else None), name
    after = {(module.__name__, name): getattr(module, name) for module, name in before_names}
    assert after == before and "MINIVL_NUM_THREADS" not in os.environ


def test_paired_rounds_divide_a_drifting_machine_out():
    """ablation.py's ratio column: each row runs next to an all-on run of its own, the order alternating by
    round. On a fake machine that turns 1.4× slower for three pairs and back (a slow minute), a row that
    costs 1.10× all on reads exactly 1.10× in every pair, the slow ones too (its lowest and highest ratio
    are 1.10×), and a row that costs the same reads 1×."""
    ablation = load_ablation()
    cost = {"all fast paths on": (1.0, 2.0), "slower": (1.1, 2.0), "same": (1.0, 2.0)}
    calls = []

    def run_row(name):
        calls.append(name)
        slow = 1.4 if 4 <= (len(calls) - 1) // 2 < 7 else 1.0  # pairs 4, 5 and 6 run in the slow stretch
        return tuple(slow * c for c in cost[name])

    times, partners = ablation.paired_rounds(run_row, list(cost), "all fast paths on", rounds=5)
    assert len(calls) == 2 * 2 * 5  # two paired rows, two runs a pair, five rounds
    # the row first in even rounds, all on first in odd ones
    assert calls[:4] == ["slower", "all fast paths on", "same", "all fast paths on"]
    assert calls[4:8] == ["all fast paths on", "slower", "all fast paths on", "same"]
    assert len(times["all fast paths on"]) == 10 and all(len(partners[name]) == 5 for name in ("slower", "same"))
    ratios = ablation.paired_ratios(times, partners)
    assert set(ratios) == {"slower", "same"}
    for (median, low, high), expected in zip(ratios["slower"], (1.1, 1.0)):
        assert median == low == high == pytest.approx(expected, rel=1e-12)
    assert all(cell == pytest.approx((1.0, 1.0, 1.0)) for cell in ratios["same"])


def test_unpacked_load_gives_the_same_model_without_the_buffer(tmp_path):
    ablation = load_ablation()
    path = write_tiny_llm(tmp_path / "llama", "llama", seed=1)
    packed, unpacked = ablation.load(path, True), ablation.load(path, False)
    ids = np.random.default_rng(1).integers(0, packed.config.vocab_size, (1, 9))
    np.testing.assert_array_equal(packed(input_ids=ids).logits, unpacked(input_ids=ids).logits)
    def allocations(model) -> set:
        return {id(p.base) if p.base is not None else id(p) for _, p in model.named_parameters()}

    assert len(allocations(packed)) == 1  # every weight a view of the one packed buffer
    assert len(allocations(unpacked)) > 1  # each its own allocation (fused matrices shared)


def test_projections_benchmark_compares_the_same_work_and_prints_every_cell(capsys):
    """benchmarks/projections.py on 2 layers, 1 round: every (framework, m, group) cell and every (framework,
    m) layout cell printed, and the two ways of each agree (it refuses to time them otherwise). m = 3 is where OpenBLAS's
    small-m kernel makes the fused q|k|v differ from the separate one by a few ulps."""
    spec = importlib.util.spec_from_file_location("projections", os.path.join(ROOT, "benchmarks", "projections.py"))
    projections = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(projections)
    projections.main(["--rows", "1", "3", "--rounds", "1", "--layers", "2"])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| NumPy") or line.startswith("| torch")]
    assert len(rows) == 2 * 2 * 2 + 2 * 2, rows  # frameworks × m × groups, then frameworks × m for the layouts
    assert all(line.rstrip().endswith(("bit-equal |", "ulps of max|y| |")) for line in rows), rows
    # the separate GEMMs read row blocks of the fused matrix: the layout the fused model's modules hold
    fused, views = projections.layer_weights("numpy", np.random.default_rng(0), 1)[0]["q|k|v"]
    assert all(np.shares_memory(view, fused) for view in views) and sum(v.shape[0] for v in views) == fused.shape[0]



def test_exp_yardstick_times_one_core_and_restores_torchs_threads():
    """benchmarks/machine.py's elementwise yardstick (the README cites it): ns per float32 exp, in NumPy and
    in torch with one thread, which it gives back afterwards."""
    import sys

    import torch

    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import machine
    finally:
        sys.path.pop(0)
    threads = torch.get_num_threads()
    for framework in ("numpy", "torch"):
        ns = machine.exp_ns_per_element(framework, n=2 ** 14, min_seconds=0.01)
        assert 0 < ns < 1e3, (framework, ns)
    assert torch.get_num_threads() == threads


def test_vision_benchmark_numpy_only_never_imports_torch_and_counts_faults():
    """benchmarks/vision.py --numpy-only: the NumPy row (forward, GEMMs, ratio, page faults a forward) from a
    process that never imports torch, as `minivl describe-image` runs, with the allocator's state named."""
    import subprocess
    import sys

    code = ("import runpy, sys; sys.argv = ['vision.py', '--numpy-only', '--size', '56', '--repeats', '2']; "
            "runpy.run_path('benchmarks/vision.py', run_name='__main__'); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    rows = [line for line in out.splitlines() if line.startswith("| NumPy")]
    assert len(rows) == 1 and not any(line.startswith("| torch") for line in out.splitlines()), out
    forward, gemms, ratio, faults = (cell.strip() for cell in rows[0].split("|")[2:6])
    assert float(forward) >= 0 and gemms.endswith("(NumPy)") and ratio.endswith("×") and int(faults) >= 0, rows
    assert "malloc's thresholds: fixed by minivl/allocator.py" in out or not sys.platform.startswith("linux"), out
    assert out.splitlines()[-1] == "False", out  # torch never imported


def test_vision_benchmark_gemm_shapes_at_batch_one_and_seven():
    """vision.py's yardstick: DINOv2-S/14 at 448 px (32² = 1024 patches + CLS), worked out by hand from the
    architecture; 7 tiles stack their tokens in every projection and add one q·kᵀ and p·v per (tile, head)."""
    from types import SimpleNamespace

    spec = importlib.util.spec_from_file_location("vision_bench", os.path.join(ROOT, "benchmarks", "vision.py"))
    vision = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(vision)
    config = SimpleNamespace(hidden_size=384, patch_size=14, num_attention_heads=6, num_channels=3,
                             intermediate_size=1536, num_hidden_layers=12)
    for batch in (1, 7):
        shapes = vision.vit_gemm_shapes(config, 448, 448, batch)
        layer = [(batch * 1025, 384, 1152), (batch * 6, 1025, 64, 1025), (batch * 6, 1025, 1025, 64),
                 (batch * 1025, 384, 384), (batch * 1025, 384, 1536), (batch * 1025, 1536, 384)]
        assert shapes == [(batch * 1024, 588, 384)] + layer * 12, batch
    assert vision.vit_gemm_shapes(config, 448, 448) == vision.vit_gemm_shapes(config, 448, 448, 1)


def test_breakdown_times_each_stage_inside_the_model_and_restores_it(tmp_path):
    """benchmarks/breakdown.py on a tiny Llama: each stage counted once per call the model makes (q|k|v
    and gate|up one `linear` each, plus o, down and the LM head), none counted outside the measured part
    (a decode run's prefill), the stages adding up to no more than the forward, every function restored."""
    import minivl

    spec = importlib.util.spec_from_file_location("breakdown", os.path.join(ROOT, "benchmarks", "breakdown.py"))
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    model = minivl.load_model(write_tiny_llm(tmp_path / "llama", "llama"), dtype="float32")
    layers = model.config.num_hidden_layers
    stages = {**breakdown.prefill_stages(), **breakdown.decode_stages()}
    before = {stage: getattr(module, name) for stage, (module, name) in stages.items()}
    ids = np.arange(1, 41, dtype=np.int64)[None]

    def prefill(measured):
        with measured():
            model(input_ids=ids, use_cache=True, logits_to_keep=1)

    total, times, calls = breakdown.breakdown(prefill, breakdown.prefill_stages(), repeats=2)
    assert calls == {"projections and LM head (linear)": 4 * layers + 1, "attention (causal_attention_blocks)": layers,
                     "silu_mul": layers, "RMS norms (rms_norm_fast)": 2 * layers + 1,
                     "RoPE (apply_rope_fast)": 2 * layers}, calls
    assert 0 < sum(times.values()) <= total

    def decode(measured):
        cache = model(input_ids=ids, use_cache=True).past_key_values  # not measured: not counted
        with measured():
            for token in (5, 6, 7):
                model(input_ids=np.array([[token]]), past_key_values=cache, use_cache=True)

    total, times, calls = breakdown.breakdown(decode, breakdown.decode_stages(), repeats=2, per_run=3)
    assert calls == {"the layers' GEMVs (_linear)": 4 * layers, "LM head (linear)": 1, "attention (_attend)": layers,
                     "RMS norms (_rms_norm)": 2 * layers, "SiLU · up (_silu_mul)": layers, "RoPE (_rope)": layers,
                     "the plan (decode_plan)": 1}, calls
    assert 0 < sum(times.values()) <= total
    assert {stage: getattr(module, name) for stage, (module, name) in stages.items()} == before


def test_breakdown_times_each_vision_stage_the_vit_calls(tmp_path):
    """benchmarks/breakdown.py's ViT stages on a tiny InternViT-300M (LayerNorm blocks, as DINOv2's): each
    stage is a function the forward calls, once per call (qkv, proj, fc1 and fc2 one `linear` each; two
    LayerNorms and one attention and GELU a layer), so no stage reads 0 ms because the model calls
    another function now; every function restored."""
    import minivl
    from minivl.tiny.vision import write_tiny_vit

    spec = importlib.util.spec_from_file_location("breakdown", os.path.join(ROOT, "benchmarks", "breakdown.py"))
    breakdown = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(breakdown)
    vit = minivl.load_model(write_tiny_vit(tmp_path / "vit", "300m"), dtype="float32")
    layers, size = vit.config.num_hidden_layers, vit.config.image_size
    before = {stage: getattr(module, name) for stage, (module, name) in breakdown.vision_stages().items()}
    pixels = np.random.default_rng(0).standard_normal((1, 3, size, size), dtype=np.float32)

    def vision(measured):
        with measured():
            vit(pixels)

    total, times, calls = breakdown.breakdown(vision, breakdown.vision_stages(), repeats=2)
    assert calls == {"projections (linear)": 4 * layers, "attention (attention_blocks)": layers,
                     "GELU (gelu_fast)": layers, "LayerNorms (layer_norm_fast)": 2 * layers}, calls
    assert 0 < sum(times.values()) <= total
    assert {stage: getattr(module, name) for stage, (module, name) in breakdown.vision_stages().items()} == before


def load_benchmark(name):
    """A benchmarks/ script as a module (they import benchmarks/machine.py by its bare name)."""
    import sys

    saved = list(sys.path)  # (a script also puts its own folder first on the path)
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path[:] = saved
    return module


class _SteppedModel:
    """A stand-in for a causal LM under benchmarks/smollm2.py's decode timing: each call advances a fake
    clock by the time `step_ms` gives for that call (a prefill, then the cached steps), and returns a cache."""

    def __init__(self, step_ms):
        self.step_ms, self.calls, self.now = step_ms, 0, 0.0

    def clock(self):
        return self.now

    def forward(self, input_ids, use_cache=False, past_key_values=None, logits_to_keep=0):
        assert use_cache and (past_key_values is not None or input_ids.shape[1] > 1)
        assert past_key_values is None or input_ids.shape[1] == 1  # a cached step feeds one token
        self.now += self.step_ms(self.calls) / 1e3
        self.calls += 1
        return type("Out", (), {"past_key_values": ("cache", self.calls)})()

    __call__ = forward


def test_decode_timing_takes_a_runs_median_step_so_a_stolen_step_does_not_count():
    """bench_decode: per-token time = the median of a run's step times, the best run after a warm-up, every
    timed run's steps handed back. One 60 ms step among 1 ms ones (the hypervisor took the CPUs) moves a
    mean by 3.7 ms a token and the median not at all. A fake clock: no real time is measured."""
    smollm2 = load_benchmark("smollm2")
    calls_a_run = 1 + 16  # a prefill, then 16 cached steps

    def step_ms(call):  # run 0 = the warm-up; in run 1 the 5th step is stolen; run 2's steps take 2 ms
        run, index = divmod(call, calls_a_run)
        if index == 0:
            return 50.0  # the prefill, never timed
        return {1: 60.0 if index == 5 else 1.0, 2: 2.0}.get(run, 1.0)

    model = _SteppedModel(step_ms)
    runs = []
    seconds = smollm2.bench_decode(model, np.asarray, np.ones((1, 64), np.int64), 16, 2, clock=model.clock, runs=runs)
    assert model.calls == 3 * calls_a_run  # warm-up + 2 timed runs
    assert len(runs) == 2 and all(len(steps) == len(stolen) == 16 for steps, stolen in runs)
    assert np.allclose(runs[0][0], [1e-3] * 4 + [60e-3] + [1e-3] * 11) and np.allclose(runs[1][0], 2e-3)
    assert abs(seconds - 1e-3) < 1e-12  # run 1's median; its mean would be 4.7 ms, run 2's 2 ms
    # the steal read around each step: ticks (Linux) or None (no /proc/stat)
    assert all(ticks is None or ticks >= 0 for _, stolen in runs for ticks in stolen)
    steps = runs[0][0]
    assert smollm2.outliers([(steps, [0] * 16)]) == "1 of 16 (up to 60.0× the median; 0 with ticks stolen)"
    assert smollm2.outliers([(steps, [0] * 4 + [6] + [0] * 11)]) == "1 of 16 (up to 60.0× the median; 1 with ticks stolen)"
    assert smollm2.outliers([(steps, [None] * 16), runs[1]]) == "1 of 32 (up to 60.0× the median)"
    assert smollm2.outliers([runs[1]]) == "0 of 16"


def test_steal_share_is_read_from_proc_stat_fields():
    """benchmarks/machine.py reads the hypervisor's steal time from /proc/stat's first line: user nice
    system idle iowait irq softirq steal, in ticks; the share is stolen ticks over all ticks elapsed."""
    machine = load_benchmark("machine")
    before = machine.cpu_ticks("cpu  100 0 50 800 10 0 5 35 0 0")
    after = machine.cpu_ticks("cpu  160 0 70 900 10 0 5 55 0 0")
    assert before == {"busy": 155, "idle": 810, "steal": 35}
    # 80 busy + 100 idle + 20 stolen ticks elapsed: 10 %
    assert machine.steal_percent(before, after) == 10.0
    assert machine.describe_steal(before, after) == "; the hypervisor stole 10.0 % of the CPU time during the run (/proc/stat)"
    for text in ("intr 1 2 3 4 5 6 7 8 9", "cpu  1 2 3", "cpu  a b c d e f g h"):
        assert machine.cpu_ticks(text) is None, text
    assert machine.steal_percent(None, after) is None and machine.describe_steal(before, None) == ""
    here = machine.cpu_ticks()  # this machine: Linux has the file (CI runs on Linux); elsewhere None
    assert here is None or set(here) == {"busy", "idle", "steal"}
