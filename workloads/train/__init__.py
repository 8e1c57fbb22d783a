"""Training on Ray Train: config (`config`), driver (`trainer`), worker loop (`loop`), DDP / FSDP2 /
column-sharded embeddings (`sharding`) and the versioned model artifact (`artifact`)."""
