"""Differentiable image-quality losses after VMAF's elementary features (detail loss / ADM,
information fidelity / VIF): used by stage II training and by the encoder's latent
refinement (:mod:`ulbcodec.refinement`)."""
