"""The offline SVDQuant algorithm: quantizers, low-rank branch, smoothing, residual quantization."""
