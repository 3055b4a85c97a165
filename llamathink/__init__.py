"""LlamaThink: a small hybrid-attention language model (Gated DeltaNet + compressed sparse attention + full
attention) for Hugging Face transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_llamathink import LlamaThinkConfig
from .modeling_llamathink import (
    LlamaThinkCache,
    LlamaThinkForCausalLM,
    LlamaThinkModel,
    LlamaThinkPreTrainedModel,
)

__version__ = "0.1.0"

# Register with the Auto classes so `AutoModelForCausalLM.from_pretrained(dir)` works wherever this package is
# imported, and make save_pretrained write `auto_map` + copy the model files for trust_remote_code loading.
AutoConfig.register(LlamaThinkConfig.model_type, LlamaThinkConfig, exist_ok=True)
AutoModel.register(LlamaThinkConfig, LlamaThinkModel, exist_ok=True)
AutoModelForCausalLM.register(LlamaThinkConfig, LlamaThinkForCausalLM, exist_ok=True)
LlamaThinkConfig.register_for_auto_class()
LlamaThinkModel.register_for_auto_class("AutoModel")
LlamaThinkForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "LlamaThinkCache",
    "LlamaThinkConfig",
    "LlamaThinkForCausalLM",
    "LlamaThinkModel",
    "LlamaThinkPreTrainedModel",
]
