"""Embeddings: the single-encoder Lightning pass, the shared pass that feeds several encoders from one
decode, and the content-keyed store both write to."""
