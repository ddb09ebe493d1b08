"""The vision-language model: vision tower, bridge, frozen causal LLM with LoRA, and its processor."""
