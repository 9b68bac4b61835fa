"""Drafter training: anchors and blocks, losses (pure), the trainer (the only place with optimisers)."""
