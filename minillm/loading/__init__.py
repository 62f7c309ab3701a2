"""From checkpoint files to a model in memory: memory-mapped safetensors, prepacking, quantization."""
