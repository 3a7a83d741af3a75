"""Data: read records, render prompts, tokenise with the loss on the answer, collate batches.

```python
from lorakit.data import load_records, get_template, tokenize_records, Collator
records = load_records("../shared/data/raft/twitter_complaints/train.csv", label_column="Label")
template = get_template("classification", text_column="Tweet text", label_column="Label")
data = tokenize_records(records, template, tokenizer, max_length=256)
loader = DataLoader(data, batch_size=8, collate_fn=Collator(tokenizer.pad_token_id))
```
Nothing heavy is imported here: torch and datasets load only when used.
"""
from lorakit.data.collate import Collator
from lorakit.data.labels import LabelMapper, read_task_label_names
from lorakit.data.prompts import (TEMPLATE_NAMES, AlpacaTemplate, ChatTemplate, ClassificationTemplate,
                                  HumanAssistantTemplate, PromptTemplate, get_template)
from lorakit.data.readers import SUPPORTED_SUFFIXES, Record, Records, load_records
from lorakit.data.tokenize import IGNORE_INDEX, TokenizedDataset, encode_answer, encode_prompt, tokenize_records

__all__ = [
    "load_records", "Record", "Records", "SUPPORTED_SUFFIXES", "LabelMapper", "read_task_label_names",
    "get_template", "PromptTemplate", "AlpacaTemplate", "HumanAssistantTemplate", "ClassificationTemplate",
    "ChatTemplate", "TEMPLATE_NAMES",
    "tokenize_records", "TokenizedDataset", "encode_prompt", "encode_answer", "IGNORE_INDEX", "Collator",
]
