"""What the terminal shows: the live table and progress lines (monitor, view) and `status` from disk."""
