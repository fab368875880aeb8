"""hyperdas_jax: HyperDAS in JAX/Flax NNX, with a Flax Llama target that equals HF transformers."""

from hyperdas_jax.config import ExperimentConfig, ModelConfig, load_config
from hyperdas_jax.target import Target, load_target

__all__ = ["ExperimentConfig", "ModelConfig", "Target", "load_config", "load_target"]
