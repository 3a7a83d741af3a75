"""Next tokens for a decoding batch (each row its own settings), and a row's text as it grows.

Greedy rows take the argmax, as ``generate(do_sample=False)``. Sampled rows go through transformers'
own warpers in ``generate``'s order (temperature, top-k as ``generate`` sets it: the model's generation
config, else 50; top-p) and draw from the row's own generator, seeded from the request's ``seed``, so a request's
draws depend on its seed alone, not on the rows it shares a batch with.
"""
from __future__ import annotations

import torch

#: a decoded text ending in this may be the first bytes of a character still being generated
_PARTIAL = "\ufffd"


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    import secrets

    gen = torch.Generator(device=device)
    gen.manual_seed(seed % 2**63 if seed is not None else secrets.randbits(63))
    return gen


def next_tokens(logits: torch.Tensor, settings: list, generators: list, top_k: int | None) -> list[int]:
    """One token per row of ``logits`` ([rows, vocab]); ``settings[i]`` is row i's ``Sampling``."""
    logits = logits.float()
    out = logits.argmax(dim=-1).tolist()
    for i, s in enumerate(settings):
        if not s.greedy:
            out[i] = _sample(logits[i:i + 1], s.temperature, s.top_p, top_k, generators[i])
    return out


def _sample(scores: torch.Tensor, temperature: float, top_p: float, top_k: int | None, gen: torch.Generator) -> int:
    from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k:
        scores = TopKLogitsWarper(top_k=top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p=top_p)(None, scores)
    probs = torch.softmax(scores, dim=-1)
    return int(torch.multinomial(probs, num_samples=1, generator=gen)[0, 0])


class TextTracker:
    """A row's generated text: stop sequences found, and the part safe to send while streaming.

    Text that could still turn into a stop sequence (its start is at the end of the text), or a
    character whose bytes are not all generated yet, is held back until the next tokens decide.
    """

    def __init__(self, stop: tuple[str, ...]):
        self.stop = stop
        self.text = ""
        self.sent = 0
        self.stopped = False

    def update(self, text: str) -> str:
        """Take the row's whole decoded text; return the new part that can be sent now."""
        self.text = text
        cut = self._first_stop(text)
        if cut is not None:
            self.text, self.stopped = text[:cut], True
            return self._take(cut)
        return self._take(len(text) - self._held_back(text))

    def finish(self) -> str:
        """Everything not yet sent (the row is done)."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def _first_stop(self, text: str) -> int | None:
        found = [i for i in (text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0]
        return min(found) if found else None

    def _held_back(self, text: str) -> int:
        if text.endswith(_PARTIAL):
            return len(text) - len(text.rstrip(_PARTIAL))
        hold = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:n]):
                    hold = n
                    break
        return hold
