"""The benchmark scripts run (CI-sized) and write rows of the documented shape. No timing
assertions: performance is measured by `make bench`, not tested."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO_ROOT

BENCH = REPO_ROOT / "bench"


def run_script(name, *args):
    done = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]
    return done.stdout


def read_rows(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_loss_bench_quick(tmp_path):
    out = tmp_path / "loss.jsonl"
    stdout = run_script("bench_loss.py", "--quick", "--methods", "ekd/reference", "rkd/reference", "floor",
                        "--out", str(out))
    rows = [r for r in read_rows(out) if "note" not in r]
    assert {r["name"] for r in rows} == {"ekd/reference", "rkd/reference", "floor"}
    assert {r["batch"] for r in rows if r["name"] == "ekd/reference"} == {64, 128}
    for r in rows:
        for key in ("device", "torch", "commit", "date", "dim", "dtype", "peak_memory_bytes"):
            assert key in r, key
        for part in ("forward_backward", "forward"):
            assert r[part]["p20_s"] <= r[part]["median_s"] <= r[part]["p80_s"]
    assert "ratios" in stdout and "| B |" in stdout


@pytest.mark.parametrize("script, argv, expected", [
    ("bench_loss", ["--quick", "--device", "cpu", "--methods", "ekd/reference", "floor"],
     [("ekd/reference", 64), ("ekd/reference", 128), ("floor", 64), ("floor", 128)]),
    ("bench_train_step", ["--quick", "--batches", "2", "--methods", "baseline", "ekd/reference"],
     [("baseline", 4), ("ekd/reference", 4)]),
], ids=["loss", "train_step"])
def test_bench_keeps_the_rows_of_a_run_cut_short(tmp_path, monkeypatch, script, argv, expected):
    """Rows are appended as soon as they are measured (a B and dtype's, a batch size's): a run
    stopped by a time limit (a GPU lease kills it; the training step's once lost every row) keeps
    every row it finished, not none.  Here the run dies at its report, after the last one."""
    monkeypatch.syspath_prepend(str(BENCH))
    module = __import__(script)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("the lease's time limit")

    monkeypatch.setattr(module, "print_report", killed)
    out = tmp_path / "rows.jsonl"
    with pytest.raises(KeyboardInterrupt):
        module.main(argv + ["--out", str(out)])
    rows = [r for r in read_rows(out) if "note" not in r]
    assert sorted((r.get("name", r.get("setting")), r["batch"]) for r in rows) == sorted(expected)


def test_loss_bench_methods_take_turns(monkeypatch):
    """At each B and dtype the methods are timed in turns (blocks of their repeats, --rounds times),
    not one after another: on a machine whose load drifts, a ratio must not depend on the order.
    A +compile method (Dynamo's caches are reset when one is made) is timed after them, alone."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss

    calls = []

    def method(name):
        def factory():
            def forward_backward(student, teacher, labels):
                calls.append((name, "fb"))

            def forward(student, teacher, labels):
                calls.append((name, "fw"))
            return forward_backward, forward
        return factory

    names = ["ekd/a", "ekd/b+compile", "floor"]
    rows, stopped = bench_loss.run({n: method(n) for n in names}, [16], 8, [torch.float32], torch.device("cpu"),
                                   repeats=4, budget_s=60, env={}, rounds=2)
    assert not stopped, stopped
    timed = calls[3:]  # after ekd/a's warm-up (forward+backward, forward, forward+backward)
    blocks = []  # the runs of one method's calls, in order
    for name, _ in timed:
        if not blocks or blocks[-1][0] != name:
            blocks.append([name, 0])
        blocks[-1][1] += 1
    warm_up = 3
    assert blocks == [["floor", warm_up], ["ekd/a", 4], ["floor", 4], ["ekd/a", 4], ["floor", 4],
                      ["ekd/b+compile", warm_up + 8]], blocks
    assert [(r["name"], r["rounds"], r["forward_backward"]["repeats"], r["forward"]["repeats"]) for r in rows] == [
        ("ekd/a", 2, 4, 4), ("floor", 2, 4, 4), ("ekd/b+compile", 2, 4, 4)]


def test_losses_bench_methods_take_turns(monkeypatch, tmp_path):
    """bench_losses.py times the losses in turns too (it timed one after another, so the fast
    RKD's speedup over the reference could owe its size to the load of the minute each ran in);
    a small real run writes its rows with their rounds, and the speedup note."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_losses

    calls = []

    def method(name):
        def loss(student, teacher, labels):
            calls.append(name)
            return (student * 0).sum()
        return (lambda dim: loss), 1, lambda b, d: 0

    monkeypatch.setattr(bench_losses, "METHODS", {name: method(name) for name in ("a", "b")})
    rows, stopped = bench_losses.run(["a", "b"], [16], 8, repeats=4, budget_s=60, rkd_budget_s=60, env={}, rounds=2)
    assert not stopped, stopped
    blocks = []  # runs of one method's calls, in order: each warm-up (one call), then the turns
    for name in calls:
        if not blocks or blocks[-1][0] != name:
            blocks.append([name, 0])
        blocks[-1][1] += 1
    # a round times a block of 2 forward+backward and 2 forward calls of each method in turn
    assert blocks == [["a", 1], ["b", 1], ["a", 4], ["b", 4], ["a", 4], ["b", 4]], blocks
    assert [(r["name"], r["rounds"], r["forward_backward"]["repeats"]) for r in rows] == [("a", 2, 4), ("b", 2, 4)]

    monkeypatch.undo()
    out = tmp_path / "losses.jsonl"
    stdout = run_script("bench_losses.py", "--sizes", "8", "--dim", "16", "--repeats", "2", "--threads", "1",
                        "--methods", "rkd/fast", "rkd/reference", "--out", str(out))
    rows = read_rows(out)
    assert sorted((r["name"], r["rounds"]) for r in rows if "note" not in r) == [("rkd/fast", 2), ("rkd/reference", 2)]
    assert [r["batch"] for r in rows if r.get("note") == "rkd_fast_speedup"] == [8] and "faster than" in stdout


def test_loss_bench_never_times_a_first_forward(monkeypatch):
    """A method whose first forward+backward takes the whole budget still has its forward called
    once before the timing: a graph method captures its forward graph at that call, a compile
    method compiles it (the timed median was half a capture when the repeats were 2)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss

    calls = []

    def slow():
        return (lambda *inputs: calls.append("fb")), (lambda *inputs: calls.append("fw"))

    rows, stopped = bench_loss.run({"ekd/slow": slow}, [16], 8, [torch.float32], torch.device("cpu"), repeats=4,
                                   budget_s=1e-12, env={}, rounds=2)
    assert not stopped and rows[0]["forward"]["repeats"] == 2
    assert calls[:2] == ["fb", "fw"] and calls[2:] == ["fb", "fw"] * 2, calls


def test_loss_bench_lists_the_methods_of_a_backend_that_cannot_run_as_skipped(monkeypatch):
    """A GPU whose CUDA ops failed to build: the csrc methods made from the csrc backend (graphed,
    tensor cores, compiled) are skipped with its reason, so a --methods list naming them (the
    lease's) measures the others instead of stopping on "unknown methods" before any row."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss

    def resolve(name, device):
        if name == "csrc":
            raise RuntimeError("the CUDA ops were not built")

    monkeypatch.setattr(bench_loss, "resolve_backend", resolve)
    methods, skipped = bench_loss.all_methods(torch.device("cuda"))
    csrc = {"ekd/csrc", "ekd/csrc+graph", "ekd/csrc+tc", "ekd/csrc+mma", "ekd/csrc+compile"}
    assert {name: skipped[name] for name in csrc} == {name: "the CUDA ops were not built" for name in csrc}
    assert not csrc & set(methods)
    assert {"ekd/triton", "ekd/triton+graph", "ekd/triton+compile", "floor", "floor/tf32"} <= set(methods)


def test_loss_bench_a_method_failing_in_its_turn_stops_alone(monkeypatch):
    """A method that raises while the methods take turns (after a warm-up that went well: memory
    filling up at a later call) stops with its reason; the others keep their rows."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss

    count = {"n": 0}

    def flaky():
        def forward_backward(student, teacher, labels):
            count["n"] += 1
            if count["n"] > 3:
                raise RuntimeError("CUDA out of memory (a stand-in)")
        return forward_backward, lambda *inputs: None

    methods = {"ekd/flaky": flaky, "floor": bench_loss.floor_method}
    rows, stopped = bench_loss.run(methods, [16], 8, [torch.float32], torch.device("cpu"), repeats=4, budget_s=60,
                                   env={}, rounds=2)
    assert [r["name"] for r in rows] == ["floor"]
    assert "RuntimeError: CUDA out of memory (a stand-in)" in stopped[("ekd/flaky", torch.float32)]


def test_with_environ_sets_the_variables_for_each_call_only(monkeypatch):
    """bench_loss's ekd/csrc+tc sets EKD_CUDA_TENSOR_CORES around each call of the loss (the csrc
    CUDA op reads it at every call) and restores what was there, also when the call raises: the
    other methods of the run must see the default."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss

    name = "EKD_CUDA_TENSOR_CORES"
    seen = []

    def loss(fail):
        seen.append(os.environ.get(name))
        if fail:
            raise RuntimeError("refused")
        return 1

    wrapped = bench_loss.with_environ(loss, {name: "1"})
    for before in (None, "0"):
        if before is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, before)
        assert wrapped(False) == 1
        with pytest.raises(RuntimeError, match="refused"):
            wrapped(True)
        assert os.environ.get(name) == before
    assert seen == ["1"] * 4


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
@pytest.mark.parametrize("backend", ["triton", "csrc"])
def test_loss_bench_graph_method_replays_the_eager_steps(monkeypatch, backend):
    """The benchmark's graphed method runs the loss it claims to time: its first forward+backward
    (two warm-up calls, the capture, one replay) and one more on another batch leave the module's
    EMA state bitwise where the same four calls leave an eager module's.  Fails when a replay
    runs nothing, or a call's inputs are not copied in."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss
    from ekd_kernels import EKDLoss
    from ekd_kernels.backends import available_backends

    device = torch.device("cuda")
    if backend not in available_backends(device):
        pytest.skip(f"the {backend} backend is not built here")
    student, teacher, labels = bench_loss.make_inputs(256, 64, torch.float32, device, seed=3)
    other = bench_loss.make_inputs(256, 64, torch.float32, device, seed=4)
    captured, eager = EKDLoss(backend=backend).to(device), EKDLoss(backend=backend).to(device)
    forward_backward, _ = bench_loss.ekd_graph_method(backend, device, crit=captured)
    forward_backward(student, teacher, labels)
    forward_backward(*other)
    for inputs in (student, teacher, labels), (student, teacher, labels), (student, teacher, labels), other:
        leaf = inputs[0].detach().clone().requires_grad_(True)
        eager(leaf, *inputs[1:]).backward()
    torch.cuda.synchronize()
    assert torch.equal(captured.student_thresholds, eager.student_thresholds)
    assert torch.equal(captured.teacher_thresholds, eager.teacher_thresholds)


def _compile_backend_or_skip(backend):
    """The device the compile method's tests use, after skipping a backend not run compiled there."""
    from ekd_kernels.backends import available_backends

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if backend not in available_backends(device) or (device.type == "cpu" and backend == "triton"):
        pytest.skip(f"the {backend} backend is not run compiled on {device.type} here (the interpreter: slow)")
    return device


@pytest.mark.parametrize("backend", ["triton", "csrc"])
def test_loss_bench_compile_graph_method_runs_the_eager_steps(monkeypatch, backend):
    """The benchmark's torch.compile(mode="reduce-overhead") method runs the loss it claims to
    time: forward+backward calls on two batches (the first of each shape run three times: compile,
    warm-up, recording; then replays) and a forward under no_grad leave the module's EMA state
    where the same eager calls leave it (inductor may round the EMA's update differently: the
    golden threshold tolerance).  On a CPU (no CUDA graphs there) the csrc backend runs the same
    compiled path."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_loss
    from helpers import THRESHOLD_ATOL
    from ekd_kernels import EKDLoss

    device = _compile_backend_or_skip(backend)
    first, other = (bench_loss.make_inputs(256, 64, torch.float32, device, seed=seed) for seed in (3, 4))
    second = bench_loss.make_inputs(192, 64, torch.float32, device, seed=5)
    compiled, eager = EKDLoss(backend=backend).to(device), EKDLoss(backend=backend).to(device)
    forward_backward, forward = bench_loss.ekd_compile_method(backend, device, crit=compiled)
    # (inputs, eager calls it stands for): a shape's first call runs three times
    for inputs, calls in ((first, 3), (first, 1), (other, 1), (second, 3)):
        forward_backward(*inputs)
        for _ in range(calls):
            leaf = inputs[0].detach().clone().requires_grad_(True)
            eager(leaf, *inputs[1:]).backward()
    forward(*other)  # training mode: the forward updates the state too
    with torch.no_grad():
        for _ in range(3):
            eager(*other)
    for name in ("student_thresholds", "teacher_thresholds"):
        torch.testing.assert_close(getattr(compiled, name), getattr(eager, name), rtol=0, atol=THRESHOLD_ATOL)
    assert not torch.equal(compiled.student_thresholds, EKDLoss(backend=backend).to(device).student_thresholds)


def test_loss_bench_compile_method_keeps_going_past_the_recompile_limit(monkeypatch):
    """The driver makes a compile method per B and dtype, all compiling the same code: with dynamo's
    recompile limit (here lowered to 2: two sizes reach it) the method must still measure every
    size, not raise on the third compile."""
    monkeypatch.syspath_prepend(str(BENCH))
    import torch._dynamo
    import bench_loss

    device = _compile_backend_or_skip("csrc")
    methods = {"ekd/csrc+compile": lambda: bench_loss.ekd_compile_method("csrc", device)}
    # (torch < 2.7 calls the limit cache_size_limit)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"
    with torch._dynamo.config.patch(**{limit: 2}):
        rows, stopped = bench_loss.run(methods, [24, 40], 32, [torch.float32], device, repeats=2, budget_s=60,
                                       env={})
    assert not stopped, stopped
    assert [r["batch"] for r in rows] == [24, 40]


def test_train_step_bench_quick(tmp_path):
    out = tmp_path / "train.jsonl"
    run_script("bench_train_step.py", "--quick", "--batches", "2", "--methods", "baseline", "ekd/reference",
               "--out", str(out))
    rows = [r for r in read_rows(out) if "note" not in r]
    assert [r["setting"] for r in rows] == ["baseline", "ekd/reference"]
    assert rows[0]["loss_share"] is None and 0 < rows[1]["loss_share"]
    assert all(r["batch"] == 4 for r in rows)
    assert all(r["rounds"] == 2 for r in rows)  # the settings interleaved (--quick: 2 repeats, 2 rounds)


@pytest.mark.parametrize("general", [1, 2, 4, 5, 6, 7, 10])
def test_train_step_batch_has_a_label_per_image(general):
    """`--batches N` for N not a multiple of 4: the balanced half had 4 * (N // 4) labels for its
    N images, and the step raised a ValueError that stopped the whole benchmark."""
    sys.path.insert(0, str(BENCH))
    import bench_train_step

    images, labels = bench_train_step.make_batch(general, 1000, "cpu", seed=general)
    assert images.shape[0] == labels.shape[0] == 2 * general
    balanced = labels[general:]
    assert all(int((balanced == label).sum()) <= 4 for label in balanced.unique())


@pytest.mark.parametrize("argv,match", [(["--methods", "ekd/refrence"], "unknown methods"),
                                        (["--batches", "0"], "--batches")])
def test_train_step_bench_refuses_what_it_cannot_measure(tmp_path, argv, match):
    """A misspelt method measured nothing and exited 0 ("appended 0 rows")."""
    done = subprocess.run([sys.executable, str(BENCH / "bench_train_step.py"), "--quick", *argv, "--out",
                           str(tmp_path / "rows.jsonl")], capture_output=True, text=True, timeout=600)
    assert done.returncode == 2 and match in done.stderr, done.stderr[-2000:]


@pytest.mark.parametrize("script,argv,match", [
    ("bench/bench_losses.py", ["--quick", "--budget-s", "-1"], "must be above 0.0"),
    ("bench/bench_losses.py", ["--quick", "--repeats", "0"], "must be at least 1"),
    ("bench/bench_losses.py", ["--quick", "--sizes", "1"], "must be at least 2"),
    ("bench/bench_metrics.py", ["--per-identity", "0"], "must be at least 2"),
    ("bench/bench_distributed.py", ["--world", "0"], "must be at least 1"),
    ("bench/bench_csrc_cpu.py", ["1"], "must be at least 2"),
    ("bench/plot.py", ["--results", "no_such_folder"], "is not a folder"),
    ("tools/ensure_deps.py", ["--bogus"], "unrecognized arguments"),
    ("tools/interpreter_cost.py", ["32", "--calls", "0"], "must be at least 1"),
    ("tools/host_cost.py", ["16", "--repeats", "-1"], "must be at least 1"),
    ("tools/gpu_exercise.py", ["profile", "--sizes", "48", "--rounds", "0"], "must be at least 1"),
])
def test_scripts_refuse_counts_that_measure_nothing(tmp_path, script, argv, match):
    """A zero or negative count or budget, or a missing folder, ran and measured nothing with exit
    status 0 (or died in a traceback after the run's progress); ensure_deps ignored its arguments
    (its --help ran the installer).  Each is refused by argparse: exit status 2, named."""
    # (--out under tmp_path: a regression that ran anyway must not write into bench/results/)
    writes = ("bench/bench_losses.py", "bench/bench_metrics.py", "bench/bench_distributed.py")
    out = ["--out", str(tmp_path / "out.json")] if script in writes else []
    done = subprocess.run([sys.executable, str(REPO_ROOT / script), *argv, *out], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert done.returncode == 2 and match in done.stderr, (done.returncode, done.stderr[-2000:])


@pytest.mark.parametrize("script", ["tools/ensure_deps.py", "tools/kernel_registers.py", "bench/bench_csrc_cpu.py",
                                    "tools/pytest_workers.py"])
def test_scripts_print_their_help(script):
    """--help printed usage for none of these: ensure_deps installed, kernel_registers took it for a
    variant name, bench_csrc_cpu for a batch size."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / script), "--help"], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0 and done.stdout.startswith("usage:"), done.stdout[-2000:] + done.stderr[-2000:]


def test_benchmark_json_goes_into_a_folder_given_as_out(tmp_path):
    """bench_metrics (and bench_distributed) wrote their JSON to --out as a file: a folder raised
    IsADirectoryError after the whole run, losing it."""
    run_script("bench_metrics.py", "--sizes", "64", "--dim", "8", "--sort-limit", "0", "--threads", "1",
               "--out", str(tmp_path))
    (written,) = tmp_path.glob("metrics_*.json")
    record = json.loads(written.read_text())
    assert record["rows"]
    # (and the provenance every benchmark records: the commit and versions were missing here)
    assert {"device", "commit", "torch", "python", "threads"} <= set(record)


def test_distributed_bench_keeps_every_row_and_takes_turns(tmp_path):
    """bench_distributed gave each rank B // W rows, dropping the last B mod W of the global batch
    it reported, and timed its paths one after another (its speedups were ratios over different
    minutes): now the first B mod W ranks hold one more row, and the paths take turns."""
    run_script("bench_distributed.py", "--world", "2", "--batch", "9", "--dim", "8", "--repeats", "2",
               "--paths", "redundant", "sharded", "--out", str(tmp_path / "d.json"))
    per_rank = json.loads((tmp_path / "d.json").read_text())["per_rank"]
    assert {rank: {path: (r["rows"], r["repeats"], r["rounds"]) for path, r in paths.items()}
            for rank, paths in per_rank.items()} == {"0": {"redundant": (5, 2, 2), "sharded": (5, 2, 2)},
                                                     "1": {"redundant": (4, 2, 2), "sharded": (4, 2, 2)}}
    done = subprocess.run([sys.executable, str(BENCH / "bench_distributed.py"), "--world", "3", "--batch", "2"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "gives a rank no rows" in done.stderr, done.stderr[-2000:]


def test_gpu_exercise_profile_keeps_its_failures(tmp_path):
    """profile with every variant failing (the Triton backend on a CPU without the interpreter)
    exited 0 and wrote no --out file: a lease read it as measured.  Now the failures are written
    and the status is 1."""
    out = tmp_path / "profile.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "gpu_exercise.py"), "profile", "--sizes", "48",
                           "--backends", "triton", "--device", "cpu", "--out", str(out)], capture_output=True,
                          text=True, timeout=300, env=env)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-2000:]
    report = json.loads(out.read_text())["report"]
    assert len(report) == 2 and all("failed" in row for row in report)


def test_count_launches_runs_from_another_folder(tmp_path):
    """It put python_tests on sys.path relative to the working folder: from anywhere but the
    repository's root it failed to import its helpers."""
    done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "count_launches.py"), "triton", "8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]


def test_plot_draws_pngs(tmp_path):
    pytest.importorskip("matplotlib", reason="plots need matplotlib (an optional dependency)")
    out = tmp_path / "loss.jsonl"
    run_script("bench_loss.py", "--quick", "--methods", "floor", "--out", str(out))
    stdout = run_script("plot.py", "--results", str(tmp_path), "--out", str(tmp_path))
    assert list(tmp_path.glob("loss_*.png")), stdout


def test_plot_file_names_read_like_the_device(monkeypatch):
    """A CPU's name from /proc/cpuinfo made "intel-r-xeon-r-processor-2-50ghz-2-c" (marks, the
    clock, cut at 40 characters); the names already committed stay as they were."""
    monkeypatch.syspath_prepend(str(BENCH))
    import plot

    assert plot.slug("Intel(R) Xeon(R) Processor @ 2.50GHz (2 cores)") == "intel-xeon-2-cores"
    assert plot.slug("Intel(R) Core(TM) i7-9700K CPU @ 3.60GHz (8 cores)") == "intel-core-i7-9700k-cpu-8-cores"
    assert plot.slug("cpu-AMD EPYC (2 cores)") == "cpu-amd-epyc-2-cores"
    assert plot.slug("NVIDIA H200") == "nvidia-h200"


def test_plot_joins_only_the_rows_of_one_run(tmp_path, monkeypatch):
    """A loss curve joins the rows of one run (one script call: its date and commit), never rows of
    different code or conditions; a method measured in several runs gets a line per run, labelled."""
    monkeypatch.syspath_prepend(str(BENCH))
    import plot

    class Recorder:
        def __init__(self):
            self.lines = []

        def plot(self, x, y, **kwargs):
            self.lines.append((kwargs["label"], list(x)))

        def __getattr__(self, name):  # the axes' and figure's other calls draw nothing here
            return lambda *args, **kwargs: None

    ax = Recorder()
    fake_plt = type("plt", (), {"subplots": staticmethod(lambda **kwargs: (Recorder(), ax)),
                                "close": staticmethod(lambda fig: None)})

    def row(name, batch, date, commit):
        return {"benchmark": "loss", "device": "gpu", "device_type": "cuda", "dtype": "float32", "dim": 512,
                "name": name, "batch": batch, "date": date, "commit": commit,
                "forward_backward": {"median_s": batch * 1e-6}}

    old, new = ("2026-11-26T10:00:00+00:00", "b204d32"), ("2026-11-27T18:33:00+00:00", "a395e68")
    rows = [row("ekd/triton", 1024, *old), row("ekd/triton", 8192, *old), row("ekd/triton", 32768, *new),
            row("floor", 1024, *new), row("floor", 8192, *new), row("ekd/triton", 8192, *new)]
    plot.plot_loss(rows, tmp_path, fake_plt)
    assert sorted(ax.lines) == [("ekd/triton (2026-11-26 10:00 b204d32)", [1024]),
                                ("ekd/triton (2026-11-27 18:33 a395e68)", [8192, 32768]),
                                ("floor", [1024, 8192])]


def test_rows_go_to_one_file_per_kind_of_device(tmp_path, monkeypatch):
    """`make bench` on a GPU appends to bench/results/loss_cuda.jsonl, the file the GPU lease's rows
    are committed in and the README cites (it wrote loss_h200.jsonl beside it); CPU: loss_cpu.jsonl."""
    monkeypatch.syspath_prepend(str(BENCH))
    import common

    monkeypatch.setattr(common, "RESULTS", tmp_path)
    for device in ("cuda", "cpu"):
        path = common.append_rows([{"device": device}], "loss", torch.device(device))
        assert path == tmp_path / f"loss_{device}.jsonl" and read_rows(path) == [{"device": device}]


def test_gpu_exercise_profile_dry_run_on_cpu(tmp_path, monkeypatch):
    """The lease's A/B tool (tools/gpu_exercise.py profile) on the CPU, two backends in two
    rounds: a row per B, dtype and backend with every round's figures and no peak memory (CUDA
    only); no comparison between different backends (only a backend's variants are compared).
    Its GPU run is the lease's; this keeps its code path from breaking between leases."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise

    out = tmp_path / "profile.json"
    assert gpu_exercise.profile([24], torch.device("cpu"), str(out), calls=2, backends=["csrc", "reference"],
                                rounds=2) == 0
    report = json.loads(out.read_text())["report"]
    assert [(r["dtype"], r["backend"]) for r in report] == [("float32", "csrc"), ("float32", "reference"),
                                                            ("bfloat16", "csrc"), ("bfloat16", "reference")]
    for row in report:
        assert row["rounds"] == 2 and len(row["wall_ms_rounds"]) == 2 and "peak_extra_MiB" not in row
    assert not any("same_as" in row for row in report)


def test_gpu_exercise_profile_leaves_out_a_failing_variant(tmp_path, monkeypatch, capsys):
    """A variant that cannot run (written without a GPU: a compile's resources, a refusal) is
    reported with its error and left out, and the A/B goes on with the others, instead of the
    whole step ending there and the lease's minutes with it."""
    import os

    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise

    monkeypatch.setitem(gpu_exercise.CSRC_VARIANTS, "broken", dict(environ={"EKD_TEST_BROKEN_VARIANT": "1"}))
    original = gpu_exercise.call

    def failing_when_set(*args, **kwargs):
        if os.environ.get("EKD_TEST_BROKEN_VARIANT") == "1":
            raise RuntimeError("out of resource: shared memory, required: 262144")
        return original(*args, **kwargs)

    monkeypatch.setattr(gpu_exercise, "call", failing_when_set)
    out = tmp_path / "profile.json"
    assert gpu_exercise.profile([24], torch.device("cpu"), str(out), calls=1,
                                backends=["csrc", "csrc:broken", "reference"]) == 0
    report = json.loads(out.read_text())["report"]
    assert [(r["dtype"], r["backend"], "failed" in r) for r in report] == [
        ("float32", "csrc:broken", True), ("float32", "csrc", False), ("float32", "reference", False),
        ("bfloat16", "csrc:broken", True), ("bfloat16", "csrc", False), ("bfloat16", "reference", False)]
    assert all("out of resource" in r["failed"] for r in report if "failed" in r)
    assert all(r["wall_ms"] > 0 for r in report if "failed" not in r)
    assert capsys.readouterr().out.count("csrc:broken: FAILED, left out: RuntimeError: out of resource") == 2
    assert "EKD_TEST_BROKEN_VARIANT" not in os.environ  # (the variant's setting is undone after its failure)


NCU_SOURCE_PAGE = """"Kernel Name","similarity_tile_tc_kernel<2>"
"Address","Source","Instructions Executed","Warp Stall Sampling (Not-issued Samples)","Warp Stall Sampling (All Samples)","stall_long_sb","stall_barrier","stall_wait"
"00000010","HMMA.1688.F32.TF32 R4, R8, R12, R4","12,000","50","100","0","0","50"
"00000020","BAR.SYNC.DEFER_BLOCKING 0x0","2,000","290","300","0","280","10"
"00000030","@!P0 LDG.E.64 R24, desc[UR6][R24.64]","1,000","590","600","500","0","90"
"Kernel Name","coarse_histogram_kernel"
"Address","Source","Instructions Executed","Warp Stall Sampling (All Samples)","stall_lg_throttle"
"00000010","RED.E.ADD.STRONG.GPU [R2.64], R5","4,096","50","40"
"""


def test_ncu_source_summary_ranks_instructions_by_stall_samples(tmp_path, capsys, monkeypatch):
    """The lease's ncu-source step (tools/ncu_source_summary.py) on a source page of the CSV shape
    Nsight Compute writes (a Kernel Name row, an Address header, a row an instruction, counts with
    thousands separators): per kernel, the samples by reason over all instructions (not the
    not-issued column), by opcode without predicates and modifiers, and the instructions with the
    most samples first with their main reasons; a file without a source page says so."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import ncu_source_summary

    page = tmp_path / "sass.csv"
    page.write_text(NCU_SOURCE_PAGE)
    assert ncu_source_summary.main([str(page), "--top", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "kernel similarity_tile_tc_kernel<2>: 3 SASS instructions"
    assert lines[1].startswith("  1000 samples (Warp Stall Sampling (All Samples)), 1.5e+04 warp instructions")
    assert lines[2] == "  by reason: stall_long_sb 50.0%, stall_barrier 28.0%, stall_wait 15.0%"
    assert lines[3] == "  by opcode: LDG 60.0%, BAR 30.0%, HMMA 10.0%"
    top = lines[5:7]
    assert top[0].split()[:4] == ["60.0%", "1000", "00000030", "long_sb:83%"] and "LDG.E.64" in top[0]
    assert top[1].split()[:4] == ["30.0%", "2000", "00000020", "barrier:93%"]
    assert lines[7] == "kernel coarse_histogram_kernel: 1 SASS instructions"
    assert "by reason: stall_lg_throttle 80.0%" in lines[9] and "RED 100.0%" in lines[10]
    empty = tmp_path / "none.csv"
    empty.write_text("==PROF== Disconnected\n")
    assert ncu_source_summary.main([str(empty)]) == 1
    assert "no source page" in capsys.readouterr().out


def test_gpu_exercise_sanitize_one_dtype_dry_run_on_cpu(monkeypatch, capsys):
    """The run the lease's memcheck steps watch (tools/gpu_exercise.py sanitize), one dtype a
    step as the lease splits it: on the CPU, the csrc op's variants at that dtype only, then fast
    RKD and the metrics.  Its GPU run is the lease's; this keeps the split from breaking there."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise

    gpu_exercise.sanitize([24], torch.device("cpu"), ["bfloat16"])
    lines = capsys.readouterr().out.splitlines()
    variants = [line for line in lines if line.startswith("ok B=24")]
    assert len(variants) == len(gpu_exercise.VARIANTS) and all("torch.bfloat16 csrc" in line for line in variants)
    assert lines[-1] == "sanitize run complete"


@pytest.mark.parametrize("variant", ["tile32", "no-such-variant"])
def test_suite_runs_under_a_variant(variant):
    """EKD_TEST_TRITON_VARIANT (python_tests/conftest.py) sets a lease variant's settings for the
    whole run and says so in pytest's header; an unknown name stops the run, naming the
    variants."""
    env = dict(os.environ, EKD_TEST_TRITON_VARIANT=variant)
    done = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-p", "no:cacheprovider",
                           str(REPO_ROOT / "python_tests" / "test_host_overhead.py")],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    if variant == "tile32":
        assert done.returncode == 0, done.stdout + done.stderr
        assert "EKD_TEST_TRITON_VARIANT=tile32: triton_ekd settings ['TILE']" in done.stdout, done.stdout
    else:
        assert done.returncode != 0 and "not one of no-launch-cache" in done.stdout + done.stderr, done.stdout


def test_gpu_exercise_variants_name_existing_settings(monkeypatch):
    """Every A/B variant and forced path of the lease (tools/gpu_exercise.py) sets settings that
    triton_ekd has: a misspelt name would otherwise surface only on the GPU machine, as the
    variant's AttributeError in the middle of a lease."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise
    from ekd_kernels import triton_ekd

    for group in (gpu_exercise.TRITON_VARIANTS, gpu_exercise.FORCED_TRITON_PATHS):
        for name, settings in group.items():
            missing = [key for key in settings if not hasattr(triton_ekd, key)]
            assert not missing, f"{name}: triton_ekd has no {missing}"


def run_lease(tmp_path, deadline, out, stand_in=None, **env_vars):
    """tools/gpu_proof.sh lease with a stand-in python (its bash body; default: the one already
    written) and the deadline given, its summary's lines back; env_vars set (EKD_LEASE_ONLY...)."""
    python = tmp_path / "python"
    if stand_in is not None:
        python.write_text("#!/bin/bash\n" + stand_in)
        python.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k != "EKD_LEASE_ONLY"}
    env.update(OUT=str(tmp_path / out), PY=str(python), **env_vars)
    subprocess.run(["bash", "tools/gpu_proof.sh", "lease", str(deadline)], cwd=REPO_ROOT, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return (tmp_path / out / "summary.txt").read_text().splitlines()


def test_lease_dry_run_lists_the_steps_it_did_not_reach(tmp_path):
    """tools/gpu_proof.sh lease runs its bash logic for the first time on the GPU machine, whose
    minutes are few: here with a stand-in python (every command succeeds at once, pytest takes 6
    s) and a deadline of 25 s.  The suite's step runs; every later step is skipped (under 20 s
    left), the summary says so step by step, and its last line is the follow-up call's
    EKD_LEASE_ONLY list of exactly those steps; a follow-up with that list runs them."""
    lines = run_lease(tmp_path, 25, "out", '[[ "$1 $2" == "-m pytest" ]] && sleep 6\nexit 0\n')
    assert any(line.startswith("pytest-cuda: rc 0 in ") for line in lines)
    skipped = [line.split(":")[0] for line in lines if ": skipped, " in line]
    assert skipped[0] == "consistency" and "small-ab" in skipped and skipped[-1] == "ncu-source", skipped
    assert len(skipped) == len(set(skipped)) > 20
    assert lines[-1] == f'not reached: EKD_LEASE_ONLY="{" ".join(skipped)}"'
    followup = run_lease(tmp_path, 100, "followup", EKD_LEASE_ONLY="small-ab racecheck-33-float32")
    ran = [line.split(":")[0] for line in followup if ": rc " in line]
    assert ran == ["small-ab", "racecheck-33-float32"], ran


def test_lease_lists_a_step_cut_by_its_limit_and_runs_what_a_follow_up_names(tmp_path):
    """A step its time limit cut (rc 124) is listed for the follow-up call with the skipped ones
    (it was left off: a follow-up built from the list dropped it); a follow-up naming `diagnose`
    runs it (it ran only after a crash in the same call's pytest.log, which a follow-up's empty
    $OUT never has); a name that is no step is said to be one."""
    lines = run_lease(tmp_path, 21, "out", '[[ "$1 $2" == "-m pytest" ]] && sleep 30\nexit 0\n')
    assert any(line.startswith("pytest-cuda: rc 124 in ") for line in lines), lines
    assert lines[-1].startswith('not reached: EKD_LEASE_ONLY="pytest-cuda consistency '), lines[-1]
    followup = run_lease(tmp_path, 100, "followup", EKD_LEASE_ONLY="diagnose no-such-step")
    assert [line.split(":")[0] for line in followup if ": rc " in line] == ["diagnose"], followup
    assert followup[-1] == "EKD_LEASE_ONLY names no step: no-such-step", followup[-1]


def test_lease_summary_keeps_the_compilers_error_of_a_failed_cuda_build(tmp_path):
    """A CUDA build that fails: the summary (what comes back from the GPU machine) holds the
    compiler's error line, which sits mid-log above pip's traceback (the log's tail alone did not
    reach it), and the lease goes on with the CPU build."""
    summary = "\n".join(run_lease(tmp_path, 60, "out", 'if [[ "$1 $2" == "-m pip" && "$EKD_BUILD_CUDA" == 1 ]]; then\n'
                                   '  echo "building"; echo "csrc/ekd_cuda.cu(12): error: static assertion failed"\n'
                                   '  for i in $(seq 60); do echo "  traceback line $i"; done; exit 1\n'
                                   'fi\nexit 0\n', EKD_LEASE_ONLY="consistency"))
    assert "CUDA BUILD FAILED" in summary and "error: static assertion failed" in summary, summary
    assert "consistency: rc 0" in summary


def test_lease_names_existing_variants(monkeypatch):
    """Every triton:NAME and csrc:NAME the lease's A/B steps and EKD_TEST_TRITON_VARIANT runs name
    (tools/gpu_proof.sh) is a variant of tools/gpu_exercise.py: an unknown one stops its step on
    the GPU machine, whose minutes are few."""
    import re

    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise

    script = (REPO_ROOT / "tools" / "gpu_proof.sh").read_text()
    named = set(re.findall(r"triton:([\w-]+)", script)) | set(re.findall(r"EKD_TEST_TRITON_VARIANT=([\w-]+)", script))
    named_csrc = set(re.findall(r"csrc:([\w-]+)", script))
    assert {"copies-512", "tile32"} <= named and "tensor-cores" in named_csrc  # (the patterns still find them)
    unknown = sorted(named - set(gpu_exercise.TRITON_VARIANTS)) + sorted(named_csrc - set(gpu_exercise.CSRC_VARIANTS))
    assert not unknown, f"the lease names variants gpu_exercise.py does not have: {unknown}"


def test_csrc_variants_set_what_the_op_reads(monkeypatch):
    """A csrc:NAME variant sets environment variables the CUDA op reads (csrc/ekd_cuda.cu's
    getenv calls), and only for its block: a misspelt variable would leave the A/B measuring the
    default twice."""
    import os
    import re

    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    import gpu_exercise

    read = set(re.findall(r'getenv\("(\w+)"\)', (REPO_ROOT / "csrc" / "ekd_cuda.cu").read_text()))
    for name, settings in gpu_exercise.CSRC_VARIANTS.items():
        assert set(settings) == {"environ"} and set(settings["environ"]) <= read, name
        monkeypatch.delenv("EKD_CUDA_TENSOR_CORES", raising=False)
        with gpu_exercise.variant_settings(settings):
            assert all(os.environ.get(k) == v for k, v in settings["environ"].items())
        assert all(k not in os.environ for k in settings["environ"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="an interpreter tool: CI's machines have no GPU")
def test_interpreter_cost_tool_runs():
    """tools/interpreter_cost.py (where CI's interpreter time goes) runs both ways and names the
    kernels; its figures are for reading, not asserted."""
    pytest.importorskip("triton")
    for extra in ([], ["--every-call"]):
        done = subprocess.run([sys.executable, str(REPO_ROOT / "tools" / "interpreter_cost.py"), "24", "--calls", "1",
                               *extra], capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        assert "rank_loss_kernel" in done.stdout and "whole call" in done.stdout, done.stdout
        assert ("every helper call" in done.stdout) == bool(extra), done.stdout


def test_rows_name_the_code_and_switches_they_measured(tmp_path, monkeypatch):
    """A "-dirty" commit alone does not say what was measured: a row carries the changed files
    (untracked ones too, but for bench/results/) and the diff's hash, the kernel switches (EKD_*,
    thread counts), the matmul precision and the command line; the training step interleaves its
    settings by default on every device, and times fast RKD wherever it runs (it was skipped on
    CUDA as "CPU kernel only", which it is not)."""
    monkeypatch.syspath_prepend(str(BENCH))
    import bench_train_step
    import common

    monkeypatch.setenv("EKD_TRITON_FP32_PRECISION", "ieee")
    env = common.environment(torch.device("cpu"))
    assert env["settings"]["EKD_TRITON_FP32_PRECISION"] == "ieee"
    assert env["matmul_precision"] == torch.get_float32_matmul_precision() and env["argv"]
    assert (env["uncommitted"] is None) == (not env["commit"].endswith("-dirty"))
    monkeypatch.setattr(common, "REPO", tmp_path)  # a dirty checkout of one file
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "a.py").write_text("x = 1\n")
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "add", "a.py"], cwd=tmp_path, check=True)
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a"], cwd=tmp_path,
                   check=True)
    assert common.uncommitted_changes() is None
    (tmp_path / "a.py").write_text("x = 2\n")
    changed = common.uncommitted_changes()
    assert changed["files"] == ["a.py"] and len(changed["diff_sha256"]) == 64
    (tmp_path / "a.py").write_text("x = 1\n")
    (tmp_path / "bench" / "results").mkdir(parents=True)
    (tmp_path / "bench" / "results" / "loss.jsonl").write_text("{}\n")  # a benchmark's own output: clean
    assert common.uncommitted_changes() is None
    (tmp_path / "b.py").write_text("y = 1\n")  # a new module the measured code may import: dirty
    first = common.uncommitted_changes()
    assert first["files"] == ["b.py"]
    (tmp_path / "b.py").write_text("y = 2\n")
    assert common.uncommitted_changes()["diff_sha256"] != first["diff_sha256"]
    monkeypatch.setattr(bench_train_step, "BACKEND_NAMES", ())  # (the RKD settings only: no GPU here)
    losses, skipped = bench_train_step.distillation_losses(torch.device("cuda"))
    assert "rkd/fast" in losses and "rkd/fast" not in skipped
