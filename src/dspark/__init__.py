"""dspark: lossless speculative decoding with DSpark drafters.

Shape letters used in docstrings and shape comments throughout the package:
B batch (requests in a forward), N new tokens per row in a forward, T context (cache positions),
K draft block, V vocabulary, H attention heads, Hkv key/value heads, D head dim, R Markov rank.
"""

__version__ = "0.1.0"
