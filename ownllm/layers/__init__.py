"""Shared building blocks of the model files: norms, rotary embeddings, attention, MLPs."""
