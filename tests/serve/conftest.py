"""A real `lorakit serve` on a free 127.0.0.1 port: uvicorn in a thread, a tiny Llama saved to disk (the
embedded model's tokenizer, so chat templates are real), adapters saved next to it."""
from __future__ import annotations

import contextlib
import os
import threading
import time
from pathlib import Path

import pytest
import torch

API_KEY = "test-key"
BASE_NAME = "tiny"


def save_adapter(model_dir: Path, out: Path, targets: list[str], r: int = 4, seed: int = 0,
                 template: str | None = None) -> Path:
    """An adapter whose B is large enough that its greedy output differs from the base's."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir),
                           LoraConfig(r=r, lora_alpha=2 * r, target_modules=targets,
                                      base_model_name_or_path=str(model_dir)))
    for name, p in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.5)
    model.save_pretrained(out)
    if template is not None:
        (out / "chat_template.jinja").write_text(template)
    return out


#: a chat template unlike the base's (ChatML): served with the adapter that carries it
OWN_TEMPLATE = ("{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if add_generation_prompt %}### assistant:{% endif %}")


@pytest.fixture(scope="session")
def serve_dirs(tmp_path_factory, embedded_model_dir):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tmp = tmp_path_factory.mktemp("serve")
    tok = AutoTokenizer.from_pretrained(embedded_model_dir)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=320,
                      pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      tie_word_embeddings=True)
    model_dir = tmp / "model"
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    root = tmp / "root"
    root.mkdir()
    dirs = {"model": model_dir, "root": root,
            "alpha": save_adapter(model_dir, tmp / "alpha", ["q_proj", "v_proj"], seed=1),
            # o_proj only in beta: layers where both adapters sit run one batched product, o_proj a group
            "beta": save_adapter(model_dir, tmp / "beta", ["q_proj", "v_proj", "o_proj"], seed=2),
            "gamma": save_adapter(model_dir, root / "gamma", ["q_proj", "v_proj", "up_proj"], r=8, seed=3,
                                  template=OWN_TEMPLATE),
            "outside": save_adapter(model_dir, tmp / "outside", ["q_proj"], seed=4)}
    broken = root / "broken"
    save_adapter(model_dir, broken, ["q_proj"], seed=5)
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 64)  # a truncated weights file
    dirs["broken"] = broken
    os.symlink(dirs["outside"], root / "sneaky")  # inside the root by name, outside by target
    return dirs


class Running:
    """A Server answering on a free 127.0.0.1 port from a background thread."""

    def __init__(self, server):
        from lorakit.serve.server import bind

        self.server = server
        self.engine = server.engine
        sock = bind("127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=server.serve, args=(sock, "warning"), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while server.uvicorn is None or not server.uvicorn.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.01)

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while self.engine.state != "ready":
            assert self.engine.state == "loading", self.engine.failure
            assert time.monotonic() < deadline, "the model did not load"
            time.sleep(0.02)

    def client(self, api_key: str = API_KEY, **kw):
        from openai import OpenAI

        return OpenAI(base_url=self.url + "/v1", api_key=api_key, max_retries=0, timeout=60, **kw)

    def http(self, api_key: str | None = API_KEY):
        import httpx2 as httpx

        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=60)

    def stop(self) -> None:
        self.server.uvicorn.should_exit = True
        self.thread.join(30)


@contextlib.contextmanager
def running(settings, load):
    from lorakit.serve.server import Server

    r = Running(Server(settings, load))
    try:
        yield r
    finally:
        r.stop()


def loader(model_dir):
    from lorakit.models import load_model_and_tokenizer

    return lambda: load_model_and_tokenizer(str(model_dir))


@pytest.fixture(scope="session")
def limits():
    from lorakit.serve.limits import ServeLimits

    return ServeLimits(max_tokens=300, max_prompt_tokens=300, max_queue=6, max_batch=8, max_body_bytes=20_000)


@pytest.fixture(scope="session")
def server(serve_dirs, limits):
    """The base (``tiny``) with adapters alpha and beta, an API key, run-time loads under the root."""
    from lorakit.serve.server import ServeSettings

    settings = ServeSettings(model_name=BASE_NAME, adapters=(("alpha", str(serve_dirs["alpha"])),
                                                              ("beta", str(serve_dirs["beta"]))),
                             adapter_root=str(serve_dirs["root"]), api_key=API_KEY, limits=limits)
    with running(settings, loader(serve_dirs["model"])) as r:
        r.wait_ready()
        yield r


@contextlib.contextmanager
def paused(engine, timeout: float = 20):
    """Hold the engine thread between two steps (a command that waits), so requests queue up meanwhile."""
    gate, inside = threading.Event(), threading.Event()

    def hold(_):
        inside.set()
        gate.wait(timeout)

    future = engine.run(hold)
    assert inside.wait(timeout)
    try:
        yield
    finally:
        gate.set()
        future.result(timeout)


def wait_for(condition, timeout: float = 20, what: str = "the condition"):
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


@pytest.fixture
def reference(serve_dirs, capsys):
    """What `lorakit generate` prints for a prompt (greedy unless told), run in this process, in float32 as the
    servers of these tests load the model (``loader``), whatever precision auto would choose here."""
    from lorakit.cli.main import main

    def generate(prompt: str, adapter: str | None = None, chat: bool = False, max_tokens: int = 16, *extra):
        argv = ["generate", "--model", str(serve_dirs["model"]), "--prompt", prompt,
                "--max-new-tokens", str(max_tokens), "--precision", "fp32", *extra]
        if adapter:
            argv += ["--adapter", str(serve_dirs[adapter])]
        if chat:
            argv.append("--chat")
        capsys.readouterr()
        assert main(argv) == 0
        out = capsys.readouterr().out
        assert out.endswith("\n")
        return out[:-1]

    return generate
