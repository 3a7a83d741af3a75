"""Data shipped with lorakit (`builtin:NAME.jsonl` in recipes). make_demo_data.py writes the demo set."""
