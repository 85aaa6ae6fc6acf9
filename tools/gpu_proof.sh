#!/usr/bin/env bash
# Issue 9's runs on a GPU machine, one stage per call (each fits the device tool's 10 minutes):
#
#   tools/gpu_proof.sh lease [SECONDS]       everything most valuable in one call under a deadline (below)
#   tools/gpu_proof.sh build-test            build with the CUDA ops, run python_tests (-rs lists skips)
#   tools/gpu_proof.sh sanitize TOOL         compute-sanitizer --tool TOOL (memcheck|racecheck|initcheck|synccheck)
#   tools/gpu_proof.sh consistency           fast backends vs the reference at B = 1024, 8192, 32768, fp32/bf16
#   tools/gpu_proof.sh large                 fast backends vs each other and exact invariants at B = 46341,
#                                            65536 and 65537 (past int32 pair counts), random and collapsed
#   tools/gpu_proof.sh bench                 make bench's three scripts; results copied to $OUT
#   tools/gpu_proof.sh ncu                   Nsight Compute on the fast kernels at B = 8192
#
# The device tool gives a machine back after 30 s idle and a fresh one takes minutes to start, so
# `lease` packs what matters most into one call; the other stages then go deeper. With 15 minutes
# of device time a session, the second lease ran `OUT=$OUT bash tools/gpu_proof.sh lease 555`
# (timeout_s 595; about 9 minutes after a 1-2 minute start), then at once, on the still warm
# machine, the three other sanitizer tools at B = 33 (racecheck alone needs about 150 s); the
# third, the same call and then EKD_LEASE_ONLY="bench-32768 ncu bench-train" ... lease 200.
# The fourth, the same call (555 s) and EKD_LEASE_ONLY="bench-loss bench-train memcheck-33" ... lease
# 265, which spent the 900 s: the A/B steps now come last.  The fifth, the same call (build 62 s,
# the suite 201 s; it reached the loss benchmark with 32 s left), then EKD_LEASE_ONLY=
# "memcheck-33-float32 ncu-csrc" ... lease 255 (127 s), then ncu and racecheck by hand (60 s);
# what it decided left the lease, what it did not reach moved up.
# EKD_LEASE_ONLY="step names" makes `lease` run only those steps (a follow-up call).
#
# Every stage builds first (ninja makes that a no-op when nothing changed). The golden figures
# live in ../shared, which does not travel to the GPU machine: copy them into the checkout
# first (cp -r ../shared/golden shared/golden; shared/ travels, conftest looks there too).
# Logs go to $OUT (the device tool brings back at most 8 files).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_proof_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=${PY:-python}

build() {
  # sm_90 only on the lease (Hopper; half the compile of the default 8.0;9.0+PTX). When the CUDA
  # ops fail to build, say so and go on without them: the Triton kernels still get their run.
  nvidia-smi > "$OUT/summary.txt" 2>&1
  if ! TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} EKD_BUILD_CUDA=1 MAX_JOBS=${MAX_JOBS:-16} \
       $PY -m pip install --no-build-isolation --no-deps -e . > /tmp/ekd_build.log 2>&1; then
    echo "CUDA BUILD FAILED; going on without the CUDA ops" | tee -a "$OUT/summary.txt"
    # the compiler's own errors (mid-log, above pip's traceback), then the log's end
    grep -n -B2 -A6 "error" /tmp/ekd_build.log | head -80 | tee -a "$OUT/summary.txt"
    tail -40 /tmp/ekd_build.log | tee -a "$OUT/summary.txt"
    EKD_BUILD_CUDA=0 $PY -m pip install --no-build-isolation --no-deps -e . > /tmp/ekd_build_cpu.log 2>&1 \
      || { tail -40 /tmp/ekd_build_cpu.log | tee -a "$OUT/summary.txt"; exit 1; }
  fi
}

stage=${1:?stage: lease [SECONDS] | build-test | sanitize TOOL | consistency | large | bench | ncu}
build
case "$stage" in
  build-test)
    $PY -m pytest python_tests -q -rs 2>&1 | tee "$OUT/pytest.log" | tail -40 ;;
  sanitize)
    tool=${2:?sanitize needs a tool: memcheck, racecheck, initcheck or synccheck}
    compute-sanitizer --tool "$tool" --print-limit 50 $PY tools/gpu_exercise.py sanitize --sizes 33 4096 \
      > "$OUT/sanitize_$tool.log" 2>&1
    tail -15 "$OUT/sanitize_$tool.log" ;;
  consistency)
    $PY tools/gpu_exercise.py consistency --sizes 1024 8192 32768 --out "$OUT/consistency.json" 2>&1 \
      | tee "$OUT/consistency.log" | tail -40 ;;
  large)
    # within 80 GB: no B x B tensor anywhere (the reference is not run), the rank check's chunks < 2 GiB
    timeout 540 $PY tools/gpu_exercise.py large --sizes 46341 65536 65537 --out "$OUT/large.json" 2>&1 \
      | tee "$OUT/large.log" | tail -40 ;;
  bench)
    $PY bench/bench_loss.py && $PY bench/bench_train_step.py && $PY bench/plot.py
    tar czf "$OUT/bench_results.tgz" bench/results ;;
  ncu)
    # the kernels of one warm forward+backward per backend (NVTX range "ekd"), full sections
    for backend in triton csrc; do
      ncu --clock-control none --set full --nvtx --nvtx-include "ekd/" -o "$OUT/ekd_${backend}_b8192" \
        $PY tools/gpu_exercise.py once --sizes 8192 --backend $backend --dtype bfloat16 >> "$OUT/ncu.log" 2>&1
    done
    tail -20 "$OUT/ncu.log" ;;
  lease)
    # One lease of a few minutes, most valuable first, each step cut to the time left before
    # ${2:-540} s (the call's own limit minus the transfers): every GPU test of the suite, the
    # consistency check up to B = 32768, the csrc CUDA cases with the mma tensor-core tiles (the
    # default they wait for), the A/B of a default made without measuring every size, the loss
    # benchmark at 1024 and 8192 (then under torch.compile(mode="reduce-overhead")),
    # compute-sanitizer memcheck at B = 33 (a dtype a step), why op-side refusals crash there when
    # they still do (tools/diagnose_throw.py), B = 65537 (past int32 pair counts), Nsight Compute
    # on the Triton kernels at B = 8192, the loss benchmark at 32768, the training step, memcheck
    # at B = 4096, the tensor-core tiles' own checks, where the eager call's host time goes
    # (tools/host_cost.py --cuda) and its device time (gpu_exercise.py profile), then the A/B
    # steps and Nsight Compute on the csrc tiles. At most 8 files
    # come back (the device tool's limit), and this stage writes exactly 8 to $OUT (summary.txt,
    # pytest.log, profile.json, loss.jsonl, consistency.json, ncu.log, train.jsonl and, after a
    # crash, diagnose.log): anything more goes to $T. The build's log goes to the summary when it fails.
    deadline=${2:-540}
    # this call's own logs: on a warm machine /tmp keeps the last call's, which a follow-up call
    # (EKD_LEASE_ONLY) must not report as its own
    T=$(mktemp -d)
    left() { echo $(( deadline - SECONDS )); }
    step() {  # step NAME MAX_SECONDS COMMAND...: runs when >= 20 s are left, under min(MAX, left)
      local name=$1 max=$2; shift 2
      echo "$name" >> "$T/steps"
      # EKD_LEASE_ONLY="ncu bench-train ...": a follow-up call on the warm machine runs only those
      if [[ -n "${EKD_LEASE_ONLY:-}" && " $EKD_LEASE_ONLY " != *" $name "* ]]; then
        echo "$name: not selected" >> "$OUT/summary.txt"; return
      fi
      local t=$(( $(left) < max ? $(left) : max ))
      if (( t < 20 )); then
        echo "$name: skipped, ${t} s left" >> "$OUT/summary.txt"; echo "$name" >> "$T/not_reached"; return
      fi
      # (-k: a command that ignores the TERM is killed 10 s later, before the device tool's own limit)
      local start=$SECONDS; timeout -k 10 "$t" "$@"; local rc=$?
      echo "$name: rc $rc in $(( SECONDS - start )) s (limit $t s)" >> "$OUT/summary.txt"
      # cut by its limit: to be run again in the follow-up call
      if (( rc == 124 || rc == 137 )); then echo "$name" >> "$T/not_reached"; fi
    }
    { echo "build took ${SECONDS} s"; git log -1 --format='commit %H %s' 2>/dev/null
      $PY -c 'import torch, triton, sys; print("python", sys.version.split()[0], "torch", torch.__version__,
        "cuda", torch.version.cuda, "triton", triton.__version__, torch.cuda.get_device_name())'
      $PY -c 'import ekd_kernels.backends as b, torch; print("backends on cuda:", b.available_backends(torch.device("cuda")))'
    } >> "$OUT/summary.txt" 2>&1
    bench_lines() { grep "^|\|ratios\|^  " "$1" >> "$OUT/summary.txt"; }  # a benchmark log's tables and rows
    sanitizer() {  # sanitizer TOOL B DTYPE MAX_SECONDS: compute-sanitizer TOOL over gpu_exercise's sanitize
      # run at one dtype (step TOOL-B-DTYPE; memcheck of both dtypes at B = 33 took more than 150 s),
      # its verdict and how far it got (the run's "ok" lines: a step cut by its limit) to the summary
      local tool=$1 log="$T/$1_$2_$3.log"
      step $tool-$2-$3 "$4" compute-sanitizer --tool $tool --print-limit 20 $PY tools/gpu_exercise.py sanitize \
        --sizes "$2" --dtypes "$3" > "$log" 2>&1
      [[ -s "$log" ]] || return 0  # not selected, or skipped
      { echo "$tool B=$2 $3 ($(grep -c "^ok " "$log") parts ran):"
        grep "SUMMARY\|sanitize run complete\|Invalid\|Error\|[Hh]azard\|Uninitialized\|Barrier" "$log" | head -12
        tail -2 "$log"; } >> "$OUT/summary.txt"
    }
    memcheck() { sanitizer memcheck "$@"; }  # memcheck B DTYPE MAX_SECONDS
    # pytest-xdist when present (the GPU image has it): a crashing case then costs one worker, not the run
    # (work stealing where xdist has it, 3.2 on: a worker left with a 50-s case no longer holds the
    # step's end while the others idle; the fifth lease's slowest cases took 35-52 s)
    xdist=""; $PY -c "import xdist" 2>/dev/null && xdist="-n 8"
    [[ -n "$xdist" ]] && $PY -c "import xdist.scheduler as s; s.WorkStealingScheduling" 2>/dev/null \
      && xdist="$xdist --dist worksteal"
    # Every test that runs on the GPU, in one xdist run whose failures come back with their
    # tracebacks: the cases named cuda, all of test_triton.py (its tests run on CUDA tensors where
    # a GPU is, and their names do not say so), test_large_batch.py's (its int64 and past-int32
    # kernel cases likewise) and the graphed benchmark methods' (captured by hand, and by
    # torch.compile).  (The second
    # lease ran test_triton.py's large-B variants in a step of their own, without xdist: the
    # step's limit cut it before pytest printed why 22 of them failed.)
    # (the csrc op's tensor-core cases, written without a GPU, run in steps of their own below: a
    # fault in a new kernel would spoil every later case of its xdist worker)
    gpu_cases="(cuda or test_triton or test_large_batch or graph_method) and not tensor_cores"
    # (--durations: the 30 slowest cases in pytest.log, to see where the step's 200-250 s go:
    # the fourth lease's run was cut at 99% of its cases)
    step pytest-cuda 250 $PY -m pytest python_tests -q -rfEs --tb=short --durations=30 -k "$gpu_cases" $xdist -p no:cacheprovider \
      > "$OUT/pytest.log" 2>&1
    grep "^FAILED\|^ERROR\|passed\|failed" "$OUT/pytest.log" | tail -40 >> "$OUT/summary.txt"
    # A/B runs of the Triton forward+backward, back to back in one process, each variant's loss and
    # gradient compared with the default's.  Every variant is compiled first, then 3 rounds
    # measure them in turn (medians; each round's device time in the "rounds" line: the spread is
    # the A/B's noise, and no variant gains from its place).  The third lease measured pass 2's
    # ways, pass 1's windows and launch settings at B = 8192 (and 1024): one aggregation with
    # direct atomics and pass 1 capped at 168 registers won (bitwise the same outputs) and are the
    # defaults since.
    ab() {  # ab NAME MAX_SECONDS SIZES VARIANTS...: an A/B step (the default Triton backend against its
      # variants, or the csrc op against its own when they are csrc variants), its lines to the summary
      local name=$1 max=$2 sizes=$3; shift 3
      local base=triton; [[ $1 == csrc:* ]] && base=csrc
      step $name $max $PY tools/gpu_exercise.py profile --sizes $sizes --backends $base "$@" --rounds 3 \
        --out $T/$name.json > $T/$name.log 2>&1
      [[ -s $T/$name.log ]] || return 0  # not selected, or skipped
      { echo "$name ($base $*):"; grep "^B=\|^    \|^  against\|^  windows\|^  rounds" $T/$name.log; } \
        >> "$OUT/summary.txt"
    }
    # The fast backends against the reference and each other up to B = 32768
    step consistency 120 $PY tools/gpu_exercise.py consistency --sizes 1024 8192 32768 \
      --out "$OUT/consistency.json" > $T/consistency.log 2>&1
    grep -v ": ok$\|: True$" $T/consistency.log | tail -10 >> "$OUT/summary.txt"
    # The small-B call's latency chains, each against the forward of before (all three written
    # without a GPU, bitwise the same outputs): the Gram cache up to B = 2048 (pass 1 keeps the
    # tiles that pass 2, the rank loss and passes 3-4 recomputed: 56 + 46 us of 0.36 ms at B =
    # 1024, fp32, in the fifth lease); backward_rows' 2-row programs walking a row's selected
    # entries 8 at a time up to B = 512 (53 us of a call's 0.345 ms at B = 64, in 16-row programs
    # one entry a step; at 1024 and 2048 both shapes are the same); the hardest negatives' rank
    # count in 16-candidate programs, 512 a step (30 us at every B in 64 x 128)
    ab small-ab 90 "64 256 1024 2048" triton:no-gram-cache triton:rows-16 triton:candidates-64x128
    # The csrc CUDA cases of the whole suite with the op's tensor-core tiles through mma.sync set
    # for the run (EKD_CUDA_TENSOR_CORES=2: every csrc CUDA case then computes on them, the shared
    # suites' csrc-cuda cases too).  The fifth lease found that way 10% faster than the FMA tiles
    # at B = 8192 and 12% at 1024 (device time, one process), its own 66 cases and 48 consistency
    # checks passing: this run is what making it the default still needs.
    csrc_tc_suite() {  # csrc_tc_suite WAY MAX_SECONDS
      step pytest-csrc-tc$1 $2 env EKD_CUDA_TENSOR_CORES=$1 $PY -m pytest python_tests -q -rfE --tb=short \
        -k "csrc and cuda" $xdist -p no:cacheprovider > $T/pytest_csrc_tc$1.log 2>&1
      [[ -s $T/pytest_csrc_tc$1.log ]] && { echo "pytest-csrc-tc$1:"; grep "^FAILED\|^ERROR\|passed\|failed" \
        $T/pytest_csrc_tc$1.log | tail -20; } >> "$OUT/summary.txt"
    }
    csrc_tc_suite 2 90
    # Pass 1's histogram copies where the fifth lease did not measure them: 32 tile programs a copy
    # (the default since) gives 16 at 3072 and 4096, where 512 (the default before) gave 2 and 4
    # (and the Gram cache up to 4096, off past 2048 by default: whether it pays there too)
    ab copies-ab 75 "3072 4096" triton:copies-512 triton:copies-128 triton:gram-cache-4096
    # The small-B device time (0.31-0.40 ms a call from B = 64 to 1024 in the fifth lease: a chain
    # of kernels of 15-60 us each whatever B, what the 20x target at 1024 meets once graphed):
    # 32 x 32 tiles, which the fourth lease found 18-28% faster at B = 256 and 18% in bf16 at
    # 1024, and feature chunks of 64 (half the K steps of every dot's chain)
    ab tile-ab 90 "512 1024 2048" triton:tile32 triton:block-k64
    # The csrc op's top-N candidates collected in the second histogram pass (EKD_CUDA_CANDIDATES=1,
    # written without a GPU, off by default): the suite's csrc CUDA cases with it set (its own
    # tests, test_csrc.py's test_cuda_candidates_*, ran in pytest-cuda), then its device time
    # against the default's (bitwise the same outputs: the A/B says so)
    step pytest-csrc-candidates 90 env EKD_CUDA_CANDIDATES=1 $PY -m pytest python_tests -q -rfE --tb=short \
      -k "csrc and cuda" $xdist -p no:cacheprovider > $T/pytest_csrc_candidates.log 2>&1
    [[ -s $T/pytest_csrc_candidates.log ]] && { echo "pytest-csrc-candidates:"; grep "^FAILED\|^ERROR\|passed\|failed" \
      $T/pytest_csrc_candidates.log | tail -20; } >> "$OUT/summary.txt"
    ab candidates-ab 60 "256 1024 8192" csrc:candidates
    # The FMA tiles (new K loop since the fifth lease: 410 sm_90 instructions a step, 678 before)
    # against the mma tiles (10% faster than the old FMA tiles in the fifth lease): which is the
    # default csrc path for fp32 (pytest-csrc-tc2 above: whether mma may be)
    ab csrc-ab 60 "1024 8192" csrc:tensor-cores-mma
    # rows are appended to loss.jsonl as each B and dtype's methods finish their turns: a step cut
    # by its limit keeps the sizes it finished (the fifth lease cut it at 32 s of 90, before the
    # bf16 rows at 8192, when the methods ran one after another; csrc+tc, the wmma way, is
    # the slower tensor-core way: 17% slower than the FMA tiles of then at 8192, fifth lease)
    step bench-loss 120 $PY bench/bench_loss.py --sizes 1024 8192 --methods ekd/reference ekd/triton ekd/csrc ekd/csrc+mma \
      ekd/triton+graph ekd/csrc+graph rkd/reference rkd/fast floor floor/tf32 --out "$OUT/loss.jsonl" > $T/bench.log 2>&1
    bench_lines $T/bench.log
    # the README's one line to CUDA graphs, torch.compile(mode="reduce-overhead"), beside the
    # hand-captured graph and eager (a step of its own: inductor's compiles take most of it)
    step bench-compile 75 $PY bench/bench_loss.py --sizes 1024 8192 --methods ekd/triton ekd/triton+graph \
      ekd/triton+compile ekd/csrc+compile --out "$OUT/loss.jsonl" > $T/bench_compile.log 2>&1
    bench_lines $T/bench_compile.log
    # 32 x 32 tiles as a candidate default at small B: the GPU tests of the Triton backend with
    # them set for the whole run (python_tests/conftest.py's EKD_TEST_TRITON_VARIANT)
    step pytest-tile32 150 env EKD_TEST_TRITON_VARIANT=tile32 $PY -m pytest python_tests -q -rfE --tb=short \
      -k "test_triton or (cuda and triton)" $xdist -p no:cacheprovider > $T/pytest_tile32.log 2>&1
    [[ -s $T/pytest_tile32.log ]] && { echo "pytest-tile32:"; grep "^FAILED\|^ERROR\|passed\|failed" \
      $T/pytest_tile32.log | tail -20; } >> "$OUT/summary.txt"
    # (a call's first ~9 minutes rarely reach past here, and may stop before; a follow-up call on
    # the warm machine, EKD_LEASE_ONLY="<the steps the summary lists as skipped>", takes the rest)
    # memcheck at a small B (every kernel of both fast backends, every variant), a dtype a step
    # (both in one step took more than the fourth lease's 150 s): verdicts to the summary
    memcheck 33 float32 120
    memcheck 33 bfloat16 120
    # only when a worker died: why the op's refusals crash there (the suite's log says which); or
    # when a follow-up call names it (that call's pytest.log is empty: $OUT starts empty each call)
    if [[ " ${EKD_LEASE_ONLY:-} " == *" diagnose "* ]] \
        || { [[ -f "$OUT/pytest.log" ]] && grep -q "crashed while running\|Segmentation fault" "$OUT/pytest.log"; }; then
      step diagnose 120 $PY tools/diagnose_throw.py --inline --gdb --cpu-build > "$OUT/diagnose.log" 2>&1
    fi
    # past int32 pair counts (B(B-1)/2 > 2^31 from B = 65537): the fast backends against each other
    # and the exact invariants (first run on a GPU in the third lease)
    step large 150 $PY tools/gpu_exercise.py large --sizes 65537 --out $T/large.json > $T/large.log 2>&1
    # every line (9 at one size: 3 variants x 2 backends and their comparison; misses are listed in theirs)
    grep "^B=\|skipped\|Error" $T/large.log | head -40 >> "$OUT/summary.txt"
    # why the top kernels take what they take: speed of light, occupancy, stall reasons (text)
    step ncu 90 ncu --clock-control none --section SpeedOfLight --section Occupancy --section LaunchStats \
      --section WarpStateStats --nvtx --nvtx-include "ekd/" $PY tools/gpu_exercise.py once --sizes 8192 \
      --backend triton --dtype bfloat16 > "$OUT/ncu.log" 2>&1
    # B = 32768: the fast backends and the floor only (the 20x target is at B = 1024; the
    # reference would take most of the step's time)
    step bench-32768 90 $PY bench/bench_loss.py --sizes 32768 --methods ekd/triton ekd/csrc ekd/csrc+mma floor \
      --out "$OUT/loss.jsonl" > $T/bench_large.log 2>&1
    bench_lines $T/bench_large.log
    step bench-train 150 $PY bench/bench_train_step.py --out "$OUT/train.jsonl" > $T/bench_train.log 2>&1
    bench_lines $T/bench_train.log
    # (the CPU cases are CI's: the GPU machine's time goes to what only it can run)
    memcheck 4096 float32 120
    memcheck 4096 bfloat16 120
    # The other three tools the issue names, over the whole package: shared-memory races, reads of
    # device memory no one wrote (every scratch buffer is torch.empty: the kernels must write
    # before they read), barriers that not every thread reaches.  Their one run was the second
    # lease's, by hand (0 errors each, bench/results/gpu_proof_h200_2026-11-26b/), on the kernels
    # of then; fp32 at B = 33, every kernel of both backends and every variant, as memcheck's
    sanitizer racecheck 33 float32 150
    sanitizer initcheck 33 float32 150
    sanitizer synccheck 33 float32 150
    # (the fifth lease ran these right after the consistency check: every case passed, the mma way
    # took 10.05 ms of tile kernels at B = 8192 against the FMA tiles' 11.24 and wmma's 13.10)
    # The csrc CUDA op's fp32 tiles on tensor cores (3xTF32 through wmma and through mma.sync,
    # EKD_CUDA_TENSOR_CORES=1 and 2; written without a GPU, off by default), each part in a process
    # of its own: their tests (test_csrc.py's test_cuda_tensor_cores_*, both ways), both against the
    # reference up to 8192 and Triton at 32768 with their determinism, then their device time
    # against the FMA tiles (11.4 of 12.3 ms at B = 8192 in the first lease)
    step pytest-csrc-tc-cases 75 $PY -m pytest python_tests/test_csrc.py -q -rfE --tb=short -k tensor_cores $xdist \
      -p no:cacheprovider > $T/pytest_csrc_tc_cases.log 2>&1
    [[ -s $T/pytest_csrc_tc_cases.log ]] && { echo "pytest-csrc-tc-cases:"; grep "^FAILED\|^ERROR\|passed\|failed" \
      $T/pytest_csrc_tc_cases.log | tail -20; } >> "$OUT/summary.txt"
    step consistency-tc 75 $PY tools/gpu_exercise.py consistency --sizes 1024 8192 32768 \
      --backends csrc:tensor-cores csrc:tensor-cores-mma --out $T/consistency_tc.json > $T/consistency_tc.log 2>&1
    [[ -s $T/consistency_tc.log ]] && { echo "consistency-tc:"; grep -v ": ok$\|: True$" $T/consistency_tc.log | tail -12
      echo "($(grep -c ": ok$\|: True$" $T/consistency_tc.log) checks ok)"; } >> "$OUT/summary.txt"
    # racecheck over the tensor-core tile kernels alone (shared-memory staging; the fifth lease ran
    # it by hand at B = 300: 0 hazards), then the wmma way's suite, then the host
    step racecheck-tc 60 bash -c "for variant in tensor-cores-mma tensor-cores; do compute-sanitizer --tool racecheck \
      --kernel-name kns=similarity_tile_tc --print-limit 10 $PY tools/gpu_exercise.py once --sizes 300 \
      --backend csrc:\$variant --dtype float32; done" > $T/racecheck_tc.log 2>&1
    [[ -s $T/racecheck_tc.log ]] && { echo "racecheck-tc:"; grep "SUMMARY\|done\|rror" $T/racecheck_tc.log; } >> "$OUT/summary.txt"
    csrc_tc_suite 1 90
    # Where the eager call's host time goes on this host (1.9-2.4 ms at B <= 1024 in the third
    # lease against 0.3-0.45 ms of the stand-in's on the project's CPU): real launches with and
    # without the launch cache, launchers replaced by a no-op (the C launcher and driver calls
    # left out), kernels replaced at kernel[grid], the breakdown; then the stand-in itself here,
    # which says how much slower this host runs the same Python (tools/host_cost.py)
    step host 100 bash -c "$PY tools/host_cost.py 64 --cuda && $PY tools/host_cost.py 1024 --cuda \
      && $PY tools/host_cost.py 64 --repeats 100" > $T/host.log 2>&1
    [[ -s $T/host.log ]] && { echo "host:"; grep -v "^$" $T/host.log | tail -40; } >> "$OUT/summary.txt"
    step profile 90 $PY tools/gpu_exercise.py profile --sizes 64 1024 8192 --out "$OUT/profile.json" \
      > $T/profile.log 2>&1
    grep "^B=\|^    \|^  host" $T/profile.log >> "$OUT/summary.txt"
    # Last, the A/B steps (the fourth lease ran since-ab, tile-ab and triton-ab: bench/NOTES.md):
    # coarse_select in one level over copies (the default since) against three levels, the
    # fourth run's default; the tile passes' shape at large B: 128 x 128 tiles at 8
    # warps (half the L2 bytes a FLOP of 64 x 64; one program an SM at 255 registers), 4 stages,
    # chunks of 64 (cut after 25 s in the fourth lease).
    ab scan-ab 120 "3072 4096 8192 32768" triton:levels-scan
    ab tiles-ab 120 "8192 32768" triton:tile128-warps8 triton:stages4 triton:block-k64
    # The csrc op's tile kernels under Nsight Compute (B = 8192, fp32), the FMA tiles' and the mma
    # way's: throughput, instructions and stall reasons a warp's issued instruction (the fifth
    # lease's by hand: bench/results/gpu_proof_h200_2026-11-27b/ncu_csrc_tiles.log)
    step ncu-csrc 90 bash -c "for backend in csrc csrc:tensor-cores-mma; do ncu --clock-control none \
      --section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section InstructionStats \
      --metrics 'regex:smsp__average_warps_issue_stalled_.*_per_issue_active\.ratio' --kernel-name regex:similarity_tile \
      --launch-count 1 --nvtx --nvtx-include ekd/ $PY tools/gpu_exercise.py once --sizes 8192 \
      --backend \$backend --dtype float32; done" > $T/ncu_csrc.log 2>&1
    [[ -s $T/ncu_csrc.log ]] && { echo "ncu-csrc:"; grep "similarity_tile\|Duration\|Throughput\|Issued Instructions  \|Executed Ipc Active\|Warp Cycles Per Issued\|stalled" \
      $T/ncu_csrc.log | awk '$NF != "0" && $NF != "0.00"' | head -60; } >> "$OUT/summary.txt"
    # Where those kernels' warps stall, instruction by instruction: the csrc tiles (mma and FMA) and
    # Triton's pass 1, Nsight Compute's source page summarised to text (tools/ncu_source.sh)
    step ncu-source 120 bash tools/ncu_source.sh $T/ncu_source $PY > $T/ncu_source.log 2>&1
    [[ -s $T/ncu_source.log ]] && { echo "ncu-source:"; head -120 $T/ncu_source.log; } >> "$OUT/summary.txt"
    # the steps this call did not reach or its limits cut, ready for the follow-up call on the warm machine
    touch "$T/not_reached" "$T/steps"
    echo "not reached: EKD_LEASE_ONLY=\"$(tr '\n' ' ' < "$T/not_reached" | sed 's/ $//')\"" >> "$OUT/summary.txt"
    for name in ${EKD_LEASE_ONLY:-}; do  # a misspelt name runs nothing: say so
      grep -qx -- "$name" "$T/steps" || echo "EKD_LEASE_ONLY names no step: $name" >> "$OUT/summary.txt"
    done
    cat "$OUT/summary.txt" ;;
  *) echo "unknown stage $stage"; exit 2 ;;
esac
