"""Training: losses (pure functions), what each stage trains and its objective."""
