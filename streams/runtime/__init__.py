"""Faust and Kafka plumbing (filled in the next commit)."""
