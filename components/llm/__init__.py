"""The RSLLM model: base LLM, prompts, projector + embedding injection, losses, two-stage training, ranking.

base.py     fetch/convert the base LLM (SmolLM2 GGUF or a local HF dir), the tiny test model
prompts.py  text-only and unified prompt templates -> token ids + placeholder positions
model.py    projector + wrapper that injects projected ID embeddings at placeholder positions
losses.py   L = L_lm + a * L_user_item + b * L_id_text
train.py    stage 1 (LoRA, text-only) and stage 2 (projector + LoRA, unified), resumable, Accelerate
rank.py     candidate scoring in one forward per user (block attention mask) + generation mode
"""
