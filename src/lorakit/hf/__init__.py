"""Glue to transformers and peft: forward signatures, HF Trainer, bitsandbytes, peft's function names."""
