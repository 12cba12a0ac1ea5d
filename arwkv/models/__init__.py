"""Student models. Importing this registers `arwkv` with transformers' AutoConfig / AutoModelForCausalLM."""

from .arwkv import ArwkvCache, ArwkvConfig, ArwkvForCausalLM, ArwkvModel, ArwkvTimeMix

__all__ = ["ArwkvCache", "ArwkvConfig", "ArwkvForCausalLM", "ArwkvModel", "ArwkvTimeMix"]
