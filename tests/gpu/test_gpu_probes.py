"""What only a GPU can show: lazy module loading against a pending kernel, stream races under delays (with a negative
control), and a user's residual network with dropout bit-identical across stages (issue: runs that survive, item 6).

Estimated time on one H100: the probe ~20 s (two fresh processes), the stress runs ~60 s (four small runs), the
residual network ~40 s (a reference and three pipelines).
"""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from pipeline.run.launcher import launch
from test_equivalence import _assert_same, _mlp, _results
from test_network import _residual

pytestmark = pytest.mark.cuda
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# A fresh process: a kernel that spins for SPIN_S on a side stream stands in for a pending NCCL receive (which spins
# until its peer sends, and the peer may wait for this process). Then the process's first training step and first
# eval pass, whose kernels are loaded at their first launch under lazy loading. If loading one waits for the
# spinning kernel, the step takes about SPIN_S: with a real pending receive that would be a deadlock.
PROBE = textwrap.dedent("""
    import json, sys, time, torch
    from pipeline.block.blocks import evaluate_blocks, train_blocks
    from pipeline.model.factories import build_blocks
    sys.path.insert(0, "tests")
    from helpers import small_config
    SPIN_S = 4.0
    torch.cuda.init()
    calibrate = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    calibrate[0].record(); torch.cuda._sleep(10 ** 7); calibrate[1].record(); torch.cuda.synchronize()
    cycles = int(10 ** 7 * SPIN_S / (calibrate[0].elapsed_time(calibrate[1]) / 1e3))
    cfg = small_config(model="vgg8b", like="cifar10", model__num_layers=1, model__num_hidden=32,
                       model__feat_mult=0.25, run__device="cuda")
    blocks = build_blocks(cfg, (3, 32, 32), 10, device=torch.device("cuda"))
    x, y = torch.randn(16, 3, 32, 32, device="cuda"), torch.randint(0, 10, (16,), device="cuda")
    torch.cuda.synchronize()
    side, compute = torch.cuda.Stream(), torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(cycles)  # the stand-in for a pending receive
    times = {}
    with torch.cuda.stream(compute):
        for name, step in (("first_train_step_s", lambda: train_blocks(blocks, x, y)),
                           ("first_eval_pass_s", lambda: evaluate_blocks(blocks, x, y))):
            started = time.perf_counter()
            step()
            compute.synchronize()  # this stream only
            times[name] = time.perf_counter() - started
    side_done = side.query()
    torch.cuda.synchronize()
    print(json.dumps({"spin_s": SPIN_S, **times, "spin_done_before_the_step": side_done}))
""")


def _probe(loading):
    env = {**os.environ, "CUDA_MODULE_LOADING": loading, "PYTHONPATH": f"{ROOT}:{ROOT}/tests"}
    proc = subprocess.run([sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.timeout(300)
def test_first_time_kernels_do_not_wait_for_a_pending_kernel_on_another_stream():
    """[Note: no receive left posted on a gradient link]: a gradient link posts its receive only while a batch
    awaits it; what is left of the hazard is a first batch whose kernels load lazily while that receive spins.
    If this fails under LAZY but not EAGER, stages with gradient links must set CUDA_MODULE_LOADING=EAGER."""
    results = {loading: _probe(loading) for loading in ("LAZY", "EAGER")}
    print(json.dumps(results))
    for loading, result in results.items():
        slowest = max(result["first_train_step_s"], result["first_eval_pass_s"])
        assert slowest < 0.5 * result["spin_s"], f"{loading}: a first-time kernel waited for the spinning one: {result}"


# Loaded into every stage process (PYTHONPATH), it delays each producer before it marks a hand-off ready and each
# consumer after it accepts one: a missing wait reads data still being written, a missing record_stream lets the
# producer's allocator reuse memory the consumer has yet to read. SKIP_WAIT drops the consumer's wait: the control.
STRESS = textwrap.dedent("""
    import os, torch
    import pipeline.engine.cuda_streams as streams
    CYCLES = 2 * 10 ** 6  # about a millisecond on an H100
    record, accept = streams.CudaStreams.record, streams.CudaStreams.accept
    def delayed_record(self):
        torch.cuda._sleep(CYCLES)
        return record(self)
    def delayed_accept(self, tensors, ready):
        accept(self, tensors, None if os.environ.get("STRESS_SKIP_WAIT") else ready)
        torch.cuda._sleep(CYCLES)
    streams.CudaStreams.record, streams.CudaStreams.accept = delayed_record, delayed_accept
""")


@pytest.fixture
def stressed(tmp_path, monkeypatch, one_gpu):
    folder = tmp_path / "stress"
    folder.mkdir()
    (folder / "sitecustomize.py").write_text(STRESS)
    monkeypatch.setenv("PYTHONPATH", f"{folder}:{ROOT}:{os.environ.get('PYTHONPATH', '')}")
    return monkeypatch


def _mlp_gpu(**kw):
    return _mlp(run__device="cuda", run__deterministic=True, pipeline__stall_timeout=60.0, **kw)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("sizes,precision", [((1.5, 2.5), "fp32"), (("1.5h", 2.5), "fp32"), ((2, 2), "bf16")],
                         ids=["split-heads", "heads-first", "bf16"])
def test_delayed_streams_stay_bit_identical(sequential_reference, stressed, tmp_path, sizes, precision):
    make = lambda **kw: _mlp_gpu(run__precision=precision, **kw)  # noqa: E731
    cfg = make(pipeline__stages=2, pipeline__partition=sizes, pipeline__transport="zmq", run__out=str(tmp_path))
    assert launch(cfg) == 0
    _assert_same(_results(tmp_path), sequential_reference(f"mlp-{precision}", make))


@pytest.mark.timeout(300)
def test_the_stress_catches_a_skipped_wait(sequential_reference, stressed, tmp_path):
    """The negative control: the same delays with the consumer's wait skipped must change the numbers."""
    stressed.setenv("STRESS_SKIP_WAIT", "1")
    cfg = _mlp_gpu(pipeline__stages=2, pipeline__partition=(1.5, 2.5), pipeline__transport="zmq", run__out=str(tmp_path))
    code = launch(cfg)
    if code == 0:
        with pytest.raises(AssertionError):
            _assert_same(_results(tmp_path), sequential_reference("mlp-fp32", _mlp_gpu))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("stages,partition", [(3, None), (2, (1.5, 2.5)), (2, ("1.5h", 2.5))], ids=["3", "1.5,2.5", "1.5h,2.5"])
def test_a_residual_network_with_dropout_is_bit_identical_on_the_gpu(sequential_reference, one_gpu, tmp_path, stages, partition):
    """tests/networks/residual.py (its dropout draws through each block's own generator) under --deterministic."""
    make = lambda **kw: _residual(run__device="cuda", run__deterministic=True, pipeline__stall_timeout=60.0, **kw)  # noqa: E731
    cfg = make(pipeline__stages=stages, pipeline__partition=partition, pipeline__transport="zmq", run__out=str(tmp_path))
    assert launch(cfg) == 0
    _assert_same(_results(tmp_path), sequential_reference("residual", make))
