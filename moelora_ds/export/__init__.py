"""Exporting a training checkpoint: a merged Hugging Face model directory (streamed, sharded) or the adapters alone."""

from moelora_ds.export.exporter import ExportError, export_adapter, export_checkpoint, export_merged

__all__ = ["ExportError", "export_adapter", "export_checkpoint", "export_merged"]
