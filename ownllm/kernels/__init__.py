"""Hand-written CPU kernels, compiled on first use and cached; every one has a plain-torch fallback."""
