"""rosaq-quantize: Hugging Face causal LM in, ROSAQ checkpoint out (needs transformers; never vLLM)."""
