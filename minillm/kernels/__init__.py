"""Compiled CPU kernels for decode: matrix products that stream compact weights at memory speed."""
