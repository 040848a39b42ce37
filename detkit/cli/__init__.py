"""Console entry points (``detkit-*``)."""
