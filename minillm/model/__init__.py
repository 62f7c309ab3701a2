"""The model: config.json, RoPE, the decoder (RMSNorm, GQA attention, SwiGLU), tensor-parallel slices."""
