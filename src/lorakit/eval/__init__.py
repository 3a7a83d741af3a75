"""Evaluation: classification-as-generation accuracy, held-out loss/perplexity on answer tokens."""
from lorakit.eval.classification import INVALID, ClassificationReport, classification_eval, normalize_label
from lorakit.eval.loss import heldout_loss

__all__ = ["classification_eval", "ClassificationReport", "normalize_label", "INVALID", "heldout_loss"]
