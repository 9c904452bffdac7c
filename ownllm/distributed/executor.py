"""Executors: what the engine core calls each step, execute_model(SchedulerOutput) -> RunnerOutput.

UniprocExecutor holds one ModelRunner in this process (tensor parallel size 1, the default: a plain call).
MultiprocExecutor starts T worker processes (worker.py), one per tensor-parallel rank, which hold the model's
shards and join one torch.distributed group (gloo on the CPU, NCCL on CUDA). Each step it sends every worker
the same SchedulerOutput (plain data) over its pipe; the workers run the same step, joined by their
collectives, and every rank samples the same tokens (see worker.py for why); rank 0's
RunnerOutput is the step's. The driver never joins a collective: it waits on the workers' pipes and on their
process sentinels together, so a worker that dies (or a step that outlasts the timeout) stops the engine at
once with ExecutorDeadError naming the rank, never a hang; the workers' collectives have a timeout too.

Workers start by torch.multiprocessing's "forkserver" method: like "spawn", each is a fresh process that never
shares the engine's threads (fork would copy the engine's OpenMP pool and locks mid-use), but the fork server
imports torch and the worker module once, so each later engine's workers start without paying that import
(~5 s a process on a busy 2-core machine).
"""

from __future__ import annotations

import logging
import random
import socket
import traceback
import weakref
from concurrent.futures import Future
from multiprocessing.connection import wait
from typing import Protocol

from ownllm.config import EngineConfig
from ownllm.outputs import RunnerOutput, SchedulerOutput

logger = logging.getLogger(__name__)
STARTUP_TIMEOUT_S = 600.0  # loading a model's shards
STEP_TIMEOUT_S = 300.0  # one step, all ranks; the workers' collectives time out sooner (COLLECTIVE_TIMEOUT_S)
COLLECTIVE_TIMEOUT_S = 120.0
ERROR_GRACE_S = 10.0  # after one rank's error, how long the others may take to report theirs
COLLECTIVE_STATS = "collective_stats"  # a message asking the workers for their collectives' time


class ExecutorDeadError(RuntimeError):
    """A tensor-parallel worker died or stopped answering: the engine cannot go on."""


class Executor(Protocol):
    num_blocks: int  # KV-cache blocks every worker holds

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput: ...

    def shutdown(self) -> None: ...


class UniprocExecutor:
    """The model runner in this process (anything with `execute`, e.g. a fake in tests)."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.num_blocks = getattr(runner, "num_blocks", 0)

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.runner.execute(scheduler_output)

    def shutdown(self) -> None:
        pass


class WorkerError:
    """What a worker sends back instead of a result when its step (or start-up) raised."""

    def __init__(self, error: BaseException) -> None:
        self.type_name = type(error).__name__
        self.message = str(error)
        self.is_value_error = isinstance(error, ValueError)
        self.traceback = "".join(traceback.format_exception(error))

    def exception(self) -> Exception:
        return (ValueError if self.is_value_error else RuntimeError)(self.message)


class MultiprocExecutor:
    def __init__(self, config: EngineConfig, device: str) -> None:
        import torch
        import torch.multiprocessing as mp

        from ownllm.distributed.worker import worker_main

        size = config.tensor_parallel_size
        context = mp.get_context("forkserver")
        context.set_forkserver_preload(["ownllm.distributed.worker"])
        init_method = f"tcp://127.0.0.1:{_free_port()}"
        backend = "nccl" if device.startswith("cuda") else "gloo"
        seed = random.randrange(2**62)  # the same on every rank, so unseeded sampling draws the same noise
        threads = max(1, torch.get_num_threads() // size)  # the ranks share this process's cores
        self.size = size
        self.processes, self.pipes = [], []
        self.error: ExecutorDeadError | None = None
        for rank in range(size):
            ours, theirs = context.Pipe()
            process = context.Process(
                target=worker_main, name=f"ownllm-tp{rank}", daemon=True,
                args=(rank, size, init_method, backend, COLLECTIVE_TIMEOUT_S, config, device, seed, threads, theirs))
            process.start()
            theirs.close()
            self.processes.append(process)
            self.pipes.append(ours)
        self._finalizer = weakref.finalize(self, _stop, self.processes, self.pipes)
        replies = self._gather(STARTUP_TIMEOUT_S, "start")
        self.num_blocks = replies[0]

    def execute_model(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if self.error is not None:
            raise self.error
        if isinstance(scheduler_output.allowed_token_bitmask, Future):  # the workers get the filled masks
            scheduler_output.allowed_token_bitmask = scheduler_output.allowed_token_bitmask.result()
        for rank, pipe in enumerate(self.pipes):
            try:
                pipe.send(scheduler_output)
            except (BrokenPipeError, ConnectionError, EOFError):
                self._died(rank, "step")
        return self._gather(STEP_TIMEOUT_S, "step")[0]

    def _gather(self, timeout_s: float, what: str) -> list:
        """Every rank's reply, in rank order. A worker's error raised alike on every rank (e.g. a request's bad
        data) is re-raised as it is, for the engine's fault isolation; a dead, silent or lone failing rank is
        fatal. Once one rank has failed, the others get ERROR_GRACE_S to answer (a rank left waiting in a
        collective would only answer at its timeout)."""
        replies: dict[int, object] = {}
        while len(replies) < self.size:
            pending = [rank for rank in range(self.size) if rank not in replies]
            has_error = any(isinstance(reply, WorkerError) for reply in replies.values())
            ready = wait([self.pipes[rank] for rank in pending] + [self.processes[rank].sentinel for rank in pending],
                         timeout=ERROR_GRACE_S if has_error else timeout_s)
            if not ready and has_error:
                break
            if not ready:
                self._die(f"tensor-parallel worker rank {pending[0]} did not answer its {what} within "
                          f"{timeout_s:.0f} s")
            for rank in pending:
                if self.pipes[rank] in ready:
                    try:
                        replies[rank] = self.pipes[rank].recv()
                    except (EOFError, ConnectionError):
                        self._died(rank, what)
                elif self.processes[rank].sentinel in ready:
                    self._died(rank, what)
        errors = [reply for reply in replies.values() if isinstance(reply, WorkerError)]
        if errors:
            for rank, reply in replies.items():
                if isinstance(reply, WorkerError) and not reply.is_value_error:  # a bad input speaks for itself
                    logger.error("tensor-parallel worker rank %d failed:\n%s", rank, reply.traceback)
            if what == "start":
                self.shutdown()
                raise errors[0].exception()
            if len(errors) < self.size or len({(e.type_name, e.message) for e in errors}) > 1:
                self._die(f"tensor-parallel workers failed apart ({errors[0].type_name}: {errors[0].message})")
            raise errors[0].exception()
        return [replies[rank] for rank in range(self.size)]

    def _died(self, rank: int, what: str) -> None:
        process = self.processes[rank]
        process.join(timeout=1.0)
        self._die(f"tensor-parallel worker rank {rank} died during its {what} (pid {process.pid}, exit code "
                  f"{process.exitcode})")

    def _die(self, message: str) -> None:
        self.error = ExecutorDeadError(f"{message}; the engine has stopped")
        logger.error("%s", self.error)
        for process in self.processes:  # the others may wait in a collective for the lost rank
            process.kill()
        self.shutdown()
        raise self.error

    def collective_stats(self) -> list[tuple[float, int]]:
        """Each rank's (seconds in collectives, number of collectives) since the last call, which resets them."""
        for pipe in self.pipes:
            pipe.send(COLLECTIVE_STATS)
        return self._gather(STEP_TIMEOUT_S, "stats")

    def shutdown(self) -> None:
        self._finalizer()


def _stop(processes, pipes) -> None:
    for pipe in pipes:
        try:
            pipe.send(None)  # asks the worker to leave its loop
        except (OSError, ValueError):
            pass
    for process in processes:
        process.join(timeout=5.0)
        if process.is_alive():
            process.kill()
            process.join(timeout=5.0)
    for pipe in pipes:
        pipe.close()


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
