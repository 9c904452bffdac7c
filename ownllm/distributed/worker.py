"""A tensor-parallel worker process: joins the group, builds its rank's shard of the model runner, then runs
every SchedulerOutput the executor sends until told to stop (None) or its pipe closes.

Every rank samples, from the same all-gathered logits with the same seeded generators and the same global
seed, so every rank draws the same tokens: each keeps its own per-request token state (the next step's inputs)
in step without a second message per step, and the workers stay alike (vLLM's TP workers do the same). Only
rank 0's RunnerOutput goes back; the others answer None. An error is answered as a WorkerError (the
executor decides whether it is one request's fault or fatal).
"""

from __future__ import annotations

from multiprocessing.connection import Connection

import torch

from ownllm.config import EngineConfig
from ownllm.distributed.executor import COLLECTIVE_STATS, WorkerError
from ownllm.distributed.parallel_state import init_tensor_parallel, tp_group


def worker_main(rank: int, size: int, init_method: str, backend: str, timeout_s: float, config: EngineConfig,
                device: str, seed: int, num_threads: int, pipe: Connection) -> None:
    try:
        runner = _build_runner(rank, size, init_method, backend, timeout_s, config, device, seed, num_threads)
    except BaseException as error:
        pipe.send(WorkerError(error))
        return
    pipe.send(runner.num_blocks)
    while True:
        try:
            message = pipe.recv()
        except (EOFError, ConnectionError):  # the engine is gone
            break
        if message is None:
            break
        if message == COLLECTIVE_STATS:
            tp = tp_group()
            pipe.send((tp.communication_seconds, tp.num_collectives))
            tp.communication_seconds, tp.num_collectives = 0.0, 0
            continue
        try:
            output = runner.execute(message)
        except Exception as error:
            pipe.send(WorkerError(error))
            continue
        pipe.send(output if rank == 0 else None)
    torch.distributed.destroy_process_group()


def _build_runner(rank: int, size: int, init_method: str, backend: str, timeout_s: float, config: EngineConfig,
                  device: str, seed: int, num_threads: int):
    from ownllm.loader import load_checkpoint
    from ownllm.worker.model_runner import ModelRunner

    torch.set_num_threads(num_threads)
    if device.startswith("cuda"):
        device = f"cuda:{rank}"
        torch.cuda.set_device(device)
    init_tensor_parallel(rank, size, init_method, backend, timeout_s)
    torch.manual_seed(seed)
    checkpoint = load_checkpoint(config.model, config.dtype, keep_quantized=device == "cpu", mmproj=config.mmproj)
    return ModelRunner(checkpoint, config.cache, checkpoint.tokenizer.eos_token_ids, config.scheduler.max_num_seqs,
                       device, None, config.backends)
