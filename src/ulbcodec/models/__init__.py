"""Neural models of ulbc.

Submodules are imported explicitly (``from ulbcodec.models.anchor_codec import AnchorCodec``)
so that importing this package stays cheap and free of CompressAI/torch side effects.
"""
