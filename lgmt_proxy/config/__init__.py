"""Settings and validation of the environment, watched files, the file formats."""
