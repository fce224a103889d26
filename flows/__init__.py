"""Prefect flows that run the DVC pipeline defined in dvc.yaml."""
