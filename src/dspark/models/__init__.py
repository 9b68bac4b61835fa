"""Native decoder models for the Llama family, their KV cache and weight loading."""
