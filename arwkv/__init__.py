"""arwkv: turn a pretrained Hugging Face Transformer into an RWKV-7 RNN by distillation."""

__version__ = "0.1.0"
