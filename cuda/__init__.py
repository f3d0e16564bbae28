"""GPU kernels (Triton) that the physical operators call on CUDA tensors.

Mapped to ``kql.cuda``; never a top-level ``cuda`` package (it would shadow NVIDIA's).
"""
