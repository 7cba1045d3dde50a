"""`ftkit export`: merge a run's adapter into its base (or take a full fine-tune as it is) and write a standalone
model folder: layout (`layout.py`), LoRA updates (`deltas.py`), streamed shards (`shards.py`), generation config
and card (`card.py`), the command (`run.py`)."""

from ftkit.export.run import EXPORT_MANIFEST, export_form, export_run

__all__ = ["EXPORT_MANIFEST", "export_form", "export_run"]
