"""What one machine can serve: `ownllm bench` measures a model on it (bench.py, drawn by plot.py) and `ownllm plan`
turns the measurements into users, tokens per day, cost and replicas (plan.py)."""
