"""The Ray Serve pieces that need no Ray: the options' errors, prefix affinity, prompt block hashes, the autoscaling
policy and the metrics aggregation. Milliseconds; tests/test_ray_serve.py runs the replicas themselves."""

from __future__ import annotations

import json
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ownllm.engine.kv_cache import KVCacheManager
from ownllm.ray_serve import ReplicaScaling
from ownllm.ray_serve.autoscaling import queue_and_kv_policy
from ownllm.ray_serve.metrics import aggregate
from ownllm.ray_serve.prefix_key import request_prefix_hashes
from ownllm.ray_serve.prefix_policy import PrefixAffinity
from ownllm.server.metrics import ServerMetrics
from tests.test_errors import assert_one_line_error

WITHOUT_RAY = ("import importlib.util, sys; real = importlib.util.find_spec; "
               "importlib.util.find_spec = lambda name, *a: None if name.split('.')[0] == 'ray' else real(name, *a); "
               "from ownllm.cli import main; sys.argv = ['ownllm'] + sys.argv[1:]; main()")


def run_without_ray(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", WITHOUT_RAY, *args], capture_output=True, text=True, timeout=120,
                          stdin=subprocess.DEVNULL)


def test_replicas_without_the_extra_name_it():
    result = run_without_ray("serve", "--replicas", "2", "--port", "8799")
    assert_one_line_error(result, "--replicas needs Ray Serve, which is not installed: pip install 'ownllm[ray]'")


@pytest.mark.parametrize("args, message", [
    ((None, 1, None, None, None), "autoscaling needs both --min-replicas and --max-replicas"),
    ((None, 3, 2, None, None), "--min-replicas (3) is more than --max-replicas (2)"),
    ((5, 1, 4, None, None), "--replicas (5) must lie between --min-replicas (1) and --max-replicas (4)"),
])
def test_replica_scaling_errors(args, message):
    pytest.importorskip("ray.serve", reason="the ownllm[ray] extra is not installed")
    with pytest.raises(ValueError) as error:
        ReplicaScaling.of(*args)
    assert str(error.value) == message


def test_threads_per_replica_needs_replicas():
    result = run_without_ray("serve", "--threads-per-replica", "2", "--port", "8799")
    assert_one_line_error(result, "--threads-per-replica needs --replicas (or --min-replicas/--max-replicas)")


def test_autoscaled_scaling_starts_at_min():
    pytest.importorskip("ray.serve", reason="the ownllm[ray] extra is not installed")
    scaling = ReplicaScaling.of(None, 2, 4, None, None)
    assert (scaling.num_replicas, scaling.is_autoscaling, scaling.threads_per_replica) == (2, True, 1)


def test_prefix_affinity_follows_the_longest_prefix_then_load():
    affinity = PrefixAffinity(imbalance_threshold=2, min_matched_blocks=2)
    loads = {"a": 0, "b": 0}
    shared, other = [1, 2, 3], [7, 8]
    first = affinity.choose(shared, loads)
    affinity.record(shared, first)
    assert affinity.choose([1, 2, 3, 4], loads) == first  # same prefix, same replica
    second = affinity.choose(other, loads)  # no known prefix: the idle replica chosen least recently
    assert second != first
    affinity.record(other, second)
    busy = {first: 3, second: 0}
    assert affinity.choose(shared, busy) == second  # 3 more in flight than the least loaded: by load
    assert affinity.choose(shared, {first: 2, second: 0}) == first  # within the threshold: by prefix
    assert affinity.choose([1, 5], loads) != affinity.choose([1, 6], loads)  # one shared block is too short to follow
    third = affinity.choose([9], loads)
    assert affinity.choose([10], loads) != third  # distinct prompts alternate over idle replicas


def test_prefix_affinity_forgets_a_replica_and_old_blocks():
    affinity = PrefixAffinity(min_matched_blocks=1, max_blocks=3)
    affinity.record([1, 2], "a")
    affinity.record([3, 4], "b")
    assert affinity.owners == {2: "a", 3: "b", 4: "b"}
    affinity.forget("b")
    assert list(affinity.owners) == [2] and affinity.longest_prefix_owner([1, 2], {"a": 0}) is None


class _Tokenizer:
    """Stands in for the model's tokenizer: one token per character; the 'template' joins role and text."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) for c in text]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        return self.encode("".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>")


def test_prompt_hashes_are_the_engines_block_hashes():
    tokenizer, system = _Tokenizer(), "s" * 70
    chat = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hello"}]}
    hashes = request_prefix_hashes("/v1/chat/completions", json.dumps(chat).encode(), tokenizer, 16)
    ids = tokenizer.encode_chat(chat["messages"])
    manager = KVCacheManager(16, 16)
    manager.allocate("r", len(ids))
    manager.cache_full_blocks("r", ids, len(ids))
    assert list(hashes) == manager.req_hashes["r"][:len(hashes)] and len(hashes) == (len(ids) - 1) // 16
    anthropic = {"system": system, "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}]}
    assert request_prefix_hashes("/v1/messages", json.dumps(anthropic).encode(), tokenizer, 16) == hashes
    other = {"messages": [{"role": "system", "content": "t" * 70}, {"role": "user", "content": "hello"}]}
    assert request_prefix_hashes("/api/chat", json.dumps(other).encode(), tokenizer, 16)[0] != hashes[0]
    assert len(request_prefix_hashes("/v1/completions", b'{"prompt": "' + b"x" * 40 + b'"}', tokenizer, 16)) == 2
    assert request_prefix_hashes("/v1/chat/completions", b"not json", tokenizer, 16) == ()
    assert request_prefix_hashes("/v1/models", b"", tokenizer, 16) == ()


def _context(replicas: int, requests: float, kv_usage: list[float]):
    return SimpleNamespace(current_num_replicas=replicas, target_num_replicas=replicas, total_num_requests=requests,
                           config=SimpleNamespace(get_target_ongoing_requests=lambda: 16),
                           aggregated_metrics={"kv_cache_usage": dict(enumerate(kv_usage))})


def test_autoscaling_takes_the_larger_of_requests_and_kv_use():
    assert queue_and_kv_policy(_context(2, 64, [0.1, 0.1]))[0] == 4  # 64 requests / 16 per replica
    assert queue_and_kv_policy(_context(2, 4, [0.7, 1.4]))[0] == pytest.approx(3.0)  # 2 * 1.05 / 0.7
    assert queue_and_kv_policy(_context(2, 0, []))[0] == 0


def test_metrics_carry_a_replica_label():
    metrics = ServerMetrics(lambda: {"prefix_cache_hits": 5, "prefix_cache_queries": 10})
    metrics.time_to_first_token.observe(0.05)
    text, _ = metrics.render()
    merged = aggregate([("r1", text), ("r2", text)])[0].decode()
    assert "ownllm_replicas 2.0" in merged
    for replica in ("r1", "r2"):
        assert f'ownllm_prefix_cache_hits_total{{replica="{replica}"}} 5.0' in merged
        assert f'ownllm_time_to_first_token_seconds_count{{replica="{replica}"}} 1.0' in merged


def test_a_replica_failing_mid_stream_ends_the_stream_with_the_apis_error_event():
    from ownllm.ray_serve.ingress import replica_error, stream_error_event

    error = replica_error(RuntimeError("gone"))
    message = "the replica serving this request failed (RuntimeError); retry"
    openai_event = stream_error_event("/v1/chat/completions", "text/event-stream; charset=utf-8", error).decode()
    assert openai_event.startswith("data: ") and json.loads(openai_event[6:])["error"]["message"] == message
    anthropic_event = stream_error_event("/v1/messages", "text/event-stream", error).decode()
    assert anthropic_event.startswith("event: error\ndata: ")
    assert json.loads(anthropic_event.split("data: ")[1])["error"]["message"] == message
    assert json.loads(stream_error_event("/api/chat", "application/x-ndjson", error))["error"] == message
    assert stream_error_event("/v1/chat/completions", "application/json", error) == b""
