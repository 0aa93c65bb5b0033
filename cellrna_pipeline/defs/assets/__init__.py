"""Assets by stage."""
