"""The networks of Pigeon, one module per component (architecture.md §2)."""
