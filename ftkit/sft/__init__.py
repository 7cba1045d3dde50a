"""`ftkit train`: supervised diffusion fine-tuning (the recipe's run and its transformers Trainer)."""
