"""`vlmx bench`: named multi-image workloads, real-size presets, and the hardware floor."""
