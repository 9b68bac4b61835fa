"""Drafters: the Drafter protocol and its implementations (none, ngram, draft-model)."""
