"""The speculative decoding engine: ragged verification and the batched decode loop."""
