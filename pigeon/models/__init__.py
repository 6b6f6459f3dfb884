"""The networks of Pigeon, one module per component."""
