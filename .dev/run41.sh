export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
nvidia-smi --query-gpu=name --format=csv,noheader
bench() { python3 -m jaxkv.cli bench --shape llama2-7b --weights int4 --batch 8 --prompt 4096 --kv $2 --new-tokens 128 --repeats 2 --out $1 2>&1 | grep -E "^\|" | tail -3; }
echo ---- merge 4 warps; bench $OUT/run41_b8_p4096 bf16,K4V2
sed -i 's/^MERGE_WARPS = 4/MERGE_WARPS = 1/' jaxkv/kernels/kvdecode.py; grep -n "^MERGE_WARPS" jaxkv/kernels/kvdecode.py
echo ---- merge 1 warp; bench $OUT/run41_b8_p4096_merge1warp K4V2
sed -i 's/^MERGE_WARPS = 1/MERGE_WARPS = 4/' jaxkv/kernels/kvdecode.py; grep -n "^MERGE_WARPS" jaxkv/kernels/kvdecode.py
timeout 100 python3 -m pytest -q -x tests/test_kernels.py -k "append_matches or matches_xla_path or merge" 2>&1 | tail -2
