"""GPU kernels (Pallas, Triton lowering) behind the portable JAX paths: the quantized decode matmul
(:mod:`jaxkv.kernels.qmatmul`) and the split-K decode attention over the quantized KV cache
(:mod:`jaxkv.kernels.kvdecode`; ``JAXKV_KV_DECODE=xla`` turns it off). Each kernel module states
when it applies; everything else runs XLA."""
