"""Differentiable losses: the anchor codec's rate and distortion (rate_distortion), and image
quality after VMAF's elementary features (detail loss / ADM, information fidelity / VIF);
used by the trainers and by the encoder's latent refinement (:mod:`ulbcodec.refinement`)."""
