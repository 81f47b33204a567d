"""deitlt-scale: DeiT-LT training of Vision Transformers on long-tailed data, at cluster scale."""

__version__ = "0.1.0"
