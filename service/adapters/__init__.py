"""Adapter packages: the manifest contract (`manifest`) and the registry that serves them."""
