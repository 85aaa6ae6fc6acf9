#!/usr/bin/env bash
# Nsight Compute's source page (stall samples per SASS instruction) for the kernels whose time the
# lease wants explained, summarised to text by tools/ncu_source_summary.py (the reports stay in
# DIR: the device tool returns at most 8 files).  One launch each, B = 8192:
#   the csrc op's tile kernel with the mma.sync tensor-core tiles (fp32), the FMA tiles' (fp32), and
#   Triton's pass 1 (coarse_histogram_kernel, bf16).
#     tools/ncu_source.sh DIR [PYTHON]
set -uo pipefail
cd "$(dirname "$0")/.."
dir=${1:?an output folder}
py=${2:-python}
mkdir -p "$dir"
profile() {  # profile NAME KERNEL_REGEX BACKEND DTYPE
  ncu --clock-control none --section SourceCounters --section WarpStateStats --kernel-name "regex:$2" \
    --launch-count 1 --nvtx --nvtx-include ekd/ -f -o "$dir/$1" \
    "$py" tools/gpu_exercise.py once --sizes 8192 --backend "$3" --dtype "$4" > "$dir/$1.log" 2>&1 \
    || { echo "$1: ncu failed"; tail -5 "$dir/$1.log"; return; }
  # (--print-source sass: the SASS rows; an older ncu without the option prints them by default)
  ncu --import "$dir/$1.ncu-rep" --page source --csv --print-source sass > "$dir/$1.csv" 2> "$dir/$1.import.log" \
    || ncu --import "$dir/$1.ncu-rep" --page source --csv > "$dir/$1.csv" 2>> "$dir/$1.import.log"
  echo "$1 ($3, $4):"
  "$py" tools/ncu_source_summary.py "$dir/$1.csv" --top 25 || head -c 600 "$dir/$1.import.log"
}
profile csrc_mma similarity_tile csrc:tensor-cores-mma float32
profile csrc_fma similarity_tile csrc float32
profile triton_pass1 coarse_histogram triton bfloat16
