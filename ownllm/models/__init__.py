"""Model architectures, one file each, keeping Hugging Face parameter names."""
