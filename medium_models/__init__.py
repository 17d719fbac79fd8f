"""RoBERTa-style masked language models: LM-BFF prompt-based fine-tuning."""
