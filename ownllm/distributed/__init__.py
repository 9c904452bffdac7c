"""Tensor parallelism: one model split across worker processes that talk through torch.distributed.

parallel_state.py owns this process's tensor-parallel group (rank, size, the collectives the layers call);
executor.py the engine's side (the executor in front of the model runner: one in-process runner, or T worker
processes); worker.py the worker process itself. The engine above sees only execute_model(SchedulerOutput).
"""
