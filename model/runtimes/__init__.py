"""Inference runtimes behind one contract (contract.py): the CPU runners, CUDA, TensorRT, the GPU probe, and the choice of runtime and precision."""
