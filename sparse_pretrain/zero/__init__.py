"""Everything that knows DeepSpeed: where a rank's ZeRO shard of each weight lives (``shards``), setting
up DeepSpeed on a rank (``runtime``), the DeepSpeed JSON a recipe becomes (``config``), checkpoints
(``checkpoint``) and gathering full weights for export (``export``)."""
