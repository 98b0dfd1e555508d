"""Differentiable losses: the anchor codec's rate and distortion (rate_distortion), and image
quality after VMAF's elementary features (detail loss / ADM, information fidelity / VIF),
SSIMULACRA 2 and an added block grid (ssimulacra2_loss, grid_loss); used by the trainers
and by the encoder's latent refinement (:mod:`ulbcodec.refinement`)."""
