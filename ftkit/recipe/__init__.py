"""The recipe: its schema (every key with its help), loading with overrides, validation, the generated reference."""
