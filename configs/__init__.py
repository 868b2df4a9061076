"""Configs: every module has get_config(arg) (ml_collections)."""
