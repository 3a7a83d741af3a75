"""The causal-LM loss at labelled positions: the fused path (a kernel of its own) and the model's own.

    lm_loss.py        body -> fused head/cross-entropy where labels count; LossComputer (training loop, eval)
    fused_forward.py  LoraModel.forward's loss paths (training with labels; a LossComputer's request)
    output.py         FusedLossOutput: the loss now, the logits only when read
    state.py          one model's verdict (checked once against its own loss), shared by every caller
    ffn_skip.py       feed-forward blocks only on the rows the loss reads
"""
