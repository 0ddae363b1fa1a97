"""rgan-agent: protect photos with self-recoverable adversarial examples before uploading them."""

__version__ = "0.1.0"
