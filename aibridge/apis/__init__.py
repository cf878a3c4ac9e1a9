"""One module per bridged API (DESIGN.md §11)."""
