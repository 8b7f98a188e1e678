"""Raw detection datasets (COCO, VOC, YOLO, ImageNet-LOC) to 640 px Parquet shards."""
