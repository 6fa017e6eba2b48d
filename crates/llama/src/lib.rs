//! LLaMA-3.x
