"""ResNet family (see the models issue)."""
