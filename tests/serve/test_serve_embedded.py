"""`lorakit serve` as a user runs it: the CLI in its own process on the embedded SmolLM2-135M with two
adapters, a concurrent burst through the openai client, each reply equal to `lorakit generate --chat`."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

QUESTIONS = ["Name three colours.", "What is the capital of France?", "Write a haiku about tea."]


def _adapter(out, targets, seed):
    from lorakit import LoraConfig, get_peft_model
    from lorakit.models import load_model_and_tokenizer

    model, _ = load_model_and_tokenizer("embedded")
    torch.manual_seed(seed)
    lora = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=targets,
                                            base_model_name_or_path="embedded"))
    for name, p in lora.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.04)
    lora.save_pretrained(out)
    return out


def _start(argv):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-m", "lorakit.cli.main", "serve", *argv], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env)
    for line in proc.stderr:
        found = re.search(r"http://127\.0\.0\.1:(\d+)/v1", line)
        if found:
            return proc, f"http://127.0.0.1:{found.group(1)}"
    raise AssertionError(f"the server did not start (exit code {proc.wait()})")


@pytest.mark.slow
def test_embedded_model_served_from_the_command_line(tmp_path, capsys):
    import httpx2 as httpx
    from openai import OpenAI

    from lorakit.cli.main import main

    adapters = {"one": _adapter(tmp_path / "one", ["q_proj", "v_proj"], 1),
                "two": _adapter(tmp_path / "two", ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"], 2)}
    # one precision for the server (a subprocess) and the in-process generate it is compared with
    proc, url = _start(["--model", "embedded", "--port", "0", "--api-key", "secret", "--log-level", "warning",
                        "--precision", "fp32", *[f"--adapter={n}={d}" for n, d in adapters.items()]])
    try:
        deadline = time.monotonic() + 120
        while httpx.get(url + "/health").status_code != 200:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        client = OpenAI(base_url=url + "/v1", api_key="secret", max_retries=0, timeout=300)
        cases = [(m, q) for m in ("embedded", "one", "two") for q in QUESTIONS]

        def ask(case):
            r = client.chat.completions.create(model=case[0], messages=[{"role": "user", "content": case[1]}],
                                               max_tokens=24, temperature=0)
            return r.choices[0].message.content

        with ThreadPoolExecutor(len(cases)) as pool:
            replies = dict(zip(cases, pool.map(ask, cases)))
        assert httpx.get(url + "/health").json()["peak_batch"] > 1  # the burst ran in shared steps
        streamed = client.chat.completions.create(model="two", messages=[{"role": "user", "content": QUESTIONS[0]}],
                                                  max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in streamed) == replies[("two", QUESTIONS[0])]
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: the server shuts down and says so, as any command does
        rest = proc.stderr.read()
        assert proc.wait(60) == 130 and "Traceback" not in rest and "lorakit serve: interrupted" in rest
    for (model, question), reply in replies.items():
        argv = ["generate", "--model", "embedded", "--chat", "--prompt", question, "--max-new-tokens", "24",
                "--precision", "fp32"]
        if model != "embedded":
            argv += ["--adapter", str(adapters[model])]
        capsys.readouterr()
        assert main(argv) == 0
        assert reply == capsys.readouterr().out[:-1], (model, question)
    for model in adapters:  # each adapter changes what the base says
        assert any(replies[(model, q)] != replies[("embedded", q)] for q in QUESTIONS), model
