"""lorakit export --to ollama: chat templates of real model families translated into Ollama TEMPLATEs that render
conversations exactly as transformers renders the Jinja original (run through a Go-template interpreter,
tests/export/gotemplate.py), the Modelfile, and the folder."""
from __future__ import annotations

import gguf
import pytest
from transformers import AutoTokenizer

from lorakit.cli.main import main
from lorakit.errors import ExportError
from lorakit.export.ollama import modelfile
from lorakit.export.ollama_template import translate

from data.chat_templates import TEMPLATES, with_template
from .conftest import save_adapter
from .gotemplate import execute

S = {"role": "system", "content": "You are a terse assistant for a bike shop."}
U1 = {"role": "user", "content": "Do you repair e-bikes?"}
A1 = {"role": "assistant", "content": "Yes, all brands."}
U2 = {"role": "user", "content": "How long does it take?"}
A2 = {"role": "assistant", "content": "Usually two days."}
U3 = {"role": "user", "content": "Can I pick it up on Sunday?"}
CONVERSATIONS = [[U1], [S, U1], [U1, A1, U2], [S, U1, A1, U2], [U1, A1, U2, A2, U3], [S, U1, A1, U2, A2, U3]]

# template name -> the format lorakit should recognise, and the default system prompt it should find
EXPECTED = {"chatml_default_system": ("chatml", "You are a helpful AI assistant named SmolLM, trained by Hugging Face"),
            "llama3": ("llama3", None), "gemma": ("gemma", None), "mistral": ("mistral", None),
            "mistral_system_last": ("mistral-v3", None)}


@pytest.fixture(scope="module")
def base_tokenizer(embedded_model_dir):
    return AutoTokenizer.from_pretrained(embedded_model_dir)


def hf_render(tok, messages):
    try:
        return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - the template refuses (e.g. a system turn): nothing to compare
        return None


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_known_formats_render_exactly_as_the_jinja_template(base_tokenizer, name):
    template, _, bos, eos = TEMPLATES[name]
    tok = with_template(base_tokenizer, template, bos, eos)
    t = translate(template, tok)
    assert (t.format.name, t.system) == EXPECTED[name] and t.difference == ""
    compared = 0
    for conversation in CONVERSATIONS:
        want = hf_render(tok, conversation)
        if want is None:
            continue
        assert execute(t.template, conversation, t.system) == want, conversation
        compared += 1
    assert compared >= 3
    assert TEMPLATES[name][1] in t.stops  # the end-of-turn marker stops generation


def test_default_system_prompt_becomes_the_modelfile_system(base_tokenizer):
    tok = with_template(base_tokenizer, TEMPLATES["chatml_default_system"][0])
    t = translate(tok.chat_template, tok)
    text = modelfile("base.gguf", "adapter.gguf", t)
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    # with a system message of the user's own, the default is not added
    assert execute(t.template, [S, U1], t.system) == hf_render(tok, [S, U1])


def test_a_template_that_only_resembles_a_format_is_translated_with_a_difference(base_tokenizer):
    template, _, bos, eos = TEMPLATES["llama31_default_system"]
    t = translate(template, with_template(base_tokenizer, template, bos, eos))
    assert t.format.name == "llama3" and "Cutting Knowledge" in t.difference


def test_unknown_template_is_refused(base_tokenizer):
    template = "{% for m in messages %}### {{ m['role'] }}: {{ m['content'] }}\n{% endfor %}### assistant:"
    with pytest.raises(ExportError, match="--no-template"):
        translate(template, with_template(base_tokenizer, template))


def test_modelfile_content(base_tokenizer):
    t = translate(base_tokenizer.chat_template, base_tokenizer)
    text = modelfile("base.gguf", "adapter.gguf", t)
    lines = text.splitlines()
    assert "FROM ./base.gguf" in lines and "ADAPTER ./adapter.gguf" in lines
    assert 'PARAMETER stop "<|im_end|>"' in lines and 'PARAMETER stop "<|im_start|>"' in lines
    assert f'TEMPLATE """{t.template}"""' in text
    merged = modelfile("model.gguf", None, None)
    assert "ADAPTER" not in merged and "TEMPLATE" not in merged and "FROM ./model.gguf" in merged


def test_ollama_folder_with_base_and_adapter(tiny_chat_base, tmp_path, capsys):
    save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj", "v_proj"])
    out = tmp_path / "ollama"
    code = main(["export", "--adapter", str(tmp_path / "ad"), "--to", "ollama", "--out", str(out)])
    assert code == 0, capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "adapter.gguf", "base.gguf"]
    text = (out / "Modelfile").read_text()
    assert "FROM ./base.gguf\nADAPTER ./adapter.gguf\n" in text and "<|im_start|>assistant\n" in text
    base = gguf.GGUFReader(out / "base.gguf")
    assert base.fields["general.type"].contents() == "model"
    assert base.fields["tokenizer.ggml.pre"].contents() == "smollm"
    adapter = gguf.GGUFReader(out / "adapter.gguf")
    assert adapter.fields["general.type"].contents() == "adapter"
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--to", "ollama", "--out", str(out)]) == 1
    assert "--overwrite" in capsys.readouterr().err


def test_ollama_folder_merged(tiny_chat_base, tmp_path, capsys):
    save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj"])
    out = tmp_path / "ollama"
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--to", "ollama", "--merged", "--out", str(out),
                 "--outtype", "q8_0"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "model.gguf"]
    model = gguf.GGUFReader(out / "model.gguf")
    assert model.fields["general.file_type"].contents() == 7
    assert "TEMPLATE" in (out / "Modelfile").read_text()


def test_unknown_template_refused_before_anything_is_written(tiny_chat_base, tmp_path, capsys):
    save_adapter(tiny_chat_base, tmp_path / "ad", target_modules=["q_proj"])
    (tmp_path / "ad" / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = tmp_path / "ollama"
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--to", "ollama", "--out", str(out)]) == 1
    assert "--no-template" in capsys.readouterr().err and not out.exists()
    assert main(["export", "--adapter", str(tmp_path / "ad"), "--to", "ollama", "--out", str(out),
                 "--no-template"]) == 0
    assert "TEMPLATE" not in (out / "Modelfile").read_text()


def test_embedded_base_is_its_own_gguf_file(tmp_path, embedded_model_dir):
    """For the embedded model the Modelfile's base is the GGUF file its weights were read from (what lorakit
    trained on, dequantised), not a re-encoding."""
    import filecmp

    import torch
    from safetensors.torch import save_file

    from lorakit import LoraConfig
    from lorakit.models import embedded_gguf_path

    folder = tmp_path / "ad"
    LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], base_model_name_or_path="embedded").save(folder)
    g = torch.Generator().manual_seed(0)
    save_file({"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": torch.randn(2, 576, generator=g),
               "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": torch.randn(576, 2, generator=g)},
              str(folder / "adapter_model.safetensors"))
    assert main(["export", "--adapter", str(folder), "--to", "ollama", "--out", str(tmp_path / "o")]) == 0
    assert filecmp.cmp(tmp_path / "o" / "base.gguf", embedded_gguf_path(), shallow=False)
    text = (tmp_path / "o" / "Modelfile").read_text()
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
