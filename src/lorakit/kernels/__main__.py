"""``python -m lorakit.kernels``: print the dispatcher's decision table (which kernel runs for which facts)."""
from .dispatch import table

print(table())
