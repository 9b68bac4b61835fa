"""Training data: prompt readers, answer regeneration, tokenisation with assistant loss masks."""
