"""The engine: one thread owns the model and decodes every running request together.

Continuous batching. Between two decoding steps the engine runs pending commands (adapter loads and
unloads), drops rows that finished or whose client left, and admits waiting requests: a new request's
prompt runs alone (its own adapter, no padding) and its cache joins the batch's (``kvcache``). Each step
is then one forward of the whole batch, one new token per row, each row through its own adapter via
lorakit's per-row routing (``layers.routing``; "__base__" rows take the base model). A request leaves
the batch as soon as it is done, and a waiting one takes its row at the next step.

Requests talk to the engine through ``Job.emit`` (called on the engine thread with ``Delta``, ``Done``
or ``Failed`` events); ``Engine.cancel`` frees a job's row at the next step.
"""
from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import dataclasses
import logging
import threading
from typing import Any, Callable

import torch

from ..errors import LoraError
from ..layers.routing import BASE, adapter_rows
from ..model import LoraModel
from .errors import ApiError
from .kvcache import BatchCache, cache_kwarg, logits_kwarg, new_cache
from .limits import ServeLimits
from .protocol import Sampling
from .sampling import TextTracker, make_generator, next_tokens

log = logging.getLogger("lorakit.serve")

#: transformers' generate keeps the 50 likeliest tokens when sampling unless the model's generation config says
#: otherwise; the server samples the same way
_GENERATE_TOP_K = 50

#: a command's answer meaning "not now": it runs again after the next step (an unload waits for its rows)
NOT_YET = object()


@dataclasses.dataclass(frozen=True)
class Delta:
    text: str


@dataclasses.dataclass(frozen=True)
class Done:
    finish_reason: str     # "stop" (end of text or a stop sequence) or "length"
    text: str              # the whole reply
    prompt_tokens: int
    completion_tokens: int


@dataclasses.dataclass(frozen=True)
class Failed:
    error: ApiError


@dataclasses.dataclass(eq=False)
class Job:
    adapter: str                       # an adapter's name, or BASE
    prompt_ids: list[int]
    sampling: Sampling
    emit: Callable[[object], None]     # called on the engine thread; must not block
    cancelled: bool = False
    generated: list[int] = dataclasses.field(default_factory=list)
    done: bool = False
    tracker: TextTracker | None = None
    generator: torch.Generator | None = None


def _settle(future: concurrent.futures.Future, result: Any, error: BaseException | None) -> None:
    """Give a command's outcome to its caller (who may have gone and cancelled the future)."""
    try:
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)
    except concurrent.futures.InvalidStateError:
        pass


class Engine:
    def __init__(self, load: Callable[[], tuple[Any, Any]], limits: ServeLimits,
                 on_failure: Callable[[str], None] | None = None):
        self._load = load
        self.limits = limits
        self._on_failure = on_failure
        self.state = "loading"           # -> "ready" -> "stopped", or "failed"
        self.failure: str | None = None
        self.model: Any = None
        self.tokenizer: Any = None
        self.tokenizer_lock = threading.Lock()   # fast tokenizers must not be used from two threads at once
        self.context_length: int | None = None
        self._cond = threading.Condition()
        self._waiting: collections.deque[Job] = collections.deque()
        self._commands: list[tuple[Callable[["Engine"], Any], concurrent.futures.Future]] = []
        self._active: list[Job] = []
        self._batch = BatchCache()
        self._stop = False
        self._peak = 0                   # most rows one decoding step has run (reported by stats)
        self._thread: threading.Thread | None = None

    # -- called from request handlers ------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._main, name="lorakit-serve-engine", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    def require_ready(self) -> None:
        if self.state == "loading":
            raise ApiError(503, "the model is still loading; retry in a moment (GET /health says when it is ready)",
                           code="model_loading")
        if self.state != "ready":
            raise ApiError(503, f"the server cannot serve: {self.failure or 'it is shutting down'}",
                           code="unavailable")

    def submit(self, job: Job) -> None:
        with self._cond:
            self.require_ready()
            if len(self._waiting) >= self.limits.max_queue:
                raise ApiError(429, f"the server is busy: {len(self._waiting)} requests are waiting (its --max-queue); "
                                    f"retry later", code="queue_full")
            self._waiting.append(job)
            self._cond.notify_all()

    def cancel(self, job: Job) -> None:
        """The client is gone: forget the job (its row is freed before the next step)."""
        job.cancelled = True
        with self._cond:
            with contextlib.suppress(ValueError):
                self._waiting.remove(job)
            self._cond.notify_all()

    def run(self, command: Callable[["Engine"], Any]) -> concurrent.futures.Future:
        """Run ``command(engine)`` on the engine thread between two steps; its result or error in the future."""
        future: concurrent.futures.Future = concurrent.futures.Future()
        with self._cond:
            self.require_ready()
            self._commands.append((command, future))
            self._cond.notify_all()
        return future

    def stats(self) -> dict:
        with self._cond:
            return {"active": len(self._active), "waiting": len(self._waiting), "peak_batch": self._peak}

    def uses(self, adapter: str) -> bool:
        """Whether a running or waiting request uses ``adapter`` (engine thread, inside a command)."""
        with self._cond:
            return any(j.adapter == adapter for j in list(self._active) + list(self._waiting))

    # -- the engine thread -----------------------------------------------------------------------
    def _main(self) -> None:
        try:
            self.model, self.tokenizer = self._load()
            self._prepare()
        except Exception as e:  # noqa: BLE001 - reported to the operator and to every later request
            if not isinstance(e, LoraError):  # a bug, not a bad input: keep its traceback in the log
                log.exception("lorakit serve: loading the model failed")
            self.failure = str(e) if isinstance(e, LoraError) else f"{type(e).__name__}: {e}"
            self.state = "failed"
            if self._on_failure:
                self._on_failure(self.failure)
            return
        self.state = "ready"
        log.info("lorakit serve: model ready")
        try:
            while self._guarded_loop_once():
                pass
        finally:
            self.state = "stopped"
            self._fail_all(ApiError(503, "the server is shutting down", code="shutting_down"))

    def _prepare(self) -> None:
        lm = self._lm()
        self.device = next(lm.parameters()).device
        eos = {self.tokenizer.eos_token_id}
        gen_eos = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)
        eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {int(e) for e in eos if e is not None}
        top_k = getattr(getattr(lm, "generation_config", None), "top_k", None)
        self.top_k = _GENERATE_TOP_K if top_k is None else top_k  # sampling as `lorakit generate` samples
        self.context_length = getattr(lm.config, "max_position_embeddings", None)
        self._cache_kw, self._logits_kw = cache_kwarg(lm), logits_kwarg(lm)

    def _loop_once(self) -> bool:
        with self._cond:
            while not (self._stop or self._waiting or self._active or self._commands):
                self._cond.wait()
            if self._stop:
                return False
            commands = list(self._commands)
        if commands and self._run_commands(commands) and not self._active and not self._waiting:
            with self._cond:  # only commands waiting on rows that are gone: wait for news
                self._cond.wait(0.05)
        self._sweep()
        with self._cond:
            free = self.limits.max_batch - len(self._active)
            new = [self._waiting.popleft() for _ in range(min(free, len(self._waiting)))]
        for job in new:
            self._admit(job)
        self._sweep()
        if self._active:
            self._step()
            self._sweep()
        return True

    def _guarded_loop_once(self) -> bool:
        """One turn of the loop; a failure outside a forward loses the batch, never the engine thread."""
        try:
            return self._loop_once()
        except Exception as e:  # noqa: BLE001 - the requests in the batch are told; the server goes on
            error = self._as_api_error(e)
            with self._cond:
                jobs, self._active = self._active, []
            self._batch = BatchCache()
            for job in jobs:
                job.emit(Failed(error))
            return True

    def _run_commands(self, commands: list) -> bool:
        """Run each command once; True when some answered NOT_YET (they stay queued)."""
        later = False
        for command, future in commands:
            try:
                result = command(self)
            except Exception as e:  # noqa: BLE001 - the caller's future carries it
                result, error = None, e
            else:
                error = None
            if result is NOT_YET:
                later = True
                continue
            with self._cond:
                self._commands.remove((command, future))
            _settle(future, result, error)
        return later

    def _lm(self):
        """The transformers model (inside the LoraModel once an adapter is loaded)."""
        return self.model.model if isinstance(self.model, LoraModel) else self.model

    def _forward(self, rows: list[str], **inputs):
        with torch.no_grad(), adapter_rows(rows):
            kw = {self._logits_kw: 1} if self._logits_kw else {}
            out = self._lm()(use_cache=True, **kw, **inputs)
        return out.logits[:, -1]

    def _admit(self, job: Job) -> None:
        """Run the job's prompt alone, then give it a row in the batch with its first token."""
        if job.cancelled:
            return
        try:
            if job.adapter != BASE and not (isinstance(self.model, LoraModel) and job.adapter in self.model.peft_config):
                raise ApiError(404, f"adapter {job.adapter!r} was unloaded", code="model_not_found")
            ids = torch.tensor([job.prompt_ids], device=self.device)
            cache = new_cache()
            logits = self._forward([job.adapter], input_ids=ids, attention_mask=torch.ones_like(ids),
                                   **{self._cache_kw: cache})
            job.tracker = TextTracker(job.sampling.stop)
            job.generator = None if job.sampling.greedy else make_generator(job.sampling.seed, self.device)
            token = next_tokens(logits, [job.sampling], [job.generator], self.top_k)[0]
        except Exception as e:  # noqa: BLE001 - this request fails; the others go on
            job.emit(Failed(self._as_api_error(e)))
            return
        self._batch.add_row(cache, len(job.prompt_ids))
        with self._cond:
            self._active.append(job)
        self._record(job, token)

    def _step(self) -> None:
        """One decoding step: one token for every row, in one forward (a failure here is the guard's)."""
        jobs = list(self._active)
        self._peak = max(self._peak, len(jobs))
        inputs = self._batch.step_inputs()
        ids = torch.tensor([[j.generated[-1]] for j in jobs], device=self.device)
        logits = self._forward([j.adapter for j in jobs], input_ids=ids, **inputs,
                               **{self._cache_kw: self._batch.cache})
        self._batch.advance(inputs["attention_mask"])
        tokens = next_tokens(logits, [j.sampling for j in jobs], [j.generator for j in jobs], self.top_k)
        for job, token in zip(jobs, tokens):
            self._record(job, token)

    def _record(self, job: Job, token: int) -> None:
        """Add a row's new token: send the text it completes; finish the row when it is done."""
        job.generated.append(token)
        with self.tokenizer_lock:
            text = self.tokenizer.decode(job.generated, skip_special_tokens=True)
        piece = job.tracker.update(text)
        finish = None
        if job.tracker.stopped or token in self.eos_ids:
            finish = "stop"
        elif len(job.generated) >= job.sampling.max_tokens:
            finish = "length"
        elif self.context_length and len(job.prompt_ids) + len(job.generated) >= self.context_length:
            finish = "length"
        if finish is not None:
            piece += job.tracker.finish()
        if piece and not job.cancelled:
            job.emit(Delta(piece))
        if finish is not None:
            job.done = True
            if not job.cancelled:
                job.emit(Done(finish, job.tracker.text, len(job.prompt_ids), len(job.generated)))

    def _sweep(self) -> None:
        """Drop the rows of finished and abandoned jobs (and the cache columns only they used)."""
        with self._cond:
            keep = [i for i, j in enumerate(self._active) if not (j.done or j.cancelled)]
            if len(keep) == len(self._active):
                return
            self._active = [self._active[i] for i in keep]
        self._batch.keep_rows(keep)

    def _fail_all(self, error: ApiError) -> None:
        with self._cond:
            jobs = list(self._active) + list(self._waiting)
            self._active, self._waiting = [], collections.deque()
            commands, self._commands = self._commands, []
        for job in jobs:
            job.emit(Failed(error))
        for _, future in commands:
            _settle(future, None, error)

    @staticmethod
    def _as_api_error(e: Exception) -> ApiError:
        if isinstance(e, ApiError):
            return e
        log.error("lorakit serve: generation failed", exc_info=e)
        return ApiError(500, f"generation failed on the server ({type(e).__name__}: {str(e)[:300]}); the "
                             f"server log has the details", code="generation_failed")
