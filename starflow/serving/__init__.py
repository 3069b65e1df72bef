"""Serving past one process: the HTTP app, Ray Serve deployments and bulk generation on Ray Data."""
