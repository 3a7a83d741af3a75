"""The causal-LM loss at labelled positions: reference (the model's own) and the fused path."""
