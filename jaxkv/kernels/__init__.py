"""GPU kernels (Pallas, Triton lowering) behind the portable JAX paths: the quantized decode matmul
(:mod:`jaxkv.kernels.qmatmul`). Each kernel module states when it applies; everything else runs XLA."""
