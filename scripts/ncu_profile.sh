#!/usr/bin/env bash
# Nsight Compute profiles of jaxkv's decode kernels (scripts/kernel_profile.py), one launch each,
# clocks left as they are. For every case writes OUT/CASE.ncu-rep, OUT/CASE_details.txt (throughput,
# occupancy, launch statistics, warp stall reasons) and OUT/CASE_sass.csv (per-instruction counters).
#
#   bash scripts/ncu_profile.sh OUT "kv qmm gemv" [extra kernel_profile.py flags]
set -uo pipefail
out=${1:?usage: ncu_profile.sh OUT "CASES" [flags]}
cases=${2:-kv qmm gemv}
shift 2 || true
mkdir -p "$out"
declare -A pattern=([kv]=kv_decode [qmm]=qmatmul_int4 [gemv]=qmatmul_int4_gemv)
for c in $cases; do
    name=${c%%:*}
    tag=${c//:/_}
    ncu --clock-control none --set full --import-source yes -k "regex:${pattern[$name]}" -s 1 -c 1 \
        -f -o "$out/$tag" python3 scripts/kernel_profile.py "$name" "$@" 2>&1 | grep -v '^==PROF==' | tail -5
    if [ -f "$out/$tag.ncu-rep" ]; then
        ncu --import "$out/$tag.ncu-rep" --page details > "$out/${tag}_details.txt" 2>&1
        ncu --import "$out/$tag.ncu-rep" --page source --csv --print-source sass > "$out/${tag}_sass.csv" 2>&1
        grep -E "Duration|Registers Per|Achieved Occupancy|Memory Throughput|DRAM Throughput|Local|Stall|Warp Cycles Per Issued|Issue Slots|Executed Ipc" \
            "$out/${tag}_details.txt" | head -40
    else
        echo "$tag: no profile (kernel name not matched?); the first kernels launched:"
        ncu --clock-control none --section LaunchStats -c 12 python3 scripts/kernel_profile.py "$name" "$@" 2>&1 \
            | grep -E '^  [A-Za-z_].*\(' | head -12
    fi
done
