"""mdtrain: MaskDistill pretraining from an mdcache cache (no teacher in memory), then finetuning."""
__version__ = "0.1.0"
