"""What every stage shares: user errors, the quiet console, configs read back from files."""
