"""One process per device over torch.distributed (gloo on CPU, nccl on CUDA)."""
