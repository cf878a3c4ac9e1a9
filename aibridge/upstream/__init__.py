"""What the bridge knows about its providers' health: circuits and keys."""
