"""Stages, one module per `wellread` command: each says only what is special about it."""
