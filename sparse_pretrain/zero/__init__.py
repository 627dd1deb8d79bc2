"""Everything that knows DeepSpeed: where a rank's ZeRO shard of each weight lives (``shards``), setting
up DeepSpeed on a rank (``runtime``) and the run-time patches it needs (``patches``), the DeepSpeed JSON
a recipe becomes (``config``), DeepSpeed's side of a checkpoint (``checkpoint``) and gathering full
weights for export (``export``)."""
