"""Data: synthetic reasoning tasks, corpus curation, token shards and the training loader."""
