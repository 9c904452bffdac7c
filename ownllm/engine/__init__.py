"""Control plane: plain Python, no torch. Requests, scheduling, stopping, outputs."""
