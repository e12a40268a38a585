"""The shipped demo model: its synthetic task family, data and evaluation (docs/demo-model.md)."""
