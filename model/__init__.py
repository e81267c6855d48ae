"""The Transformer of "Attention Is All You Need" and its decoder-only variant, with training and checkpoints."""
