"""Architecture and recipe search on Ray Tune: the sweep spec, the driver, the report."""
