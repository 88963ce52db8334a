export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
rm -rf .dev/fold; mkdir -p .dev/fold; git archive 33fb1bf jaxkv scripts | tar -x -C .dev/fold
sweep() { PYTHONPATH=$PWD python3 scripts/kv_decode_sweep.py --tiles 256:128:1 --repeats 10 --out $1 2>&1 | grep -E "^  " | grep -v "|" ; }
bench() { PYTHONPATH=$PWD python3 -m jaxkv.cli bench --shape llama2-7b --weights int4 --batch 8 --prompt 4096 --kv $2 --new-tokens 128 --repeats 2 --out $1 2>&1 | grep -E "^\|" | tail -3; }
echo ---- sweep merge; sweep $OUT/run40_sweep_merge
echo ---- bench merge; bench $OUT/run40_b8_p4096 bf16,K4V2
echo ---- bench fold; (cd .dev/fold && bench $OUT/run40_b8_p4096_fold K4V2)
echo ---- tests
PYTHONPATH=$PWD timeout 230 python3 -m pytest -q -x tests/test_kernels.py tests/test_kvcache.py tests/test_kvcache_model.py -k "append or kv_decode or merge or matches_xla_path or decode_kernel" 2>&1 | tail -3
