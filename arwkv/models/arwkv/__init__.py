"""The arwkv student model, registered with transformers' Auto classes.

`import arwkv.models` is enough for `AutoModelForCausalLM.from_pretrained(dir)` to load a student without
remote code; `save_pretrained` copies the two files below next to the weights for `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_arwkv import ArwkvConfig
from .modeling_arwkv import ArwkvCache, ArwkvForCausalLM, ArwkvModel, ArwkvTimeMix

AutoConfig.register(ArwkvConfig.model_type, ArwkvConfig, exist_ok=True)
AutoModelForCausalLM.register(ArwkvConfig, ArwkvForCausalLM, exist_ok=True)
# writes auto_map into config.json and copies the modeling/configuration files on save_pretrained
ArwkvConfig.register_for_auto_class()
ArwkvForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = ["ArwkvCache", "ArwkvConfig", "ArwkvForCausalLM", "ArwkvModel", "ArwkvTimeMix"]
