"""The OpenAI-compatible HTTP server: the wire format, and the FastAPI plumbing around the engine."""
