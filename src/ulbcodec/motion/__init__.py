"""Coded motion for P frames: mesh fields (:mod:`.field`), their entropy coding
(:mod:`.coding`) and the encoder's search (:mod:`.search`)."""
