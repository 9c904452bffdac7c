"""SamplingParams: everything a user may ask of one request's decoding, validated on construction.

Field names and meanings follow vLLM's SamplingParams (and so OpenAI's API), so users know them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass
class StructuredOutputsParams:
    """What the output must match (vLLM's shape): exactly one of a JSON schema, any JSON object, a regex, one of
    several strings, or a Lark grammar."""

    json: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    source: str = "structured_outputs"  # the request field it came from, named in errors

    def __post_init__(self) -> None:
        kinds = [name for name in ("json", "regex", "choice", "grammar") if getattr(self, name) is not None]
        kinds += ["json_object"] * self.json_object
        if len(kinds) != 1:
            raise ValueError("structured_outputs needs exactly one of json, json_object, regex, choice, grammar; "
                             f"got {', '.join(kinds) or 'none'}")
        if self.choice is not None and not (self.choice and all(isinstance(c, str) for c in self.choice)):
            raise ValueError("structured_outputs.choice must be a non-empty list of strings")


@dataclass
class SamplingParams:
    n: int = 1
    # of the n samples, how many start at once (None: all); the others wait for Engine.start_samples (an early-stopping
    # vote draws its samples in waves)
    n_started: int | None = None
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 (or -1) means no top-k
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF/CTRL style, over prompt and output tokens
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: until EOS or the model's context is full
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    logprobs: int | None = None  # number of top alternatives returned per token (the sampled one is always included)
    # logprobs of the prompt's tokens (each given those before it) with this many top alternatives; such a
    # request computes its whole prompt (no prefix-cache hit), since a cached block has no logits
    prompt_logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = None
    thinking_budget: int | None = None  # reasoning tokens before the engine ends the thinking itself
    # what each engine output carries: "cumulative" (all so far), "delta" (what the step added) or
    # "final_only" (one output, when finished)
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if self.top_k == -1:
            self.top_k = 0
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.n >= 1, f"n must be at least 1, got {self.n}"),
            (self.n_started is None or 1 <= self.n_started <= self.n,
             f"n_started must be between 1 and n ({self.n}), got {self.n_started}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be >= 0 (0 or -1 disables it), got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2, f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be at least 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (self.prompt_logprobs is None or self.prompt_logprobs >= 0,
             f"prompt_logprobs must be >= 0, got {self.prompt_logprobs}"),
            (self.thinking_budget is None or self.thinking_budget >= 0,
             f"thinking_budget must be >= 0, got {self.thinking_budget}"),
            (self.output_kind in OUTPUT_KINDS, f"output_kind must be one of {', '.join(OUTPUT_KINDS)}, "
             f"got {self.output_kind!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    def for_sample(self, index: int) -> "SamplingParams":
        """The params of the index-th of n samples: n=1, a distinct seed if one was given, and prompt logprobs
        (which all samples share) computed by the first alone."""
        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, n_started=None, seed=seed, prompt_logprobs=self.prompt_logprobs if index == 0 else None)
