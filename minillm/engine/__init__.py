"""Requests in, one batched step at a time, tokens out: plan, schedule, run the forward, sample."""
