"""Entropy models of the anchor codec, after CompressAI's split: the checkerboard partition,
the context models, the bit-exact coding helpers and the latent codec with its rANS loop.
Submodules are imported explicitly."""
