"""scaletune: tune hyperparameters on small proxies, transfer them to the target."""
