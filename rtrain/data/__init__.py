"""The data path: shard files -> decoded, augmented batches (CPU and on-device), and the Ray stream."""
