"""Images in the control plane (no model, no torch): the scheduler's encoder budget, one encoding per image hash,
the encoder cache's eviction order, and image hashes in the prefix cache's block hashes."""

from __future__ import annotations

from ownllm.config import SchedulerConfig
from ownllm.engine.encoder_cache import EncoderCacheManager
from ownllm.engine.kv_cache import KVCacheManager
from ownllm.engine.scheduler import Scheduler
from ownllm.multimodal import ImageInput
from ownllm.request import Request
from ownllm.sampling_params import SamplingParams


def make(budget=100, encoder_budget=20, encoder_cache=40, block_size=4) -> Scheduler:
    config = SchedulerConfig(budget, 8, max_num_encoder_tokens=encoder_budget, encoder_cache_tokens=encoder_cache)
    return Scheduler(config, KVCacheManager(64, block_size), 0)


def image(offset: int, length: int, name: str) -> ImageInput:
    return ImageInput(name, offset, length, None)


def request(rid: str, prompt_len: int, images: list[ImageInput], first_token: int = 1) -> Request:
    return Request(rid, list(range(first_token, first_token + prompt_len)), SamplingParams(max_tokens=10),
                   images=images)


def step(s: Scheduler):
    out = s.schedule()
    for r in s.running:
        if r.request_id in out.num_scheduled_tokens:
            s.advance(r, out.num_scheduled_tokens[r.request_id], 0, 0)
            s.cache_blocks(r)
    return out


def test_chunk_stops_before_an_image_over_the_step_encoder_budget():
    s = make()
    s.add(request("a", 60, [image(4, 16, "x"), image(30, 16, "y")]))
    first = step(s)
    assert first.num_scheduled_tokens == {"a": 30} and first.encoder_inputs == {"a": [0]}
    second = step(s)
    assert second.num_scheduled_tokens == {"a": 30} and second.encoder_inputs == {"a": [1]}


def test_an_image_is_encoded_once_for_every_request_that_shows_it():
    s = make()
    s.add(request("a", 30, [image(4, 16, "x")]))
    s.add(request("b", 30, [image(2, 16, "x")], first_token=50))
    out = step(s)
    assert out.encoder_inputs == {"a": [0]} and set(out.num_scheduled_tokens) == {"a", "b"}
    s.add(request("c", 30, [image(0, 16, "x")], first_token=90))
    assert step(s).encoder_inputs == {}  # still held: "c" reuses it
    assert s.encoder_cache.num_encoded == 1


def test_a_chunk_stops_before_an_image_the_encoder_cache_has_no_room_for():
    """While another request still needs the one output the cache holds, "b" computes only up to its image; once
    that output is released, it is evicted for "b"'s image, and the runner is told."""
    s = make(budget=100, encoder_budget=16, encoder_cache=16)
    s.encoder_cache.add("other", "w", 16)
    s.add(request("b", 40, [image(8, 16, "y")]))
    out = step(s)
    assert out.num_scheduled_tokens == {"b": 8} and out.encoder_inputs == {}
    s.encoder_cache.release("other", ["w"])
    out = step(s)
    assert out.num_scheduled_tokens == {"b": 32} and out.encoder_inputs == {"b": [0]}
    assert out.freed_encoder_hashes == ["w"]


def test_encoder_cache_evicts_unreferenced_outputs_least_recently_used_first():
    cache = EncoderCacheManager(capacity=30)
    cache.add("r1", "x", 10)
    cache.add("r2", "y", 10)
    cache.release("r2", ["y"])
    cache.release("r1", ["x"])  # x released last: the most recently used
    assert cache.can_add(30) and not cache.can_add(31)
    cache.add("r3", "z", 15)
    assert cache.take_freed() == ["y"] and cache.has("x") and not cache.has("y")
    cache.use("r4", "x")
    assert not cache.can_add(25)  # x is referenced again, so it cannot be evicted


def test_same_text_different_images_share_only_the_blocks_before_the_image():
    kv = KVCacheManager(16, 4)
    tokens = list(range(20))
    kv.allocate("a", 20)
    kv.cache_full_blocks("a", tokens, 20, [(6, 8, "x")])
    assert kv.find_cached_prefix(tokens + [99], [(6, 8, "y")])[1] == 4  # block [4, 8) holds image tokens
    assert kv.find_cached_prefix(tokens + [99], [(6, 8, "x")])[1] == 20
    assert kv.find_cached_prefix(tokens + [99])[1] == 4  # text alone is not the text with an image either


def whole(offset: int, length: int, name: str) -> ImageInput:
    return ImageInput(name, offset, length, None, indivisible=True)


def test_a_chunk_stops_before_an_indivisible_image_or_takes_it_whole():
    """Gemma 3's images (tokens attending each other both ways): chunks of 20 never end inside one; the one that
    starts at an image takes it whole."""
    s = make(budget=20)
    s.add(request("a", 40, [whole(8, 16, "x")]))
    assert [step(s).num_scheduled_tokens["a"] for _ in range(3)] == [8, 20, 12]


def test_an_indivisible_image_waits_for_a_step_with_room_instead_of_overshooting():
    """A step whose budget another request has partly used does not start an image it cannot finish: "b" waits
    (where it used to take its 16 tokens, 6 past the budget), and goes the step after; no step computes more than 20."""
    s = make(budget=20)
    s.add(request("a", 30, []))
    s.add(request("b", 20, [whole(0, 16, "x")], first_token=100))
    steps = [step(s).num_scheduled_tokens for _ in range(3)]
    assert steps == [{"a": 20}, {"a": 10}, {"b": 20}]
    assert all(sum(counts.values()) <= 20 for counts in steps)


def test_a_divisible_image_is_cut_where_the_budget_ends():
    s = make(budget=10)
    s.add(request("a", 40, [image(4, 16, "x")]))
    assert [step(s).num_scheduled_tokens["a"] for _ in range(4)] == [10, 10, 10, 10]
