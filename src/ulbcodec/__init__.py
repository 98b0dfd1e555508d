"""ulbc: an ultra-low-bitrate generative codec for images and videos."""

__version__ = "0.1.0"
