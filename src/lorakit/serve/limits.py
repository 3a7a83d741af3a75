"""What one request, and the server as a whole, may ask for. Each limit's refusal is an ApiError."""
from __future__ import annotations

import dataclasses

from ..errors import ConfigError


@dataclasses.dataclass(frozen=True)
class ServeLimits:
    #: largest request body (413 above): a long chat history fits, a runaway upload is refused unread
    max_body_bytes: int = 1_000_000
    #: most tokens one request may generate (``max_tokens`` above it is a 400); also the default for chat
    max_tokens: int = 1024
    #: most prompt tokens (after the chat template); longer prompts are a 400
    max_prompt_tokens: int = 4096
    #: requests waiting for a decoding row; one more is a 429
    max_queue: int = 64
    #: rows decoded together in one forward per step; further requests wait in the queue
    max_batch: int = 32

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                flag = "--" + field.name.replace("_", "-")
                raise ConfigError(f"{flag} must be a whole number >= 1, got {value!r}")
