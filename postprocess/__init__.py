"""From a label map to what people read: per-muscle measures for results.json."""
