"""AsyncEngine: the EngineClient the server talks to. The engine loop runs in a background thread, the only
one that runs the model (see from_model).

Callers (asyncio) send commands (add, abort) through a thread-safe queue; the loop applies them
between steps, runs `Engine.step()` while anything is unfinished, and hands each RequestOutput to
its request's own asyncio queue: a step's outputs go to each event loop in one call (one wake-up of that loop a
step, however many of its requests progressed), not one call per request. Leaving a `generate()` stream early (a client disconnect cancels
it) aborts the request, which frees its KV cache at once.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from ownllm.config import EngineConfig
from ownllm.engine.build import build_engine, default_sampling_params
from ownllm.engine.engine import Engine
from ownllm.outputs import RequestOutput
from ownllm.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineOverloaded(RuntimeError):
    """More requests are waiting than the engine accepts; the caller should retry later."""


class EngineDead(RuntimeError):
    """The engine loop failed; the request could not be completed."""


class RequestFailed(RuntimeError):
    """The engine failed on this request alone (a fault in its model forward or sampling); others go on."""


@dataclass
class _Stream:
    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue


class AsyncEngine:
    """thread: the engine thread, already started by from_model (which loads the model on it); by default one is
    started here."""

    def __init__(self, engine: Engine, model_name: str, max_waiting: int | None = None,
                 thread: threading.Thread | None = None) -> None:
        self.engine = engine
        self.model_name = model_name
        self.tokenizer = engine.tokenizer
        self.max_model_len = engine.max_model_len
        self.model_config = engine.model_config
        self.model_path = engine.model_path
        self.generation_config = engine.generation_config
        self.reasoning_parser = engine.reasoning_parser  # how the server reads answers (server/answers.py)
        self.tool_parser_name = engine.tool_parser_name
        self.max_waiting = max_waiting
        self.started_at = time.time()
        self._commands: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ids = itertools.count()
        self._stopped = False
        self._thread = thread or threading.Thread(target=self._loop, name="ownllm-engine", daemon=True)
        if thread is None:
            self._thread.start()

    @classmethod
    def from_config(cls, config: EngineConfig, max_waiting: int | None = None,
                    model_name: str | None = None) -> "AsyncEngine":
        """Builds the engine (build_engine) on the engine thread, which then runs every step, so no other thread
        ever runs OpenMP work: libgomp spins a team's idle workers only while its threads number no more than the
        cores, and the team that loading on the caller's thread left behind made each step wake sleeping workers
        instead (bundled model, one client: 3x slower decode)."""
        loaded: queue.SimpleQueue = queue.SimpleQueue()
        set_up = threading.Event()  # `engine` below is built

        def load_then_loop() -> None:
            try:
                built = build_engine(config)
            except BaseException as error:  # handed to the caller
                loaded.put(error)
                return
            loaded.put(built)
            set_up.wait()
            engine._loop()

        thread = threading.Thread(target=load_then_loop, name="ownllm-engine", daemon=True)
        thread.start()
        built = loaded.get()
        if isinstance(built, BaseException):
            raise built
        path = built.model_path
        name = model_name or (path.stem if path and path.suffix == ".gguf" else str(config.model or "smollm2-135m-instruct"))
        engine = cls(built, name, max_waiting, thread=thread)
        set_up.set()
        return engine

    def default_sampling_params(self) -> SamplingParams:
        return default_sampling_params(self.generation_config)

    # ---- the API (call from an asyncio event loop)

    async def generate(
        self, prompt_token_ids: list[int], sampling_params: SamplingParams, request_id: str | None = None,
        prompt: str | None = None, priority: int = 0, images: list = (),
    ) -> AsyncIterator[RequestOutput]:
        """Streams RequestOutputs (cumulative or deltas, as sampling_params.output_kind asks); the last has
        finished=True. Raises ValueError for a request the engine refuses (e.g. too long), EngineOverloaded when
        too many wait."""
        request_id = request_id or f"req-{next(self._ids)}"
        loop = asyncio.get_running_loop()
        stream = _Stream(loop, asyncio.Queue())
        added: asyncio.Future = loop.create_future()

        def add() -> None:
            try:
                if self.max_waiting is not None and self.engine.num_waiting >= self.max_waiting:
                    raise EngineOverloaded(f"{self.engine.num_waiting} requests are already waiting")
                self.engine.add_request(request_id, prompt_token_ids, sampling_params, prompt, priority, images)
                self._streams[request_id] = stream
                loop.call_soon_threadsafe(_resolve, added, None)
            except Exception as error:  # handed to the caller, not the loop
                loop.call_soon_threadsafe(_resolve, added, error)

        finished = False
        self._send(add)
        try:  # from here on, leaving early (cancelled while waiting too) aborts the request
            error = await added
            if error is not None:
                finished = True  # it was never added
                raise error
            while True:
                item = await stream.queue.get()
                if isinstance(item, BaseException):
                    raise item
                yield item
                if item.finished:
                    finished = True
                    return
        finally:
            if not finished:
                self._send(lambda: self._abort_now(request_id))

    async def abort(self, request_id: str) -> None:
        self._send(lambda: self._abort_now(request_id))

    async def start_samples(self, request_id: str, count: int) -> None:
        """Starts more of a request's held samples (Engine.start_samples)."""
        self._send(lambda: self.engine.start_samples(request_id, count))

    async def stop_samples(self, request_id: str, indices: list[int]) -> None:
        """Ends some of a request's samples at once (Engine.stop_samples); its stream reports them finished."""
        self._send(lambda: self.engine.stop_samples(request_id, indices))

    def stats(self) -> dict:
        return {**self.engine.stats(), "num_unfinished": len(self._streams)}

    @property
    def is_alive(self) -> bool:
        """The engine thread still runs steps (a replica's health check)."""
        return not self._stopped and self._thread.is_alive()

    def shutdown(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._commands.put(lambda: None)  # wake the loop so it sees _stopped
            self._thread.join(timeout=10)

    # ---- the engine thread

    def _send(self, command: Callable[[], None]) -> None:
        if self._stopped:
            raise EngineDead("the engine has shut down")
        self._commands.put(command)

    def _abort_now(self, request_id: str) -> None:
        self._streams.pop(request_id, None)
        self.engine.abort(request_id)

    def _loop(self) -> None:
        while not self._stopped:
            block = not self.engine.has_unfinished()
            try:
                command = self._commands.get(block=block)
            except queue.Empty:
                pass
            else:
                try:
                    command()
                except Exception:  # e.g. its caller's event loop closed: the engine goes on
                    logger.exception("engine command failed")
                continue  # drain every pending command before the next step
            try:
                outputs = self.engine.step()
            except Exception as error:  # a bug or resource failure: fail what is running, keep serving
                logger.exception("engine step failed")
                self._fail_all(EngineDead(f"the engine failed: {error}"))
                continue
            deliveries = []
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is not None:
                    item = RequestFailed(output.error) if output.error is not None else output
                    if output.finished:
                        del self._streams[output.request_id]
                    deliveries.append((output.request_id, stream, item))
            self._deliver(deliveries)

    def _deliver(self, deliveries: list[tuple[str, _Stream, RequestOutput | BaseException]]) -> None:
        """Puts each item on its stream's queue: one call_soon_threadsafe per event loop for all of its items."""
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[str, _Stream, RequestOutput | BaseException]]] = {}
        for delivery in deliveries:
            by_loop.setdefault(delivery[1].loop, []).append(delivery)
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, [(stream.queue, item) for _, stream, item in items])
            except RuntimeError:  # its event loop has closed: nobody listens any more
                for request_id, _, _ in items:
                    self._abort_now(request_id)

    def _fail_all(self, error: BaseException) -> None:
        streams = list(self._streams.items())
        self._streams.clear()
        for request_id, _ in streams:
            self.engine.abort(request_id)
        self._deliver([(request_id, stream, error) for request_id, stream in streams])


def _put_all(items: list[tuple[asyncio.Queue, RequestOutput | BaseException]]) -> None:
    """On the event loop: one step's items, each put on its stream's queue."""
    for queue_, item in items:
        queue_.put_nowait(item)


def _resolve(future: asyncio.Future, error: BaseException | None) -> None:
    if not future.done():
        future.set_result(error)
