"""Identity fine-tuning (SPEC §2): the training pairs and their checks, the data module, the losses, the
object mask, the LightningModule, the export the editing stage loads, and what `train.py` runs (`run`)."""
