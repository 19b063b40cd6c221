"""SCEdit Studio application layer: model manager, conditions, training, Shapes world, CLI, UI."""
