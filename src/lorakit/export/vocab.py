"""The tokenizer of a GGUF model file, built from a transformers tokenizer folder as llama.cpp's converter does.

Supported: byte-level BPE tokenizers (``tokenizer.ggml.model = gpt2``: GPT-2, Llama 3, SmolLM). Their token
list, token types and merges come straight from ``tokenizer.json``. llama.cpp also needs the name of the
pre-tokenizer (how text is split before BPE), which it does not read from the file: its converter
identifies it by encoding a fixed probe text and hashing the ids. The same probe and hash are used here;
only hashes lorakit knows are written, and any other tokenizer is refused rather than given a name that
would make llama.cpp split text differently from transformers.

Whether a BOS/EOS token is added when text is encoded is measured on the transformers tokenizer itself and
written explicitly, so llama.cpp encodes prompts as lorakit did during training.
"""
from __future__ import annotations

import json
from hashlib import sha256
from pathlib import Path
from typing import Any

from lorakit.errors import ExportError

# The probe text of llama.cpp's convert_hf_to_gguf.py (get_vocab_base_pre); its ids' sha256 names the
# pre-tokenizer. Kept byte for byte: a different text gives different hashes.
_PROBE = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 3 33 "
    "333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ ------======= "
    "нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, 'RE you sure? 'M not sure "
    "I'll make it, 'D you like some tea? We'Ve a'lL"
)

#: sha256 of str(tokenizer.encode(_PROBE)) -> llama.cpp's tokenizer.ggml.pre name (from llama.cpp's table)
PRE_TOKENIZERS = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",     # SmolLM / SmolLM2
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",  # Llama 3
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",      # GPT-2
}

# gguf.TokenType values (llama.cpp's token attributes)
_NORMAL, _CONTROL, _USER_DEFINED, _UNUSED = 1, 3, 4, 5


def pre_tokenizer_name(tokenizer: Any, where: str) -> str:
    digest = sha256(str(tokenizer.encode(_PROBE)).encode()).hexdigest()
    name = PRE_TOKENIZERS.get(digest)
    if name is None:
        raise ExportError(
            f"{where}: lorakit does not recognise this tokenizer's pre-tokenizer (probe hash {digest[:16]}...), so it "
            f"cannot tell llama.cpp how to split text. Fix: `lorakit merge` the adapter and convert the merged folder "
            f"with llama.cpp's convert_hf_to_gguf.py, whose table of tokenizers is larger")
    return name


def _looks_special(token: str) -> bool:
    """llama.cpp's converter also marks these added tokens as control tokens, even when not flagged special."""
    return token.startswith("<|") and token.endswith("|>") or token in ("<pad>", "<mask>")


def token_list(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    """(tokens, token types) for ids 0..vocab_size-1; ids the tokenizer lacks become unused [PADi] entries."""
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if reverse and max(reverse) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(reverse)} but the model's vocab_size is {vocab_size}; "
                          f"the tokenizer and the model do not belong together")
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in reverse:
            tokens.append(f"[PAD{i}]")
            types.append(_UNUSED)
            continue
        token = reverse[i]
        if i in added:
            if not added[i].normalized:  # llama.cpp expects added tokens in their normalised form
                token = tokenizer.decode(tokenizer.encode(token, add_special_tokens=False))
            types.append(_CONTROL if added[i].special or _looks_special(token) else _USER_DEFINED)
        else:
            types.append(_NORMAL)
        tokens.append(token)
    return tokens, types


def adds_bos_eos(tokenizer: Any) -> tuple[bool, bool]:
    """Whether encoding text adds the BOS token in front / the EOS token at the end."""
    plain = tokenizer.encode("hello", add_special_tokens=False)
    full = tokenizer.encode("hello")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    add_bos = bos is not None and len(full) > len(plain) and full[0] == bos
    add_eos = eos is not None and len(full) > len(plain) and full[-1] == eos
    return add_bos, add_eos


def add_vocab(writer: Any, tokenizer_dir: Path, vocab_size: int) -> None:
    """Write the tokenizer of ``tokenizer_dir`` (a transformers folder) into ``writer``."""
    import gguf
    from transformers import AutoTokenizer

    spec_file = tokenizer_dir / "tokenizer.json"
    if not spec_file.is_file():
        raise ExportError(f"{tokenizer_dir} has no tokenizer.json; lorakit builds a GGUF tokenizer from a fast "
                          f"(tokenizers) tokenizer only. Fix: save the tokenizer with a current transformers, or "
                          f"convert the merged folder with llama.cpp's convert_hf_to_gguf.py")
    model = json.loads(spec_file.read_text(encoding="utf-8")).get("model", {})
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"{tokenizer_dir}: the tokenizer is a {model.get('type')} model"
                          f"{' with byte fallback (SentencePiece style)' if model.get('byte_fallback') else ''}; "
                          f"lorakit writes byte-level BPE tokenizers only. Fix: `lorakit merge` and convert the "
                          f"merged folder with llama.cpp's convert_hf_to_gguf.py")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokens, types = token_list(tokenizer, vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer_name(tokenizer, str(tokenizer_dir)))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=len(tokens))
    special.chat_template = None  # the export writes the template the adapter was trained with
    special.add_special_token = {}  # measured below instead of read from config files
    special.add_to_gguf(writer, quiet=True)
    add_bos, add_eos = adds_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)
