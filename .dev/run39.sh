export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
for r in base:1f3d7d6 heads:915aa7a; do n=${r%%:*}; rm -rf .dev/$n; mkdir -p .dev/$n; git archive ${r#*:} jaxkv scripts | tar -x -C .dev/$n; done
python3 - <<'PY'
s=open('.dev/base/scripts/kv_decode_sweep.py').read()
old="""            us = sum(d for _, _, d in gpu_kernels(trace_file(tmp))) / args.repeats"""
new="""            launches = gpu_kernels(trace_file(tmp))
        kernels = {}
        for _, kname, d in launches:
            kernels[kname] = kernels.get(kname, 0.0) + d / args.repeats
        print("   ", name, {k: round(v, 1) for k, v in kernels.items()}, file=sys.stderr)
        us = sum(kernels.values())"""
assert old in s; open('.dev/base/scripts/kv_decode_sweep.py','w').write(s.replace(old,new))
PY
sweep() { PYTHONPATH=$PWD python3 scripts/kv_decode_sweep.py --tiles 256:128:1 --repeats 10 --out $1 2>&1 | grep -E "^  " | grep -v "|" ; }
bench() { PYTHONPATH=$PWD python3 -m jaxkv.cli bench --shape llama2-7b --weights int4 --batch 8 --prompt 4096 --kv K4V2 --new-tokens 128 --repeats 2 --out $1 2>&1 | grep -E "^\|" | tail -3; }
echo ---- sweep base; (cd .dev/base && sweep $OUT/run39_sweep_base)
echo ---- sweep heads; (cd .dev/heads && sweep $OUT/run39_sweep_heads)
echo ---- sweep fold; sweep $OUT/run39_sweep_fold
echo ---- bench base; (cd .dev/base && bench $OUT/run39_b8_p4096_base)
echo ---- bench fold; bench $OUT/run39_b8_p4096_fold
echo ---- tests fold
PYTHONPATH=$PWD timeout 220 python3 -m pytest -q -x tests/test_kernels.py tests/test_kvcache.py tests/test_kvcache_model.py -k "append or kv_decode or merge or matches_xla_path or decode_kernel" 2>&1 | tail -3
