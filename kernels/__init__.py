"""blip3v.kernels: Triton kernels for the GPU fast path, one file each with its PyTorch reference,
the kernel, a dispatcher (kernel on CUDA with Triton, reference elsewhere), `check()` with a stated
tolerance, and `bench()`:

    int4_matmul       weight-only INT4 (group-wise RTN) matmul for decode-sized inputs
    decode_attention  one query per row over a static KV cache, split over the context (GQA)
    token_learner     TokenLearner with the softmax over tokens + weighted sum fused
    rmsnorm           residual add + RMSNorm fused

    python -m blip3v.kernels.decode_attention      # check + benchmark on a GPU
    python -m pytest tests/test_kernels.py          # CPU: runs the kernels in Triton's interpreter

Triton is optional (`pip install 'blip3v[kernels]'`); nothing here imports it at package import.
"""
