"""Data plane: tensors. Builds model inputs from requests, runs the model and samples."""
