"""COCO evaluation: the pycocotools adapter, weights -> metrics, validation sharded across ranks."""
