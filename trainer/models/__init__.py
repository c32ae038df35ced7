"""Models and losses: the zoo of presets, the MLM model, classifiers with prediction, the loss terms."""
