"""wheelcas."""
