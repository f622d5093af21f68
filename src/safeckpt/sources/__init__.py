"""Readers for foreign checkpoint formats; each turns a file into data without executing it.

`pickle_vm` is the restricted pickle machine that every pickle-based format goes through.
"""
